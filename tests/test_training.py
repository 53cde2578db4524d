"""The training loop: checkpoints, resume, cache on/off, validation modes, bad input."""
import gzip
import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures import retriever_samples, write_retriever_json, written_by_training
from tests.tiny_models import tiny_bert_dir
from dpr.training.biencoder_trainer import BiEncoderTrainer
from dpr.training.trainer_base import RECORDS_FILE
from tests.training_helpers import compose_config, records_file, run_trainer, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    return {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1),
        "train": write_retriever_json(folder / "train.json", 16),
        "dev": write_retriever_json(folder / "dev.json", 6),
        # passage ids by topic: gold passages recur among other questions' contexts (in-batch false negatives)
        "train_topics": write_retriever_json(folder / "train_topics.json", 16, topic_ids=True),
    }


def test_checkpoints_are_dpr_format_and_load_with_weights_only(data, tmp_path):
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), train__eval_per_epoch=2))
    _, run = run_trainer(cfg)
    assert [s.step for s in run.steps] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == written_by_training("dpr_biencoder.0", "dpr_biencoder.0.2", RECORDS_FILE)
    state = torch.load(tmp_path / "dpr_biencoder.0", weights_only=True)
    assert set(state) == {"model_dict", "optimizer_dict", "scheduler_dict", "offset", "epoch", "encoder_params"}
    assert state["offset"] == 0 and state["epoch"] == 0
    assert state["scheduler_dict"]["last_epoch"] == 4
    keys = state["model_dict"].keys()
    assert any(k.startswith("question_model.embeddings.") for k in keys)
    assert any(k.startswith("ctx_model.encoder.layer.") for k in keys)
    assert "question_model.pooler.dense.weight" in keys
    assert state["encoder_params"]["encoder"]["pretrained_model_cfg"] == data["model"]
    assert state["encoder_params"]["encoder"]["similarity"] == "dot" and state["encoder_params"]["do_lower_case"]
    validations = [(v.offset, v.metric, v.checkpoint) for v in run.validations]
    assert validations == [(2, "nll_loss", str(tmp_path / "dpr_biencoder.0.2")), (0, "nll_loss", str(tmp_path / "dpr_biencoder.0"))]
    best = min(run.validations, key=lambda v: v.value)
    assert run.best_checkpoint == best.checkpoint and [v.best for v in run.validations][0]
    # the records file holds what the run returned
    assert [r["step"] for r in records_file(tmp_path, "step")] == [1, 2, 3, 4]
    assert [r["value"] for r in records_file(tmp_path, "validation")] == [v.value for v in run.validations]
    # and the run's recipe, for model cards (convert_dpr_checkpoint.py export-st)
    (recipe,) = records_file(tmp_path, "run")
    assert (recipe["processes"], recipe["global_batch"], recipe["num_train_epochs"], recipe["total_steps"]) == (1, 4, 1, 4)
    assert recipe["precision"] == "fp32" and recipe["learning_rate"] == 1e-3
    assert recipe["details"]["grad_cache"] is False and recipe["details"]["hard_negatives"] == 1


def test_resume_mid_epoch_gives_the_losses_of_an_uninterrupted_run(data, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    overrides = dict(train__eval_per_epoch=2, train__num_train_epochs=2)
    _, full_run = run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(full_dir), **overrides)))
    full = full_run.steps
    # A fresh run started from the mid-epoch checkpoint of the first epoch continues with batch 2.
    resumed_cfg = compose_config(tiny_overrides(
        data["model"], data["train"], data["dev"], str(resumed_dir), model_file=str(full_dir / "dpr_biencoder.0.2"), **overrides
    ))
    _, resumed_run = run_trainer(resumed_cfg)
    resumed = resumed_run.steps
    assert [s.step for s in resumed] == [3, 4, 5, 6, 7, 8]
    for a, b in zip(full[2:], resumed):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        assert b.loss == pytest.approx(a.loss, rel=1e-5), f"loss at step {a.step}"
        assert b.lr == pytest.approx(a.lr, rel=1e-6), f"lr at step {a.step}"


def test_auto_resume_from_output_dir_with_more_epochs_keeps_a_live_schedule(data, tmp_path):
    """DPR #99: resuming with a larger num_train_epochs must not leave the learning rate at 0."""
    run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path))))
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), train__num_train_epochs=3))
    trainer, run = run_trainer(cfg)
    assert trainer.checkpoint_file == str(tmp_path / "dpr_biencoder.0")
    assert [s.step for s in run.steps] == [5, 6, 7, 8, 9, 10, 11, 12]
    lrs = [s.lr for s in run.steps]
    assert lrs[0] > 0 and all(a > b for a, b in zip(lrs, lrs[1:]))
    expected_first = 1e-3 * (12 - 5) / (12 - 1)
    assert lrs[0] == pytest.approx(expected_first, rel=1e-5)


@pytest.mark.parametrize("steps,learning_rate,in_batch_negatives,checkpointing", [
    (1, 2e-5, "all", "false"), (4, 1e-3, "all", "false"), (4, 1e-3, "mask_duplicates", "false"),
    (4, 1e-3, "mask_answers", "false"), (1, 2e-5, "all", "true")])
def test_training_with_and_without_cache_agree(data, tmp_path, steps, learning_rate, in_batch_negatives, checkpointing):
    """Same loss and gradient norm at every step, dropout on, false negatives masked or not. After one step the
    weights agree to 1e-5 (after several, Adam's normalisation of near-zero gradient entries lets float noise grow,
    so only losses compare). With encoder.gradient_checkpointing=true the cached run recomputes activations and
    still agrees with the plain one."""
    results = {}
    train = data["train"] if in_batch_negatives == "all" else data["train_topics"]
    for name, extra in {"plain": {}, "cached": {"train.grad_cache": "true", "train.q_chunk_size": 2, "train.ctx_chunk_size": 3,
                                              "encoder.gradient_checkpointing": checkpointing}}.items():
        out = tmp_path / name
        cfg = compose_config(tiny_overrides(data["model"], train, data["dev"], str(out), train__warmup_steps=0,
                                            train__batch_size=16 // steps, train__learning_rate=learning_rate,
                                            train__hard_negatives=2, train__other_negatives=1,
                                            train__in_batch_negatives=in_batch_negatives, **extra))
        _, run = run_trainer(cfg)
        results[name] = (run.steps, torch.load(out / "dpr_biencoder.0", weights_only=True)["model_dict"])
    (plain_steps, plain_model), (cached_steps, cached_model) = results["plain"], results["cached"]
    assert len(plain_steps) == len(cached_steps) == steps
    for a, b in zip(plain_steps, cached_steps):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
        assert a.masked_pairs == b.masked_pairs
        assert (a.masked_pairs is None) if in_batch_negatives == "all" else (a.masked_pairs > 0)
    # the records file carries the count
    assert [r["masked_pairs"] for r in records_file(tmp_path / "cached", "step")] == [s.masked_pairs for s in cached_steps]
    if steps == 1:
        for key, tensor in plain_model.items():
            torch.testing.assert_close(cached_model[key], tensor, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_average_rank_validation_from_its_start_epoch(data, tmp_path):
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), val_av_rank_start_epoch=1,
                                        train__num_train_epochs=2, train__val_av_rank_hard_neg=2,
                                        train__val_av_rank_other_neg=1))
    _, run = run_trainer(cfg)
    assert [(v.epoch, v.metric) for v in run.validations] == [(0, "nll_loss"), (1, "average_rank")]
    # the best-checkpoint tracker starts again with the new metric: NLL losses and ranks do not compare
    assert run.validations[1].best and run.best_checkpoint == str(tmp_path / "dpr_biencoder.1")


def test_gzipped_jsonl_and_globs_load(data, tmp_path):
    with gzip.open(tmp_path / "part1.jsonl.gz", "wt") as f:
        for sample in retriever_samples(8):
            f.write(json.dumps(sample) + "\n")
    write_retriever_json(tmp_path / "part2.json", 8)
    cfg = compose_config(tiny_overrides(data["model"], f"'{tmp_path}/part*'", data["dev"], str(tmp_path / "out")))
    trainer, run = run_trainer(cfg)
    assert sum(len(d) for d in trainer.train_sets) == 16 and len(run.steps) == 4


def test_empty_dataset_after_filtering_fails_before_the_model_is_built(data, tmp_path, caplog):
    from dpr.foundation.errors import ConfigError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "positive_ctxs": []}, {"positive_ctxs": [{"text": "t"}]}]))
    cfg = compose_config(tiny_overrides(data["model"], str(bad), data["dev"], str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="no usable sample"):
        run_trainer(cfg)
    assert "skipped 2 records without a question or without positive_ctxs" in caplog.text


def test_dataset_names_resolve_to_downloaded_resources(data, tmp_path):
    target = tmp_path / "downloads" / "data" / "retriever"
    target.mkdir(parents=True)
    write_retriever_json(target / "nq-train.json", 8)
    write_retriever_json(target / "nq-dev.json", 4)
    cfg = compose_config(tiny_overrides(data["model"], "nq_train", "nq_dev", str(tmp_path / "out"), data_dir=str(tmp_path)))
    trainer, run = run_trainer(cfg)
    assert len(trainer.train_sets[0]) == 8 and len(trainer.dev_set) == 4 and len(run.steps) == 2


def test_a_dataset_not_downloaded_says_how_to_get_it(data, tmp_path):
    cfg = compose_config(tiny_overrides(data["model"], "nq_train", data["dev"], str(tmp_path / "out"), data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="download_data.py --resource data.retriever.nq-train"):
        run_trainer(cfg)


def fixed_vector_batches(trainer):
    """Encoders that return their inputs, and one dev batch of 2 questions and 3 contexts where the gold passages
    are the most similar by angle but not by inner product: [10, 10] outscores each gold under dot only."""
    batch = SimpleNamespace(question_ids=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), question_mask=None,
                            context_ids=torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]]),
                            context_mask=torch.zeros(3, 1), positive_indices=torch.tensor([0, 1]))
    trainer.model.encode_questions = lambda ids, mask: ids
    trainer.model.encode_contexts = lambda ids, mask: ids
    trainer._dev_batches = lambda hard, other: iter([batch])


def test_the_encoder_spec_travels_through_checkpoints_and_average_rank_validation(data, tmp_path):
    """A cosine model saves its similarity, resuming takes it from the checkpoint over the configuration, and
    average-rank validation ranks with it (it used q @ ctx.T whatever the similarity)."""
    first = tmp_path / "cosine"
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(first), train__batch_size=8,
                                        encoder__similarity="cosine", encoder__temperature=0.05))
    run_trainer(cfg)
    saved = torch.load(first / "dpr_biencoder.0", weights_only=True)["encoder_params"]["encoder"]
    assert (saved["similarity"], saved["temperature"]) == ("cosine", 0.05)

    resumed = BiEncoderTrainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path / "r"),
                                                             model_file=str(first / "dpr_biencoder.0"))))
    assert (resumed.spec.similarity, resumed.spec.temperature) == ("cosine", 0.05)
    fixed_vector_batches(resumed)
    assert resumed.validate_average_rank().value == 0.0

    dot = BiEncoderTrainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path / "d"))))
    fixed_vector_batches(dot)
    assert dot.validate_average_rank().value == 1.0


def test_the_process_device_comes_from_the_one_device_picker(monkeypatch):
    from dpr.training import distributed

    asked = []
    monkeypatch.setattr(distributed, "process_device",
                        lambda no_cuda, local_rank: asked.append((no_cuda, local_rank)) or torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_distributed(-1, no_cuda=True)
    assert asked == [(True, 0)] and context.device == torch.device("cpu") and context.world_size == 1


def test_a_second_training_into_one_output_dir_is_refused_before_it_touches_it(data, tmp_path):
    """Two trainings into one output_dir deleted each other's checkpoints (the second's start-up clean-up removed
    the first's half-written save) and mixed two runs: the second is refused in one line naming the holder, and
    the first's files are left as they are. Once the first has ended, the output_dir is free again."""
    from dpr.foundation.run_lock import OutputInUseError, lock_file_for, run_lock

    being_saved = tmp_path / ".dpr_biencoder.0.abcd1234.tmp"  # the first run's checkpoint, being written
    being_saved.write_text("half a checkpoint")
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path)))
    with run_lock(tmp_path, "output_dir"):  # the first run
        with pytest.raises(OutputInUseError, match=rf"output_dir={tmp_path} is in use by another run \(.*pid "
                                                   rf"{os.getpid()} on .*choose another output_dir"):
            BiEncoderTrainer(cfg)
        assert being_saved.read_text() == "half a checkpoint"
    trainer, run = run_trainer(cfg)
    assert run.steps and not being_saved.exists()  # the sole run cleans up
    assert not lock_file_for(tmp_path).exists() and trainer.output_lock is None
