"""The reader end to end on a small fixture: retriever results -> preprocessing -> training with checkpoints
and resume -> inference, whose printed EM equals the EM recomputed from the prediction file; GC-DPR's flags."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preprocess_reader_data

from dpr.evaluation.exact_match import max_exact_match
from dpr.options.legacy_flags import config_top_level_keys, translate_argv
from dpr.options.reader_flags import READER_FLAGS, READER_GC_DEFAULTS
from dpr.training.reader_trainer import ReaderTrainer
from dpr.training.trainer_base import RECORDS_FILE
from tests.fixtures import TOPICS, retriever_results
from tests.tiny_models import tiny_bert_dir
from tests.training_helpers import CONF_DIR, compose_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "extractive_reader_train_cfg"
EM_LINE = re.compile(r"^n=(\d+)\tEM ([\d.]+)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reader")
    for name, n in (("train", 16), ("dev", 6)):
        (folder / f"{name}.json").write_text(json.dumps(retriever_results(n, 5), indent=4))
    return {"model": tiny_bert_dir(folder / "bert", dropout=0.1), "dir": folder}


def overrides(data, output_dir, **extra):
    values = {
        "encoder.pretrained_model_cfg": data["model"],
        "encoder.sequence_length": 80,
        "train_files": str(data["dir"] / "train.json"),
        "dev_files": str(data["dir"] / "dev.json"),
        "output_dir": str(output_dir),
        "num_workers": 1,
        "train.batch_size": 4,
        "train.dev_batch_size": 3,
        "train.num_train_epochs": 1,
        "train.learning_rate": 1e-3,
        "train.log_batch_step": 1,
        "passages_per_question": 3,
        "passages_per_question_predict": 4,
        "eval_top_docs": "[1,4]",
        "seed": 3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def run(cfg, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = ReaderTrainer(cfg)
        result = trainer.run()
    return trainer, result


def logged_ems(caplog) -> list:
    return [(int(m.group(1)), float(m.group(2))) for r in caplog.records if (m := EM_LINE.match(r.getMessage()))]


def test_training_writes_checkpoints_and_keeps_the_highest_em(data, tmp_path, caplog, monkeypatch):
    """Both references keep the lowest EM; the best checkpoint here has the highest EM at the last threshold."""
    scripted = iter([{1: 10.0, 4: 40.0}, {1: 50.0, 4: 20.0}])
    monkeypatch.setattr(ReaderTrainer, "exact_match", lambda self: next(scripted))
    trainer, result = run(compose_config(overrides(data, tmp_path, train__eval_step=2), CONFIG), caplog)
    assert [s.step for s in result.steps] == [1, 2, 3, 4]
    assert all(s.questions_per_s > 0 and s.tflops > 0 for s in result.steps)
    # tensorboard/: written where the tensorboard extra is installed (CI installs it)
    assert sorted(set(os.listdir(tmp_path)) - {"tensorboard"}) == ["dpr_extractive_reader.0", "dpr_extractive_reader.0.2",
                                                              RECORDS_FILE]
    assert [(v.metric, v.value, v.best) for v in result.validations] == [("em_top4", 40.0, True), ("em_top4", 20.0, False)]
    best = result.best_checkpoint
    assert best == str(tmp_path / "dpr_extractive_reader.0.2")
    state = torch.load(best, weights_only=True)
    assert set(state) == {"model_dict", "optimizer_dict", "scheduler_dict", "offset", "epoch", "encoder_params"}
    keys = set(state["model_dict"])
    assert {"qa_outputs.weight", "qa_classifier.bias", "encoder.embeddings.word_embeddings.weight"} <= keys
    assert state["encoder_params"]["encoder"]["token_type_ids"] is False
    # the retriever results were preprocessed once, next to the JSON, and are reused by later runs
    assert (data["dir"] / "train.0.pkl").exists() and (data["dir"] / "dev.0.npz").exists()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One epoch (4 updates) with a mid-epoch checkpoint after update 2; dropout reseeded per update."""
    output_dir = tmp_path_factory.mktemp("trained")
    cfg = compose_config(overrides(data, output_dir, train__eval_step=2, fully_resumable="true"), CONFIG)
    result = ReaderTrainer(cfg).run()
    return {"dir": output_dir, "best": result.best_checkpoint, "steps": result.steps}


def test_resume_mid_epoch_continues_with_the_same_losses(data, trained, tmp_path, caplog):
    assert [s.step for s in trained["steps"]] == [1, 2, 3, 4]
    resumed_cfg = overrides(data, tmp_path, model_file=trained["dir"] / "dpr_extractive_reader.0.2",
                            train__eval_step=2, fully_resumable="true")
    _, result = run(compose_config(resumed_cfg, CONFIG), caplog)
    resumed = result.steps
    assert [s.step for s in resumed] == [3, 4]
    for a, b in zip(trained["steps"][2:], resumed):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.lr == pytest.approx(a.lr, rel=1e-6)


def test_inference_prints_the_em_of_its_prediction_file(data, trained, tmp_path, caplog):
    predictions = tmp_path / "predictions.json"
    cfg = compose_config(overrides(data, tmp_path, train_files=None, model_file=trained["best"],
                                   dev_files=str(data["dir"] / "dev.*.pkl"), prediction_results_file=predictions),
                         CONFIG)
    run(cfg, caplog)
    printed = dict(logged_ems(caplog))
    records = json.loads(predictions.read_text())
    assert len(records) == 6 and sorted(printed) == [1, 4]
    for n, em in printed.items():
        entries = [next(e for e in r["predictions"] if e["top_k"] == n) for r in records]
        recomputed = 100 * sum(max_exact_match(e["prediction"]["text"], r["gold_answers"])
                               for e, r in zip(entries, records)) / len(records)
        assert em == pytest.approx(recomputed, abs=0.005)
        assert all(e["prediction"]["passage_idx"] is None or e["prediction"]["passage_idx"] < n for e in entries)


def test_gc_flags_map_onto_the_reader_config():
    argv = ["--train_file", "r/train.*.pkl", "--dev_file", "r/dev.*.pkl", "--eval_top_docs", "10", "20",
            "--passages_per_question", "4", "--fully_resumable", "--eval_step", "50", "--local-rank=0"]
    keys = config_top_level_keys(CONF_DIR, CONFIG)
    cfg = compose_config(translate_argv(argv, READER_FLAGS, READER_GC_DEFAULTS, keys), CONFIG)
    assert list(cfg.train_files) == ["r/train.*.pkl"] and list(cfg.dev_files) == ["r/dev.*.pkl"]
    assert list(cfg.eval_top_docs) == [10, 20] and cfg.passages_per_question == 4 and cfg.train.eval_step == 50
    assert cfg.fully_resumable is True and cfg.local_rank == 0
    assert (cfg.seed, cfg.checkpoint_file_name, cfg.encoder.sequence_length) == (0, "dpr_reader", 512)


def test_command_lines_preprocess_and_run_inference(data, trained, tmp_path, monkeypatch):
    """The README's `--gold_passages` spelling works, and train_reader.py takes GC-DPR's flags."""
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({"data": [{"question": "what is the capital of france?", "title": "paris",
                                          "context": TOPICS[0][2], "example_id": 1}]}))
    monkeypatch.setattr(sys, "argv", [
        "preprocess_reader_data.py", "--retriever_results", str(data["dir"] / "dev.json"), "--out_file",
        str(tmp_path / "dev"), "--gold_passages", str(gold), "--output_format", "npz", "--pretrained_model_cfg",
        data["model"], "--do_lower_case", "--sequence_length", "80", "--num_workers", "1",
        f"hydra.run.dir={tmp_path / 'hydra'}"])
    preprocess_reader_data.main()
    assert sorted(path.name for path in tmp_path.glob("dev*")) == ["dev.0.npz"]
    infer = [sys.executable, str(REPO_ROOT / "train_reader.py"), "--model_file", trained["best"], "--dev_file",
             str(tmp_path / "dev.*.npz"), "--pretrained_model_cfg", data["model"], "--do_lower_case",
             "--sequence_length", "80", "--eval_top_docs", "1", "3", "--passages_per_question_predict", "3",
             "--prediction_results_file", str(tmp_path / "p.json")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(infer, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"n=1\tEM \d+\.\d\d", output) and re.search(r"n=3\tEM \d+\.\d\d", output)
    assert len(json.loads((tmp_path / "p.json").read_text())) == 6


def test_recorded_flops_count_real_tokens_whatever_the_padding(data, tmp_path, caplog, monkeypatch):
    """The same reader batches padded to their longest sequence and to sequence_length record the same model FLOPs
    (dpr/training/flops.py: each sequence at its attention-mask length)."""
    monkeypatch.setattr(ReaderTrainer, "exact_match", lambda self: {1: 0.0, 4: 0.0})
    flops = {}
    for pad_to_max in (False, True):
        cfg = compose_config(overrides(data, tmp_path / str(pad_to_max), encoder__pad_to_max=pad_to_max,
                                       train__eval_step=100), CONFIG)
        _, result = run(cfg, caplog)
        flops[pad_to_max] = [s.tflops * s.seconds * 1e12 for s in result.steps]
    assert len(flops[False]) == 4 and all(f > 0 for f in flops[False])
    assert flops[True] == pytest.approx(flops[False], rel=1e-9)
