"""What the bi-encoder and reader trainers share: finding and resuming checkpoints, the optimizer step, and the
encoder settings saved with a checkpoint.

A subclass sets `cfg`, `dist`, `model`, `optimizer`, `params` (the trainable parameters) and `precision`.
"""
import logging
import os
from typing import Optional

import torch
from omegaconf import OmegaConf

from dpr.foundation import checkpoints
from dpr.foundation.checkpoints import CheckpointState
from dpr.training.distributed import all_reduce_gradients, broadcast_parameters
from dpr.training.optim import build_optimizer, parse_adam_betas
from dpr.foundation.precision import make_precision

logger = logging.getLogger(__name__)


class Trainer:
    def _prepare_model(self) -> None:
        """Load the resumed checkpoint's weights into self.model, start every process from rank 0's weights, and
        build the precision and the optimizer of the trainable parameters."""
        cfg, t = self.cfg, self.cfg.train
        if self.checkpoint is not None:
            checkpoints.load_model_state(self.model, self.checkpoint.model_dict)
        broadcast_parameters(self.model)
        self.precision = make_precision(self.device, cfg.get("fp16", False), cfg.get("bf16", False))
        self.optimizer = build_optimizer(self.model, t.learning_rate, t.adam_eps, t.weight_decay, parse_adam_betas(t.adam_betas))
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _find_checkpoint(self) -> Optional[CheckpointState]:
        path = self.cfg.model_file or checkpoints.find_latest_checkpoint(
            self.cfg.output_dir, self.cfg.checkpoint_file_name
        )
        if not path:
            return None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_file {path} does not exist")
        if not self.cfg.model_file:
            logger.info("Resuming from the newest checkpoint in output_dir: %s", path)
        return checkpoints.load_checkpoint(path, trust=bool(self.cfg.get("trust_checkpoint", False)))

    def _restore_training_state(self):
        """(start epoch, start batch, completed updates) from the checkpoint being resumed, restoring the
        optimizer state unless told not to."""
        cfg, ckpt = self.cfg, self.checkpoint
        if ckpt is None or cfg.get("ignore_checkpoint_offset", False):
            return 0, 0, 0
        if ckpt.optimizer_dict and not cfg.get("ignore_checkpoint_optimizer", False):
            self.optimizer.load_state_dict(ckpt.optimizer_dict)
        completed = 0
        if ckpt.scheduler_dict and not cfg.get("ignore_checkpoint_lr", False):
            completed = int(ckpt.scheduler_dict.get("last_epoch", 0))
        if ckpt.offset == 0:
            epoch, batch = ckpt.epoch + 1, 0
        else:
            epoch, batch = ckpt.epoch, ckpt.offset
        logger.info("Resuming at epoch %d, batch %d, after %d optimizer updates", epoch, batch, completed)
        return epoch, batch, completed

    def optimizer_step(self, scheduler) -> float:
        """All-reduce, unscale, clip, step; returns the total gradient norm before clipping."""
        all_reduce_gradients(self.params)
        scaler = self.precision.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def encoder_params(self) -> dict:
        return {"do_lower_case": bool(self.cfg.do_lower_case), "encoder": OmegaConf.to_container(self.cfg.encoder, resolve=True)}

    def save(self, epoch: int, offset: int, scheduler) -> str:
        """A checkpoint named `{checkpoint_file_name}.{epoch}[.{offset}]` in output_dir."""
        state = CheckpointState(
            model_dict=self.model.state_dict(),
            optimizer_dict=self.optimizer.state_dict(),
            scheduler_dict=scheduler.state_dict(),
            offset=offset,
            epoch=epoch,
            encoder_params=self.encoder_params(),
        )
        path = checkpoints.checkpoint_path(self.cfg.output_dir, self.cfg.checkpoint_file_name, epoch, offset)
        return checkpoints.save_checkpoint(path, state)
