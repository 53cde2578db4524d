"""Compose the real hydra configuration in-process and run the trainer on it."""
import logging
import re
from pathlib import Path
from typing import List

from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
STEP_LINE = re.compile(r"Step: (\d+)/\d+, loss=([-\d.e+]+), lr=([-\d.e+]+), grad_norm=([-\d.e+na]+)")


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


def step_records(caplog) -> List[tuple]:
    """(step, loss, lr, grad_norm) of every per-step log line captured."""
    out = []
    for record in caplog.records:
        m = STEP_LINE.search(record.getMessage())
        if m:
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return out


def run_trainer(cfg, caplog):
    from dpr.training.biencoder_trainer import BiEncoderTrainer

    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer = BiEncoderTrainer(cfg)
        best = trainer.run()
    return trainer, best, step_records(caplog)
