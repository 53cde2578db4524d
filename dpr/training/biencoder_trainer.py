"""Bi-encoder training: DPR's loop with GC-DPR's gradient cache, on one or many processes."""
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dpr.data.batching import evaluation_batches, local_slice, training_batches
from dpr.data.biencoder_batch import BiEncoderBatch, make_biencoder_batch
from dpr.data.biencoder_data import BiEncoderSample, load_biencoder_samples
from dpr.data.tensorizer import Tensorizer
from dpr.models.biencoder import BiEncoder, build_biencoder, nll_loss
from dpr.models.hf_encoder import load_tokenizer
from dpr.foundation import checkpoints
from dpr.models.encoder_spec import EncoderSpec, apply_encoder_params
from dpr.training.distributed import (
    all_gather_rows,
    all_reduce_sum,
    init_distributed,
)
from dpr.training.flops import FlopsCounter
from dpr.training.grad_cache import GradCache, Tower, full_batch_step
from dpr.training.optim import build_scheduler
from dpr.training.trainer_base import Trainer
from dpr.foundation.errors import UserInputError
from dpr.foundation.seed import set_seed
from dpr.foundation.tensorboard import ScalarLog

logger = logging.getLogger(__name__)


class ConfigError(UserInputError, ValueError):
    """A configuration value that cannot work, named with the way out."""


def resolve_dataset_files(names: Optional[Sequence[str]], cfg: DictConfig) -> List[List[str]]:
    """Each entry of train_datasets / dev_datasets as a list of file patterns: a name of conf/datasets resolves
    through its resource key, anything else is a path or glob."""
    if not names:
        return []
    if isinstance(names, str):
        names = [names]
    resolved = []
    for name in names:
        entry = cfg.datasets.get(name) if cfg.get("datasets") else None
        target = entry.file if entry is not None else name
        if entry is None and (os.path.exists(target) or any(c in target for c in "*?[")):
            resolved.append([target])
            continue
        from dpr.data.resources import resolve_data_path

        resolved.append(resolve_data_path(target, cfg.get("data_dir")))
    return resolved


def load_datasets(names, cfg: DictConfig, kind: str) -> List[List[BiEncoderSample]]:
    datasets = [load_biencoder_samples(files) for files in resolve_dataset_files(names, cfg)]
    for name, samples in zip(names or [], datasets):
        if not samples:
            raise ConfigError(f"{kind} dataset '{name}' has no usable sample (each needs a question and a positive)")
    return datasets


@dataclass
class StepResult:
    loss: float
    correct: int
    questions: int


class BiEncoderTrainer(Trainer):
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dist = init_distributed(cfg.get("local_rank"), cfg.get("no_cuda", False))
        self.device = self.dist.device
        if not self.dist.is_main:
            logging.getLogger("dpr").setLevel(logging.WARNING)  # one process speaks for all
        set_seed(cfg.seed)
        self._check_config()

        self.checkpoint = self._find_checkpoint()
        if self.checkpoint is not None:
            apply_encoder_params(cfg, self.checkpoint.encoder_params)

        tokenizer = load_tokenizer(cfg.encoder.pretrained_model_cfg, cfg.do_lower_case)
        self.tensorizer = Tensorizer(tokenizer, cfg.encoder.sequence_length, cfg.encoder.get("pad_to_max", False))
        # Data is read and checked before the model is built: a bad file fails in seconds, not minutes.
        self.train_sets = load_datasets(cfg.train_datasets, cfg, "training")
        dev_sets = load_datasets(cfg.dev_datasets, cfg, "dev")
        self.dev_set = [s for d in dev_sets for s in d]

        self.model: BiEncoder = build_biencoder(EncoderSpec.from_config(cfg.encoder, cfg.do_lower_case)).to(self.device)
        self._prepare_model()
        t = cfg.train
        self.grad_factor = 1.0 / t.grad_compensation_ref_world if t.get("grad_compensation_ref_world") else 1.0
        self.grad_cache = GradCache(self._global_loss, self.precision.autocast, self.precision.grad_scaler)
        self.flops = FlopsCounter(self.model, self.device, self.precision.name, t.get("peak_tflops"))
        self.scalars = ScalarLog(
            os.path.join(cfg.output_dir, "tensorboard") if cfg.output_dir else None, enabled=self.dist.is_main
        )
        self.best_value: Optional[float] = None
        self.best_checkpoint: Optional[str] = None
        self.av_rank_started = False

    # ---------------------------------------------------------------- set-up
    def _check_config(self) -> None:
        t = self.cfg.train
        if self.cfg.train_datasets and not self.cfg.output_dir:
            raise ConfigError("output_dir is required for training (checkpoints are written there)")
        if t.batch_size < 1 or t.gradient_accumulation_steps < 1:
            raise ConfigError("train.batch_size and train.gradient_accumulation_steps must be >= 1")
        if t.grad_cache and (t.q_chunk_size < 1 or t.ctx_chunk_size < 1):
            raise ConfigError("train.q_chunk_size and train.ctx_chunk_size must be >= 1")

    def _log_setup(self, batches_per_epoch: int, total_updates: int) -> None:
        t, world = self.cfg.train, self.dist.world_size
        logger.info(
            "World size %d; batch %d per process, %d global; %d batches (%d updates) per epoch, %d updates in all",
            world, t.batch_size, t.batch_size * world, batches_per_epoch,
            batches_per_epoch // t.gradient_accumulation_steps, total_updates,
        )
        logger.info(
            "Gradient cache: %s; precision %s; gradient scale %g (grad_compensation_ref_world=%s); "
            "example dropout %s; hard negatives %d, other negatives %d",
            f"on, chunks q={t.q_chunk_size} ctx={t.ctx_chunk_size}" if t.grad_cache else "off",
            self.precision.name, self.grad_factor, t.get("grad_compensation_ref_world"),
            "on" if t.get("example_dropout", True) else "off", t.hard_negatives, t.other_negatives,
        )

    # ---------------------------------------------------------------- the loss
    def _global_loss(self, q: torch.Tensor, ctx: torch.Tensor, positive_indices: torch.Tensor, scale: float = 1.0):
        """The loss of the global batch, the same on every process; gradients reach this process's rows only."""
        q_all = torch.cat(all_gather_rows(q))
        ctx_parts = all_gather_rows(ctx)
        positive_parts = all_gather_rows(positive_indices)
        offsets = [0]
        for part in ctx_parts[:-1]:
            offsets.append(offsets[-1] + part.shape[0])
        positives = torch.cat([p + o for p, o in zip(positive_parts, offsets)])
        encoder = self.cfg.encoder
        loss, correct = nll_loss(q_all, torch.cat(ctx_parts), positives, encoder.similarity, encoder.temperature)
        return loss * scale, correct

    def _towers(self, batch: BiEncoderBatch) -> List[Tower]:
        t = self.cfg.train
        use_seeds = t.get("example_dropout", True)
        model = self.model

        def inputs(ids, mask, seeds):
            out = {"input_ids": ids, "attention_mask": mask}
            if use_seeds and seeds is not None:
                out["seeds"] = seeds
            return out

        q_grad, ctx_grad = model.trainable_towers()
        return [
            Tower(lambda c: model.encode_questions(c["input_ids"], c["attention_mask"], c.get("seeds")),
                  inputs(batch.question_ids, batch.question_mask, batch.question_seeds), t.q_chunk_size, q_grad),
            Tower(lambda c: model.encode_contexts(c["input_ids"], c["attention_mask"], c.get("seeds")),
                  inputs(batch.context_ids, batch.context_mask, batch.context_seeds), t.ctx_chunk_size, ctx_grad),
        ]

    def forward_backward(self, batch: BiEncoderBatch) -> StepResult:
        """Loss and gradients of one batch (accumulated into .grad), with or without the gradient cache."""
        t = self.cfg.train
        batch = batch.to(self.device)
        towers = self._towers(batch)
        scale = self._loss_scale_factor(batch.dataset_index)
        backward_scale = self.grad_factor / t.gradient_accumulation_steps
        if t.grad_cache:
            loss, correct = self.grad_cache(towers, backward_scale, positive_indices=batch.positive_indices, scale=scale)
        else:
            loss, correct = full_batch_step(
                towers, self._global_loss, backward_scale, self.precision.autocast, self.precision.grad_scaler,
                positive_indices=batch.positive_indices, scale=scale,
            )
        self.flops.add_batch(batch)
        return StepResult(float(loss), correct, batch.question_ids.shape[0] * self.dist.world_size)

    def _loss_scale_factor(self, dataset_index: int) -> float:
        factors = self.cfg.get("loss_scale_factors")
        return float(factors[dataset_index]) if factors else 1.0

    # ---------------------------------------------------------------- training loop
    def run(self) -> Optional[str]:
        cfg, t = self.cfg, self.cfg.train
        if not self.train_sets:
            if self.checkpoint is None or not self.dev_set:
                raise ConfigError("nothing to do: give train_datasets, or model_file and dev_datasets to validate")
            logger.info("No training data: validating %s only", cfg.model_file)
            self.validate_nll()
            self.validate_average_rank()
            return None

        world = self.dist.world_size
        global_batch = t.batch_size * world
        sizes = [len(d) for d in self.train_sets]
        rates = cfg.get("train_sampling_rates")
        batches_per_epoch = len(training_batches(sizes, global_batch, cfg.seed, 0, rates))
        if batches_per_epoch == 0:
            raise ConfigError(
                f"the training data ({sum(sizes)} questions) is smaller than one global batch of {global_batch}"
            )
        updates_per_epoch = max(1, batches_per_epoch // t.gradient_accumulation_steps)
        epochs = int(t.num_train_epochs)
        total_updates = updates_per_epoch * epochs
        eval_every = max(1, math.ceil(updates_per_epoch / t.eval_per_epoch)) * t.gradient_accumulation_steps

        start_epoch, start_batch, completed_updates = self._restore_training_state()
        scheduler = build_scheduler(self.optimizer, t.warmup_steps, total_updates, completed_updates)
        self._log_setup(batches_per_epoch, total_updates)
        self.model.train()
        update = completed_updates
        for epoch in range(start_epoch, epochs):
            epoch_loss, epoch_correct, epoch_batches = 0.0, 0, 0
            rolling_loss, rolling_batches = 0.0, 0
            pending_loss, pending = 0.0, 0
            batches = training_batches(sizes, global_batch, cfg.seed, epoch, rates)
            first = start_batch if epoch == start_epoch else 0
            progress = tqdm(
                total=len(batches), initial=first, desc=f"epoch {epoch}", unit="batch",
                disable=not (self.dist.is_main and sys.stderr.isatty()),
            )
            timer = time.perf_counter()
            for i in range(first, len(batches)):
                gb = batches[i]
                batch = make_biencoder_batch(
                    self.train_sets[gb.dataset_index], local_slice(gb, self.dist.rank, world), self.tensorizer,
                    t.hard_negatives, t.other_negatives, shuffle=True, seed=cfg.seed, epoch=epoch,
                    shuffle_positives=cfg.get("shuffle_positive_ctx", False), dataset_index=gb.dataset_index,
                )
                result = self.forward_backward(batch)
                epoch_loss += result.loss
                epoch_correct += result.correct
                epoch_batches += 1
                rolling_loss += result.loss
                rolling_batches += 1
                pending_loss += result.loss
                pending += 1
                progress.update(1)
                if (i + 1) % t.gradient_accumulation_steps == 0:
                    grad_norm = self.optimizer_step(scheduler)
                    update += 1
                    if update % t.log_batch_step == 0 or update == 1:
                        elapsed = time.perf_counter() - timer
                        self._log_step(epoch, update, total_updates, pending_loss / pending, scheduler, grad_norm,
                                       pending * global_batch / max(elapsed, 1e-9), elapsed)
                    self.scalars.add("train/loss", pending_loss / pending, update)
                    self.scalars.add("train/lr", scheduler.get_last_lr()[0], update)
                    self.scalars.add("train/grad_norm", grad_norm, update)
                    pending_loss, pending = 0.0, 0
                    timer = time.perf_counter()
                    self.flops.reset()
                if rolling_batches == t.train_rolling_loss_step:
                    logger.info("Avg. loss per last %d batches: %f", rolling_batches, rolling_loss / rolling_batches)
                    rolling_loss, rolling_batches = 0.0, 0
                if (i + 1) % eval_every == 0 and i + 1 < len(batches):
                    self.validate_and_save(epoch, i + 1, scheduler, update)
                    self.model.train()
                    timer = time.perf_counter()  # throughput counts training only
            progress.close()
            logger.info("Av Loss per epoch=%f", epoch_loss / max(1, epoch_batches))
            logger.info("epoch total correct predictions=%d", epoch_correct)
            self.validate_and_save(epoch, 0, scheduler, update)
            self.model.train()
        logger.info("Training finished. Best validation checkpoint %s", self.best_checkpoint)
        self.scalars.close()
        return self.best_checkpoint

    def _log_step(self, epoch, update, total, loss, scheduler, grad_norm, questions_per_s, elapsed) -> None:
        lr = scheduler.get_last_lr()[0]
        logger.info(
            "Epoch: %d: Step: %d/%d, loss=%f, lr=%.6e, grad_norm=%.6f, questions/s=%.1f, %s",
            epoch, update, total, loss, lr, grad_norm, questions_per_s, self.flops.report(elapsed),
        )

    # ---------------------------------------------------------------- validation and checkpoints
    def validate_and_save(self, epoch: int, offset: int, scheduler, update: int) -> Optional[str]:
        cfg = self.cfg
        value = None
        if self.dev_set:
            if epoch >= cfg.val_av_rank_start_epoch:
                if not self.av_rank_started:
                    self.best_value, self.av_rank_started = None, True  # NLL and ranks do not compare
                value = self.validate_average_rank()
            else:
                value = self.validate_nll()
            self.scalars.add("dev/validation", value, update)
        path = None
        if self.dist.is_main:
            path = self.save(epoch, offset, scheduler)
            if value is not None and (self.best_value is None or value < self.best_value):
                self.best_value, self.best_checkpoint = value, path
                logger.info("New Best validation checkpoint %s", path)
        return path

    def _dev_batches(self, hard_negatives: int, other_negatives: int):
        t, world = self.cfg.train, self.dist.world_size
        for gb in evaluation_batches(len(self.dev_set), t.dev_batch_size * world):
            yield make_biencoder_batch(
                self.dev_set, local_slice(gb, self.dist.rank, world), self.tensorizer,
                hard_negatives, other_negatives, shuffle=False,
            ).to(self.device)

    @torch.no_grad()
    def validate_nll(self) -> float:
        t = self.cfg.train
        self.model.eval()
        total_loss, correct, batches, questions = 0.0, 0, 0, 0
        for batch in self._dev_batches(t.hard_negatives, t.other_negatives):
            with self.precision.autocast():
                q = self.model.encode_questions(batch.question_ids, batch.question_mask)
                ctx = self.model.encode_contexts(batch.context_ids, batch.context_mask)
            loss, batch_correct = self._global_loss(q.float(), ctx.float(), batch.positive_indices)
            total_loss += float(loss)
            correct += batch_correct
            batches += 1
            questions += int(all_reduce_sum([float(q.shape[0])], self.device)[0])
        loss = total_loss / max(1, batches)
        logger.info("NLL Validation: loss = %f. correct prediction ratio  %d/%d ~  %f",
                    loss, correct, questions, correct / max(1, questions))
        return loss

    @torch.no_grad()
    def validate_average_rank(self) -> float:
        """DPR's average-rank validation: the 0-based rank of each question's gold passage among the contexts
        (gold, 30 hard and 30 other negatives per question) of the questions this process collected."""
        t = self.cfg.train
        self.model.eval()
        limit = t.val_av_rank_max_qs // self.dist.world_size
        q_reps, ctx_reps, positives = [], [], []
        n_ctx = 0
        for batch in self._dev_batches(t.val_av_rank_hard_neg, t.val_av_rank_other_neg):
            with self.precision.autocast():
                q_reps.append(self.model.encode_questions(batch.question_ids, batch.question_mask).float())
                for s in range(0, batch.context_ids.shape[0], t.val_av_rank_bsz):
                    ctx_reps.append(self.model.encode_contexts(
                        batch.context_ids[s : s + t.val_av_rank_bsz], batch.context_mask[s : s + t.val_av_rank_bsz]
                    ).float())
            positives.append(batch.positive_indices + n_ctx)
            n_ctx += batch.context_ids.shape[0]
            if sum(r.shape[0] for r in q_reps) > limit:
                break
        rank_sum, q_num = 0.0, 0.0
        if q_reps:
            q, ctx, pos = torch.cat(q_reps), torch.cat(ctx_reps), torch.cat(positives)
            scores = q @ ctx.T
            gold = scores.gather(1, pos.unsqueeze(1))
            rank_sum, q_num = float((scores > gold).sum()), float(q.shape[0])
        rank_sum, q_num = all_reduce_sum([rank_sum, q_num], self.device)
        av_rank = rank_sum / max(1.0, q_num)
        logger.info("Av.rank validation: average rank %s, total questions=%d", av_rank, int(q_num))
        return av_rank


def run_training(cfg: DictConfig) -> Optional[str]:
    """Train (or, without training data, validate) as the configuration says; returns the best checkpoint."""
    logger.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    return BiEncoderTrainer(cfg).run()
