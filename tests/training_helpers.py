"""Compose the real hydra configuration in-process and run the trainers on it."""
import json
from pathlib import Path
from typing import List

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
