"""The training loop both trainers run, and what they share around it: the settings, the encoder spec, finding
and resuming checkpoints, the optimizer step, step logging and records, validation and the best checkpoint.

A trainer supplies its batches (`epoch_batches`), the forward-backward pass of one (`train_step`), when to
validate (`validation_due`) and its validation (`validate`, a value and whether higher is better); the loop is
here, once.

The gradient rule, one for both trainers. Every process backpropagates

    loss x backward_weight,   backward_weight = gradient_compensation / gradient_accumulation_steps

and the optimizer step sums the gradients of all processes (one all-reduce). `gradient_compensation` is
1 / R for a reference world of R processes, whose DDP mean the gradient reproduces:
- bi-encoder: each process's loss is the loss of the global batch (its gradient reaching the local rows only),
  so the sum is the global-batch gradient; R = `train.grad_compensation_ref_world` (GC-DPR's 8: the gradient
  of DPR's 8-GPU run at any number of processes; null or 0: R = 1, the plain global-batch gradient);
- reader: each process's loss is the sum over its own questions (DPR's); R = the number of processes, as DDP
  averages DPR's reader gradients.
Two other factors are kept apart from it: a dataset's loss weight (DPR's `loss_scale_factors`, part of the
bi-encoder's loss) and fp16's GradScaler factor (applied once in the backward pass, removed before clipping).
"""
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dpr.data.batching import GlobalBatch
from dpr.foundation import checkpoints
from dpr.foundation.checkpoints import CheckpointError, CheckpointState, UnreadableCheckpointError
from dpr.foundation.config_values import true_or_false
from dpr.foundation.errors import ConfigError, UserInputError
from dpr.foundation.files import ensure_writable_directory, remove_stale_temporaries
from dpr.foundation.precision import make_precision
from dpr.foundation.run_lock import RunLock, acquire_run_lock
from dpr.foundation.seed import set_seed
from dpr.foundation.tensorboard import ScalarLog
from dpr.models.encoder_spec import EncoderSpec
from dpr.models.hf_encoder import check_same_tokenizer, enable_gradient_checkpointing, tokenizer_identity
from dpr.training.distributed import (all_gather_rows, all_reduce_gradients, all_reduce_sum, broadcast_parameters,
                                      end_distributed, init_distributed)
from dpr.training.flops import ModelFlops
from dpr.training.optim import build_optimizer, build_scheduler, parse_adam_betas

logger = logging.getLogger(__name__)

RECORDS_FILE = "training_records.jsonl"


# Keys of DPR's configurations for machinery this repository does not have: accepted at DPR's default, so that
# DPR's command lines work, and an error naming the key and the way out when set to anything else.
UNSUPPORTED_KEYS: Dict[str, Tuple[Any, str]] = {
    "device": (None, "the device follows torchrun's LOCAL_RANK and no_cuda"),
    "distributed_world_size": (None, "launch with torchrun --nproc_per_node N; the world size comes from torchrun"),
    "distributed_port": (None, "SLURM and TCP initialisation are not supported: launch with torchrun"),
    "distributed_init_method": (None, "SLURM and TCP initialisation are not supported: launch with torchrun"),
    "n_gpu": (None, "one process per GPU under torchrun (DataParallel is not supported)"),
    "special_tokens": (None, "replacing [unusedN] vocabulary entries is not supported"),
    "multi_q_encoder": (False, "one question encoder is trained"),
    "local_shards_dataloader": (False, "every process reads the data and takes its own slice of each batch"),
}


def checkpoint_position(path: Optional[str], state: Optional[CheckpointState]) -> Tuple[int, int, int]:
    """Where a process resumes, as integers all processes can gather: (epoch, offset, crc32 of the checkpoint's
    file name); (-1, -1, 0) from the start."""
    if state is None:
        return -1, -1, 0
    return state.epoch, state.offset, zlib.crc32(os.path.basename(path).encode())


def check_same_start(positions: Sequence[Tuple[int, int, int]]) -> None:
    """Refuse processes that would resume from different checkpoints (each node reading its own output_dir): they
    would run different numbers of steps and wait for each other at a collective until the timeout."""
    if len(set(positions)) > 1:
        starts = ", ".join(
            f"rank {rank}: " + (f"epoch {epoch}, offset {offset}" if epoch >= 0 else "none (from the start)")
            for rank, (epoch, offset, _) in enumerate(positions))
        raise ConfigError(
            f"the processes would resume from different checkpoints ({starts}): output_dir must be one folder that "
            "every node sees (a shared disk), or give model_file"
        )


def check_unsupported_keys(cfg: DictConfig) -> None:
    for key, (default, way_out) in UNSUPPORTED_KEYS.items():
        if key in cfg and cfg.get(key) != default and not (default is False and cfg.get(key) is None):
            raise ConfigError(f"{key}={cfg.get(key)} is not supported ({way_out}): leave {key} at {default}")


@dataclass(frozen=True)
class TrainSettings:
    """What the loop reads of `cfg.train` (both trainers' keys of the same name), resolved once."""

    batch_size: int  # per process
    dev_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: int
    learning_rate: float
    adam_eps: float
    adam_betas: Tuple[float, float]
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    warmup_steps: int
    log_batch_step: int
    train_rolling_loss_step: int
    peak_tflops: Optional[float]

    @classmethod
    def from_config(cls, train: DictConfig) -> "TrainSettings":
        settings = cls(
            batch_size=int(train.batch_size),
            dev_batch_size=int(train.dev_batch_size),
            gradient_accumulation_steps=int(train.gradient_accumulation_steps),
            num_train_epochs=int(train.num_train_epochs),
            learning_rate=float(train.learning_rate),
            adam_eps=float(train.adam_eps),
            adam_betas=parse_adam_betas(train.adam_betas),
            weight_decay=float(train.weight_decay),
            max_grad_norm=float(train.max_grad_norm or 0.0),
            warmup_steps=int(train.warmup_steps),
            log_batch_step=int(train.log_batch_step),
            train_rolling_loss_step=int(train.train_rolling_loss_step),
            peak_tflops=float(train.peak_tflops) if train.get("peak_tflops") else None,
        )
        for key in ("batch_size", "dev_batch_size", "gradient_accumulation_steps", "log_batch_step",
                    "train_rolling_loss_step"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"train.{key}={getattr(settings, key)} must be >= 1")
        return settings


@dataclass(frozen=True)
class CheckpointSettings:
    """Where checkpoints go, which one to start from and what of it to restore."""

    output_dir: Optional[str]
    file_name: str
    model_file: Optional[str]
    trust: bool
    ignore_offset: bool
    ignore_optimizer: bool
    ignore_lr: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "CheckpointSettings":
        return cls(
            output_dir=cfg.output_dir or None,
            file_name=cfg.checkpoint_file_name,
            model_file=cfg.model_file or None,
            trust=bool(cfg.get("trust_checkpoint", False)),
            ignore_offset=bool(cfg.get("ignore_checkpoint_offset", False)),
            ignore_optimizer=bool(cfg.get("ignore_checkpoint_optimizer", False)),
            ignore_lr=bool(cfg.get("ignore_checkpoint_lr", False)),
        )


@dataclass(frozen=True)
class BatchResult:
    """What a trainer's forward-backward pass of one batch reports."""

    loss: float
    questions: int  # in the global batch
    correct: Optional[int] = None  # questions whose positive scored highest, where the trainer counts them
    model_flops: float = 0.0  # of this process (dpr/training/flops.py)
    skipped: int = 0  # of this process's questions, left out of the step (a reader question without a usable positive)
    masked_pairs: Optional[int] = None  # (question, context) pairs taken out of the loss as false negatives


@dataclass(frozen=True)
class Validation:
    """A trainer's validation: the value the best checkpoint is chosen by, and more scalars for TensorBoard."""

    metric: str
    value: float
    higher_is_better: bool
    scalars: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer update."""

    epoch: int
    step: int  # updates completed, counted from the start of training (resumes continue the count)
    total_steps: int
    loss: float  # mean over the update's batches
    lr: float  # after the update
    grad_norm: float  # before clipping
    questions_per_s: float
    seconds: float  # of the update's forward-backward passes and optimizer step
    tflops: float  # achieved model TFLOPS of this process
    mfu: Optional[float]  # percent of the device's peak; None when the peak is unknown
    masked_pairs: Optional[int] = None  # false-negative pairs masked in the update's batches (bi-encoder)


@dataclass(frozen=True)
class RunRecord:
    """The recipe of one training run, written when it starts (a resumed run writes its own): what a model card
    reports of how the model was trained."""

    processes: int
    global_batch: int  # questions per optimizer step: batch_size x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int
    num_train_epochs: int
    total_steps: int
    learning_rate: float
    warmup_steps: int
    precision: str
    details: Dict[str, Any]  # the trainer's own settings (`Trainer.recipe_details`)


@dataclass(frozen=True)
class ValidationRecord:
    """One validation (and the checkpoint saved with it)."""

    epoch: int
    offset: int  # batch index in the epoch; 0 at the end of an epoch
    step: int
    metric: Optional[str]  # None: no dev data, a checkpoint only
    value: Optional[float]
    seconds: float
    checkpoint: Optional[str]  # on the main process
    best: bool
    # the validation's scalars beside its value (retrieval validation's Recall@k); a record without any is written
    # without the key, as before scalars were recorded
    scalars: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochRecord:
    """The end of one epoch."""

    epoch: int
    loss: float  # mean over the epoch's batches
    skipped_questions: int  # of all processes (BatchResult.skipped)


@dataclass
class TrainingRun:
    best_checkpoint: Optional[str]
    steps: List[StepRecord]
    validations: List[ValidationRecord]
    skipped_questions: int = 0  # of all processes and epochs (BatchResult.skipped)


@dataclass
class _Window:
    """Sums over a stretch of batches."""

    loss: float = 0.0
    batches: int = 0
    questions: int = 0
    correct: Optional[int] = None
    flops: float = 0.0
    skipped: int = 0
    masked_pairs: Optional[int] = None

    def add(self, result: BatchResult) -> None:
        self.loss += result.loss
        self.batches += 1
        self.questions += result.questions
        self.flops += result.model_flops
        self.skipped += result.skipped
        if result.correct is not None:
            self.correct = (self.correct or 0) + result.correct
        if result.masked_pairs is not None:
            self.masked_pairs = (self.masked_pairs or 0) + result.masked_pairs

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.batches)


class Trainer:
    """A subclass resolves (and checks) its own settings, calls `super().__init__(cfg, trains)`, then reads its
    data, builds `self.model` from `self.spec` and calls `self._prepare_model(...)`."""

    def __init__(self, cfg: DictConfig, trains: bool):
        self.cfg = cfg
        check_unsupported_keys(cfg)
        self.settings = TrainSettings.from_config(cfg.train)
        self.ckpt_settings = CheckpointSettings.from_config(cfg)
        # Resolved (and validated) before anything is read: a bad encoder setting fails in a second.
        self.spec = EncoderSpec.from_config(cfg.encoder, cfg.do_lower_case)
        self.gradient_checkpointing = true_or_false(
            "encoder.gradient_checkpointing", cfg.encoder.get("gradient_checkpointing", False))
        self.dist = init_distributed(cfg.get("local_rank"), cfg.get("no_cuda", False))
        self.device = self.dist.device
        # before any data is read or model built: fp16 on a CPU fails in a second
        self.precision = make_precision(self.device, self.cfg.get("fp16", False), self.cfg.get("bf16", False))
        if not self.dist.is_main:
            logging.getLogger("dpr").setLevel(logging.WARNING)  # one process speaks for all
        set_seed(cfg.seed)
        output_dir = self.ckpt_settings.output_dir
        self.output_lock: Optional[RunLock] = None
        if trains:
            if not output_dir:
                raise ConfigError("output_dir is required for training (checkpoints are written there)")
            self._hold_output_dir()
        self.checkpoint_file, self.checkpoint = self._find_checkpoint()
        position = torch.tensor([checkpoint_position(self.checkpoint_file, self.checkpoint)], device=self.device)
        check_same_start([tuple(row[0].tolist()) for row in all_gather_rows(position)])
        if self.checkpoint is not None:
            self.spec = self.spec.with_checkpoint_params(self.checkpoint.encoder_params)
        self.backward_weight = self.gradient_compensation() / self.settings.gradient_accumulation_steps
        self.scalars = ScalarLog(os.path.join(output_dir, "tensorboard") if output_dir else None,
                                 enabled=self.dist.is_main)
        self.records_file = os.path.join(output_dir, RECORDS_FILE) if output_dir and trains else None
        self.best: Optional[ValidationRecord] = None
        self.step_records: List[StepRecord] = []
        self.validation_records: List[ValidationRecord] = []
        self.skipped_questions = 0

    # ---------------------------------------------------------------- what a trainer supplies
    def gradient_compensation(self) -> float:
        """1 / the reference world (module docstring); DPR's DDP mean over the processes unless overridden."""
        return 1.0 / self.dist.world_size

    def has_training_data(self) -> bool:
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> Sequence[GlobalBatch]:
        raise NotImplementedError

    def train_step(self, batch: GlobalBatch, epoch: int, update: int) -> BatchResult:
        """Forward and backward of this process's share of `batch`, gradients weighted by self.backward_weight
        accumulated into .grad; `update` is the number of optimizer updates completed before it."""
        raise NotImplementedError

    def validation_due(self, epoch_update: int, update: int, updates_per_epoch: int) -> bool:
        """Whether to validate (and save) after this update, counted in the epoch and overall."""
        raise NotImplementedError

    def validate(self, epoch: int) -> Optional[Validation]:
        """The dev-set validation; None without dev data."""
        raise NotImplementedError

    def evaluate(self) -> List[Validation]:
        """What a run without training data does."""
        raise NotImplementedError

    def describe_setup(self, batches_per_epoch: int, total_updates: int) -> str:
        raise NotImplementedError

    def recipe_details(self) -> Dict[str, Any]:
        """The trainer's own settings for the run record (JSON values)."""
        return {}

    # ---------------------------------------------------------------- set-up
    def _hold_output_dir(self) -> None:
        """One run per output_dir: the main process (the one that writes) takes its lock before it cleans anything
        up, or refuses in one line naming the holder; the other processes learn the outcome from it, so that a
        refusal ends every process of the run at once, none waiting at a collective for a process that left."""
        refusal: Optional[UserInputError] = None
        if self.dist.is_main:
            try:
                ensure_writable_directory(self.ckpt_settings.output_dir, "output_dir")
                self.output_lock = acquire_run_lock(self.ckpt_settings.output_dir, "output_dir")
                self._remove_stale_temporaries()
            except UserInputError as e:
                refusal = e
        outcomes = all_gather_rows(torch.tensor([[int(refusal is not None)]], device=self.device))
        if refusal is not None:
            raise refusal
        if int(outcomes[0][0, 0]):
            raise ConfigError(f"rank 0 refused output_dir={self.ckpt_settings.output_dir} (its message says why)")

    def release_output_dir(self) -> None:
        """Give up output_dir's lock (at the end of `run`; a process that dies gives it up anyway)."""
        if self.output_lock is not None:
            self.output_lock.release()
            self.output_lock = None

    def _remove_stale_temporaries(self) -> None:
        count, size = remove_stale_temporaries(self.ckpt_settings.output_dir, self.ckpt_settings.file_name)
        if count:
            logger.info("Removed %d temporary checkpoint file(s) of interrupted saves (%.1f MB) from %s",
                        count, size / 2**20, self.ckpt_settings.output_dir)

    def _find_checkpoint(self) -> Tuple[Optional[str], Optional[CheckpointState]]:
        """model_file, or else the newest readable checkpoint in output_dir: an unreadable one (an interrupted
        copy, a 0-byte file) is passed over with a warning; one refused for what it holds stops the run."""
        s = self.ckpt_settings
        if s.model_file:
            if not os.path.isfile(s.model_file):
                raise CheckpointError(f"model_file={s.model_file} does not exist")
            return s.model_file, checkpoints.load_checkpoint(s.model_file, trust=s.trust)
        candidates = checkpoints.checkpoints_newest_first(s.output_dir, s.file_name)
        for path in candidates:
            try:
                state = checkpoints.load_checkpoint(path, trust=s.trust)
            except UnreadableCheckpointError as e:
                logger.warning("Passing over %s: %s", path, e)
                continue
            logger.info("Resuming from the newest readable checkpoint in output_dir: %s", path)
            return path, state
        if candidates:
            raise CheckpointError(
                f"no checkpoint in {s.output_dir} is readable ({', '.join(candidates)}): remove them to start "
                "afresh, or set model_file"
            )
        return None, None

    def _prepare_model(self, encoders: Sequence[Tuple[torch.nn.Module, bool]]) -> None:
        """Load the resumed checkpoint's weights into self.model, start every process from rank 0's weights, and
        build the optimizer of the trainable parameters and the FLOPs count of `encoders`
        ((encoder, whether it trains) pairs of the model)."""
        s = self.settings
        if self.checkpoint is not None:
            checkpoints.load_model_state(self.model, self.checkpoint.model_dict)
        broadcast_parameters(self.model)
        if self.gradient_checkpointing:
            for encoder, trains in encoders:
                if trains:
                    enable_gradient_checkpointing(encoder)
        self.optimizer = build_optimizer(self.model, s.learning_rate, s.adam_eps, s.weight_decay, s.adam_betas)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.flops = ModelFlops(encoders, self.device, self.precision.name, s.peak_tflops)

    def _restore_training_state(self) -> Tuple[int, int, int]:
        """(start epoch, start batch, completed updates) from the checkpoint being resumed, restoring the
        optimizer state unless told not to."""
        s, ckpt = self.ckpt_settings, self.checkpoint
        if ckpt is None or s.ignore_offset:
            return 0, 0, 0
        if ckpt.optimizer_dict and not s.ignore_optimizer:
            self.optimizer.load_state_dict(ckpt.optimizer_dict)
        completed = 0
        if ckpt.scheduler_dict and not s.ignore_lr:
            completed = int(ckpt.scheduler_dict.get("last_epoch", 0))
        if ckpt.offset == 0:
            epoch, batch = ckpt.epoch + 1, 0
        else:
            epoch, batch = ckpt.epoch, ckpt.offset
        logger.info("Resuming at epoch %d, batch %d, after %d optimizer updates", epoch, batch, completed)
        return epoch, batch, completed

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainingRun:
        """Train (or, without training data, evaluate); returns the best checkpoint and the records. output_dir is
        released at the end, however it ends."""
        try:
            run = self._train_or_evaluate()
        finally:
            self.release_output_dir()
        end_distributed()
        return run

    def _train_or_evaluate(self) -> TrainingRun:
        if not self.has_training_data():
            return self._evaluate_only()
        s = self.settings
        global_batch = s.batch_size * self.dist.world_size
        batches_per_epoch = len(self.epoch_batches(0))
        if batches_per_epoch == 0:
            raise ConfigError(f"the training data is smaller than one global batch of {global_batch} "
                              f"(train.batch_size={s.batch_size} x {self.dist.world_size} processes)")
        self.updates_per_epoch = max(1, batches_per_epoch // s.gradient_accumulation_steps)
        self.total_updates = self.updates_per_epoch * s.num_train_epochs
        start_epoch, start_batch, self.update = self._restore_training_state()
        self.scheduler = build_scheduler(self.optimizer, s.warmup_steps, self.total_updates, self.update)
        logger.info("%s", self.describe_setup(batches_per_epoch, self.total_updates))
        self._write_record("run", RunRecord(
            processes=self.dist.world_size, global_batch=global_batch * s.gradient_accumulation_steps,
            gradient_accumulation_steps=s.gradient_accumulation_steps, num_train_epochs=s.num_train_epochs,
            total_steps=self.total_updates, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps,
            precision=self.precision.name, details=self.recipe_details(),
        ))
        self.model.train()
        for epoch in range(start_epoch, s.num_train_epochs):
            self._train_epoch(epoch, start_batch if epoch == start_epoch else 0)
        best = self.best.checkpoint if self.best else None
        logger.info("Training finished. Best validation checkpoint %s", best)
        self.scalars.close()
        return TrainingRun(best, self.step_records, self.validation_records, self.skipped_questions)

    def _train_epoch(self, epoch: int, first: int) -> None:
        s = self.settings
        batches = self.epoch_batches(epoch)
        epoch_window, rolling, pending = _Window(), _Window(), _Window()
        progress = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch}", unit="batch",
                        disable=not (self.dist.is_main and sys.stderr.isatty()))
        timer = time.perf_counter()
        for i in range(first, len(batches)):
            result = self.train_step(batches[i], epoch, self.update)
            for window in (epoch_window, rolling, pending):
                window.add(result)
            progress.update(1)
            if (i + 1) % s.gradient_accumulation_steps == 0:
                grad_norm = self.optimizer_step(self.scheduler)
                self.update += 1
                self._record_step(epoch, pending, grad_norm, time.perf_counter() - timer)
                pending = _Window()
                epoch_update = (i + 1) // s.gradient_accumulation_steps
                if self.validation_due(epoch_update, self.update, self.updates_per_epoch) and i + 1 < len(batches):
                    self._validate_and_save(epoch, i + 1)
                timer = time.perf_counter()  # throughput counts training only
            if rolling.batches == s.train_rolling_loss_step:
                logger.info("Avg. loss per last %d batches: %f", rolling.batches, rolling.mean_loss)
                rolling = _Window()
        progress.close()
        logger.info("Av Loss per epoch=%f", epoch_window.mean_loss)
        # every process reaches the end of the epoch: a collective of all of them, whatever their batches held
        skipped = int(all_reduce_sum([float(epoch_window.skipped)], self.device)[0])
        if skipped:
            logger.warning("%d training question(s) of epoch %d had no usable positive passage and were skipped",
                           skipped, epoch)
        self.skipped_questions += skipped
        self._write_record("epoch", EpochRecord(epoch, epoch_window.mean_loss, skipped))
        if epoch_window.correct is not None:
            logger.info("epoch total correct predictions=%d", epoch_window.correct)
        self._validate_and_save(epoch, 0)

    def optimizer_step(self, scheduler) -> float:
        """All-reduce, unscale, clip, step; returns the total gradient norm before clipping. An update in which no
        process backpropagated (every question of it skipped) leaves the weights and the optimizer's moments as they
        are; the schedule advances, as it counts updates."""
        if not all_reduce_gradients(self.params):
            with warnings.catch_warnings():  # a schedule that advances past an update without a step is meant
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
                scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return 0.0
        scaler = self.precision.grad_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.settings.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record_step(self, epoch: int, window: _Window, grad_norm: float, seconds: float) -> None:
        tflops, mfu = self.flops.utilisation(window.flops, seconds)
        record = StepRecord(
            epoch=epoch, step=self.update, total_steps=self.total_updates, loss=window.mean_loss,
            lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
            questions_per_s=window.questions / max(seconds, 1e-9), seconds=seconds, tflops=tflops, mfu=mfu,
            masked_pairs=window.masked_pairs,
        )
        self.step_records.append(record)
        if record.step % self.settings.log_batch_step == 0 or record.step == 1:
            logger.info(
                "Epoch: %d: Step: %d/%d, loss=%f, lr=%.6e, grad_norm=%.6f, questions/s=%.1f, time=%.0fms, "
                "tflops=%.3f%s%s",
                epoch, record.step, record.total_steps, record.loss, record.lr, record.grad_norm,
                record.questions_per_s, 1000 * record.seconds, record.tflops,
                f", mfu={record.mfu:.2f}%" if record.mfu is not None else "",
                f", masked_pairs={record.masked_pairs}" if record.masked_pairs is not None else "",
            )
        for name in ("loss", "lr", "grad_norm", "questions_per_s", "masked_pairs"):
            if getattr(record, name) is not None:
                self.scalars.add(f"train/{name}", getattr(record, name), record.step)
        self._write_record("step", record)

    def _validate_and_save(self, epoch: int, offset: int) -> None:
        start = time.perf_counter()
        validation = self.validate(epoch)
        seconds = time.perf_counter() - start
        if validation is not None:
            logger.info("Validation took %.1f s", seconds)
            self.scalars.add(f"dev/{validation.metric}", validation.value, self.update)
            for name, value in validation.scalars.items():
                self.scalars.add(f"dev/{name}", value, self.update)
        path, best = None, False
        if self.dist.is_main:
            path = self.save(epoch, offset, self.scheduler)
            best = validation is not None and self._is_better(validation)
        record = ValidationRecord(
            epoch=epoch, offset=offset, step=self.update, metric=validation.metric if validation else None,
            value=validation.value if validation else None, seconds=seconds, checkpoint=path, best=best,
            scalars=dict(validation.scalars) if validation else {},
        )
        if best:
            self.best = record
            logger.info("New Best validation checkpoint %s", path)
        self.validation_records.append(record)
        self._write_record("validation", record)
        self.model.train()

    def _is_better(self, validation: Validation) -> bool:
        """Better than the best so far; a new metric (the bi-encoder's switch from NLL to average rank) starts a
        new tracker, as values of different metrics do not compare."""
        best = self.best
        if best is None or best.metric != validation.metric:
            return True
        return validation.value > best.value if validation.higher_is_better else validation.value < best.value

    def _write_record(self, kind: str, record) -> None:
        """One JSON line per record in output_dir, for plots and tools that should not parse the log."""
        if self.records_file and self.dist.is_main:
            fields = dataclasses.asdict(record)
            if fields.get("scalars") == {}:
                del fields["scalars"]
            with open(self.records_file, "a") as f:
                f.write(json.dumps({"kind": kind, **fields}) + "\n")

    def _evaluate_only(self) -> TrainingRun:
        ckpt = self.checkpoint
        records = []
        for validation in self.evaluate():
            records.append(ValidationRecord(
                epoch=ckpt.epoch if ckpt else 0, offset=ckpt.offset if ckpt else 0, step=0,
                metric=validation.metric, value=validation.value, seconds=0.0, checkpoint=self.checkpoint_file,
                best=False, scalars=dict(validation.scalars),
            ))
        return TrainingRun(None, [], records)

    # ---------------------------------------------------------------- checkpoints
    def check_checkpoint_tokenizer(self) -> None:
        """The checkpoint resumed or started from, refused with a tokenizer (`self.tensorizer`'s) that tokenizes
        otherwise than the one it was trained with (older checkpoints, DPR's: a warning)."""
        if self.checkpoint is not None:
            check_same_tokenizer(self.checkpoint.encoder_params.get("tokenizer"), self.tensorizer.tokenizer,
                                 self.spec.pretrained_model_cfg, f"the checkpoint {self.checkpoint_file}")

    def save(self, epoch: int, offset: int, scheduler) -> str:
        """A checkpoint named `{checkpoint_file_name}.{epoch}[.{offset}]` in output_dir."""
        state = CheckpointState(
            model_dict=self.model.state_dict(),
            optimizer_dict=self.optimizer.state_dict(),
            scheduler_dict=scheduler.state_dict(),
            offset=offset,
            epoch=epoch,
            # with the tokenizer's identity: embedding and retrieval refuse one that tokenizes otherwise
            encoder_params={**self.spec.checkpoint_params(), "tokenizer": tokenizer_identity(self.tensorizer.tokenizer)},
        )
        path = checkpoints.checkpoint_path(self.ckpt_settings.output_dir, self.ckpt_settings.file_name, epoch, offset)
        return checkpoints.save_checkpoint(path, state)
