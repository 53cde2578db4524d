"""Compose the real hydra configuration in-process and run the trainers on it."""
import json
from pathlib import Path
from typing import List

import pytest
import torch
from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: List[str], config_name: str = "biencoder_train_cfg"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def tiny_overrides(model_dir: str, train: str, dev: str, output_dir: str, **extra) -> List[str]:
    values = {
        "encoder.pretrained_model_cfg": model_dir,
        "encoder.sequence_length": 48,
        "train_datasets": f"[{train}]",
        "dev_datasets": f"[{dev}]",
        "output_dir": output_dir,
        "train.batch_size": 4,
        "train.dev_batch_size": 4,
        "train.num_train_epochs": 1,
        "train.warmup_steps": 1,
        "train.learning_rate": 1e-3,
        "train.log_batch_step": 1,
        "seed": 7,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def run_trainer(cfg):
    """(trainer, TrainingRun) of a bi-encoder run."""
    from dpr.training.biencoder_trainer import BiEncoderTrainer

    trainer = BiEncoderTrainer(cfg)
    return trainer, trainer.run()


def records_file(output_dir, kind: str) -> List[dict]:
    """The records of one kind ("step" or "validation") a run wrote to output_dir/training_records.jsonl."""
    from dpr.training.trainer_base import RECORDS_FILE

    lines = (Path(output_dir) / RECORDS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.pop("kind") == kind]


def assert_trains_as(reference_dir, output_dir, checkpoint: str = "dpr_biencoder.0") -> None:
    """output_dir's run trained as reference_dir's: each of its optimizer steps has the reference's loss and
    gradient norm at the same step, each validation the reference's value at the same step, and `checkpoint` the
    same weights (to float noise). A resumed run holds only the steps after its start."""
    reference = {r["step"]: r for r in records_file(reference_dir, "step")}
    for record in records_file(output_dir, "step"):
        expected = reference[record["step"]]
        assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5), f"loss at step {record['step']}"
        assert record["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), f"grad_norm at step {record['step']}"
        assert record["masked_pairs"] == expected["masked_pairs"], f"masked_pairs at step {record['step']}"
    reference_values = {r["step"]: r["value"] for r in records_file(reference_dir, "validation")}
    for record in records_file(output_dir, "validation"):
        assert record["value"] == pytest.approx(reference_values[record["step"]], rel=1e-5), f"validation at step {record['step']}"
    expected_model = torch.load(Path(reference_dir) / checkpoint, weights_only=True)["model_dict"]
    model = torch.load(Path(output_dir) / checkpoint, weights_only=True)["model_dict"]
    for key, tensor in expected_model.items():
        torch.testing.assert_close(model[key], tensor, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
