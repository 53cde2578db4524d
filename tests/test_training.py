"""The training loop: checkpoints, resume, cache on/off, validation modes, bad input."""
import gzip
import json
import os

import pytest
import torch

from tests.fixtures import retriever_samples, write_retriever_json
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import compose_config, run_trainer, tiny_overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    return {
        "model": tiny_bert_dir(folder / "bert", dropout=0.1),
        "train": write_retriever_json(folder / "train.json", 16),
        "dev": write_retriever_json(folder / "dev.json", 6),
    }


def test_checkpoints_are_dpr_format_and_load_with_weights_only(data, tmp_path, caplog):
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), train__eval_per_epoch=2))
    _, best, steps = run_trainer(cfg, caplog)
    assert [s[0] for s in steps] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["dpr_biencoder.0", "dpr_biencoder.0.2"]
    state = torch.load(tmp_path / "dpr_biencoder.0", weights_only=True)
    assert set(state) == {"model_dict", "optimizer_dict", "scheduler_dict", "offset", "epoch", "encoder_params"}
    assert state["offset"] == 0 and state["epoch"] == 0
    assert state["scheduler_dict"]["last_epoch"] == 4
    keys = state["model_dict"].keys()
    assert any(k.startswith("question_model.embeddings.") for k in keys)
    assert any(k.startswith("ctx_model.encoder.layer.") for k in keys)
    assert "question_model.pooler.dense.weight" in keys
    assert state["encoder_params"]["encoder"]["pretrained_model_cfg"] == data["model"]
    assert "NLL Validation: loss =" in caplog.text and f"New Best validation checkpoint {best}" in caplog.text


def test_resume_mid_epoch_gives_the_losses_of_an_uninterrupted_run(data, tmp_path, caplog):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    overrides = dict(train__eval_per_epoch=2, train__num_train_epochs=2)
    _, _, full = run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(full_dir), **overrides)), caplog)
    # A fresh run started from the mid-epoch checkpoint of the first epoch continues with batch 2.
    resumed_cfg = compose_config(tiny_overrides(
        data["model"], data["train"], data["dev"], str(resumed_dir), model_file=str(full_dir / "dpr_biencoder.0.2"), **overrides
    ))
    _, _, resumed = run_trainer(resumed_cfg, caplog)
    assert [s[0] for s in resumed] == [3, 4, 5, 6, 7, 8]
    for a, b in zip(full[2:], resumed):
        assert a[0] == b[0]
        assert b[1] == pytest.approx(a[1], rel=1e-5), f"loss at step {a[0]}"
        assert b[2] == pytest.approx(a[2], rel=1e-6), f"lr at step {a[0]}"


def test_auto_resume_from_output_dir_with_more_epochs_keeps_a_live_schedule(data, tmp_path, caplog):
    """DPR #99: resuming with a larger num_train_epochs must not leave the learning rate at 0."""
    run_trainer(compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path))), caplog)
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), train__num_train_epochs=3))
    _, _, steps = run_trainer(cfg, caplog)
    assert "Resuming from the newest checkpoint in output_dir" in caplog.text
    assert [s[0] for s in steps] == [5, 6, 7, 8, 9, 10, 11, 12]
    lrs = [s[2] for s in steps]
    assert lrs[0] > 0 and all(a > b for a, b in zip(lrs, lrs[1:]))
    expected_first = 1e-3 * (12 - 5) / (12 - 1)
    assert lrs[0] == pytest.approx(expected_first, rel=1e-5)


@pytest.mark.parametrize("steps,learning_rate", [(1, 2e-5), (4, 1e-3)])
def test_training_with_and_without_cache_agree(data, tmp_path, caplog, steps, learning_rate):
    """Same loss and gradient norm at every step, dropout on. After one step the weights agree to 1e-5 (after
    several, Adam's normalisation of near-zero gradient entries lets float noise grow, so only losses compare)."""
    results = {}
    for name, extra in {"plain": {}, "cached": {"train.grad_cache": "true", "train.q_chunk_size": 2, "train.ctx_chunk_size": 3}}.items():
        out = tmp_path / name
        cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(out), train__warmup_steps=0,
                                            train__batch_size=16 // steps, train__learning_rate=learning_rate,
                                            train__hard_negatives=2, train__other_negatives=1, **extra))
        _, _, log = run_trainer(cfg, caplog)
        results[name] = (log, torch.load(out / "dpr_biencoder.0", weights_only=True)["model_dict"])
    (plain_steps, plain_model), (cached_steps, cached_model) = results["plain"], results["cached"]
    assert len(plain_steps) == len(cached_steps) == steps
    for a, b in zip(plain_steps, cached_steps):
        assert b[1] == pytest.approx(a[1], rel=1e-5) and b[3] == pytest.approx(a[3], rel=1e-4)
    if steps == 1:
        for key, tensor in plain_model.items():
            torch.testing.assert_close(cached_model[key], tensor, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_average_rank_validation_from_its_start_epoch(data, tmp_path, caplog):
    cfg = compose_config(tiny_overrides(data["model"], data["train"], data["dev"], str(tmp_path), val_av_rank_start_epoch=0,
                                        train__val_av_rank_hard_neg=2, train__val_av_rank_other_neg=1))
    run_trainer(cfg, caplog)
    assert "Av.rank validation: average rank" in caplog.text and "NLL Validation" not in caplog.text


def test_gzipped_jsonl_and_globs_load(data, tmp_path, caplog):
    with gzip.open(tmp_path / "part1.jsonl.gz", "wt") as f:
        for sample in retriever_samples(8):
            f.write(json.dumps(sample) + "\n")
    write_retriever_json(tmp_path / "part2.json", 8)
    cfg = compose_config(tiny_overrides(data["model"], f"'{tmp_path}/part*'", data["dev"], str(tmp_path / "out")))
    trainer, _, steps = run_trainer(cfg, caplog)
    assert sum(len(d) for d in trainer.train_sets) == 16 and len(steps) == 4


def test_empty_dataset_after_filtering_fails_before_the_model_is_built(data, tmp_path, caplog):
    from dpr.training.biencoder_trainer import ConfigError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "positive_ctxs": []}, {"positive_ctxs": [{"text": "t"}]}]))
    cfg = compose_config(tiny_overrides(data["model"], str(bad), data["dev"], str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="no usable sample"):
        run_trainer(cfg, caplog)
    assert "skipped 2 records without a question or without positive_ctxs" in caplog.text


def test_dataset_names_resolve_to_downloaded_resources(data, tmp_path, caplog):
    target = tmp_path / "downloads" / "data" / "retriever"
    target.mkdir(parents=True)
    write_retriever_json(target / "nq-train.json", 8)
    write_retriever_json(target / "nq-dev.json", 4)
    cfg = compose_config(tiny_overrides(data["model"], "nq_train", "nq_dev", str(tmp_path / "out"), data_dir=str(tmp_path)))
    trainer, _, steps = run_trainer(cfg, caplog)
    assert len(trainer.train_sets[0]) == 8 and len(trainer.dev_set) == 4 and len(steps) == 2


def test_a_dataset_not_downloaded_says_how_to_get_it(data, tmp_path, caplog):
    cfg = compose_config(tiny_overrides(data["model"], "nq_train", data["dev"], str(tmp_path / "out"), data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="download_data.py --resource data.retriever.nq-train"):
        run_trainer(cfg, caplog)
