"""Extractive reader training and inference: DPR's loop, on one or many processes.

Training validates (EM on the dev questions) and saves a checkpoint every `eval_step` optimizer updates and at
the end of each epoch; the best checkpoint is the one with the highest EM (DPR and GC-DPR keep the lowest).
Without training files it runs inference: predictions for each eval_top_docs threshold, EM logged as
`n=<k>\tEM <value>` and, with prediction_results_file, DPR's prediction file.
"""
import glob
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dpr.data.batching import evaluation_batches, local_slice, training_batches
from dpr.data.reader_data import (
    ReaderPreprocessingCfg,
    ReaderSample,
    cached_sample_files,
    convert_retriever_results,
    load_samples,
    make_eval_batch,
    make_train_batch,
    sample_files,
)
from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.reader_predictions import (
    exact_match_by_top_k,
    log_exact_match,
    prediction_record,
    question_nbest,
    select_predictions,
    write_predictions,
)
from dpr.models.hf_encoder import load_tokenizer
from dpr.models.reader import Reader, build_reader, reader_loss
from dpr.foundation import checkpoints
from dpr.models.encoder_spec import apply_encoder_params
from dpr.training.biencoder_trainer import ConfigError
from dpr.training.trainer_base import Trainer
from dpr.training.distributed import barrier, init_distributed
from dpr.training.optim import build_scheduler
from dpr.foundation.seed import set_seed
from dpr.foundation.tensorboard import ScalarLog

logger = logging.getLogger(__name__)


class ReaderTrainer(Trainer):
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dist = init_distributed(cfg.get("local_rank"), cfg.get("no_cuda", False))
        self.device = self.dist.device
        set_seed(cfg.seed)
        self._check_config()

        self.checkpoint = self._find_checkpoint()
        if self.checkpoint is not None:
            apply_encoder_params(cfg, self.checkpoint.encoder_params)

        self.tokenizer = load_tokenizer(cfg.encoder.pretrained_model_cfg, cfg.do_lower_case)
        self.tensorizer = Tensorizer(self.tokenizer, cfg.encoder.sequence_length, cfg.encoder.get("pad_to_max", False))
        # Data is read (and preprocessed if need be) before the model is built: a bad file fails early.
        self.train_samples = self._samples(cfg.train_files, is_train=True)
        self.dev_samples = self._samples(cfg.dev_files, is_train=False)

        sep = self.tokenizer.sep_token_id if cfg.encoder.get("token_type_ids", False) else None
        self.model: Reader = build_reader(cfg.encoder, sep, pretrained=self.checkpoint is None).to(self.device)
        self._prepare_model()
        self.scalars = ScalarLog(
            os.path.join(cfg.output_dir, "tensorboard") if cfg.output_dir else None, enabled=self.dist.is_main
        )
        self.best_em: Optional[float] = None
        self.best_checkpoint: Optional[str] = None

    # ---------------------------------------------------------------- set-up
    def _check_config(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if cfg.train_files and not cfg.output_dir:
            raise ConfigError("output_dir is required for training (checkpoints are written there)")
        if t.batch_size < 1 or t.gradient_accumulation_steps < 1 or t.eval_step < 1:
            raise ConfigError("train.batch_size, train.gradient_accumulation_steps and train.eval_step must be >= 1")
        if cfg.passages_per_question < 1 or cfg.passages_per_question_predict < 1 or cfg.max_n_answers < 1:
            raise ConfigError("passages_per_question(_predict) and max_n_answers must be >= 1")

    def _samples(self, files: Union[None, str, Sequence[str]], is_train: bool) -> List[ReaderSample]:
        if not files:
            return []
        samples = load_samples(self._sample_files(files, is_train))
        if not samples:
            raise ConfigError(f"no {'training' if is_train else 'dev'} samples in {files}")
        return samples

    def _sample_files(self, files: Union[str, Sequence[str]], is_train: bool) -> List[str]:
        """Sample files as given, or those of the one retriever-results JSON given: reused when a previous run
        wrote them next to it ({dir}/{name}.{k}.*), preprocessed by the main process otherwise."""
        patterns = [files] if isinstance(files, str) else list(files)
        matched = sorted({path for pattern in patterns for path in glob.glob(pattern)})
        if not matched:
            raise FileNotFoundError(f"no file matches {patterns}")
        found = sample_files(matched)
        if found:
            return found
        results = [path for path in matched if path.endswith(".json")]
        if len(results) != 1:
            raise ConfigError(f"expected sample files (.pkl/.npz) or exactly one retriever-results .json: {matched}")
        prefix = os.path.splitext(results[0])[0]
        cached = cached_sample_files(prefix)
        if cached:
            logger.info("Using the preprocessed samples of %s: %s", results[0], cached)
            return cached
        if self.dist.is_main:
            cfg = self.cfg
            gold = cfg.gold_passages_src if is_train else cfg.gold_passages_src_dev
            convert_retriever_results(is_train, results[0], prefix, self.tensorizer, gold, cfg.num_workers,
                                      tuple(cfg.sample_formats), ReaderPreprocessingCfg())
        barrier()
        return cached_sample_files(prefix)

    # ---------------------------------------------------------------- training
    def forward_backward(self, indices: np.ndarray, epoch: int) -> float:
        """Loss of this process's questions (summed, as DPR), gradients accumulated into .grad; 0 when none of
        them has a usable positive."""
        cfg, t = self.cfg, self.cfg.train
        rngs = [np.random.default_rng([cfg.seed, epoch, int(q)]) for q in indices]
        batch = make_train_batch(self.train_samples, indices, self.tensorizer, cfg.passages_per_question,
                                 cfg.max_n_answers, rngs)
        if batch is None:
            logger.warning("No question of this batch has a usable positive passage; skipped")
            return 0.0
        batch = batch.to(self.device)
        with self.precision.autocast():
            start_logits, end_logits, relevance_logits = self.model(batch.input_ids, batch.attention_mask)
        loss = reader_loss(batch.start_positions, batch.end_positions, batch.answers_mask,
                           start_logits, end_logits, relevance_logits)
        # Gradients are summed over processes: dividing by the world size gives DDP's mean, as DPR trains.
        scaled = loss / (t.gradient_accumulation_steps * self.dist.world_size)
        scaler = self.precision.grad_scaler
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return float(loss.detach())

    def run(self) -> Optional[str]:
        """Train, or without training files evaluate; returns the best checkpoint (None for inference)."""
        cfg, t = self.cfg, self.cfg.train
        if not self.train_samples:
            if not self.dev_samples:
                raise ConfigError("nothing to do: give train_files, or dev_files (and model_file) for inference")
            if self.checkpoint is None:
                logger.warning("No model_file: evaluating the untrained reader (pretrained encoder, random heads)")
            self.validate()
            return None

        world = self.dist.world_size
        global_batch = t.batch_size * world
        n_questions = len(self.train_samples)
        batches_per_epoch = len(training_batches([n_questions], global_batch, cfg.seed, 0))
        if batches_per_epoch == 0:
            raise ConfigError(f"the training data ({n_questions} questions) is smaller than one global batch of "
                              f"{global_batch}")
        updates_per_epoch = max(1, batches_per_epoch // t.gradient_accumulation_steps)
        epochs = int(t.num_train_epochs)
        total_updates = updates_per_epoch * epochs
        start_epoch, start_batch, completed_updates = self._restore_training_state()
        scheduler = build_scheduler(self.optimizer, t.warmup_steps, total_updates, completed_updates)
        logger.info(
            "World size %d; %d questions per process, %d global, %d passages each; %d batches per epoch; "
            "precision %s; validation every %d updates",
            world, t.batch_size, global_batch, cfg.passages_per_question, batches_per_epoch, self.precision.name,
            t.eval_step,
        )
        self.model.train()
        update = completed_updates
        for epoch in range(start_epoch, epochs):
            update = self._train_epoch(epoch, start_batch if epoch == start_epoch else 0, scheduler, update,
                                       total_updates)
        logger.info("Training finished. Best validation checkpoint %s", self.best_checkpoint)
        self.scalars.close()
        return self.best_checkpoint

    def _train_epoch(self, epoch: int, first: int, scheduler, update: int, total_updates: int) -> int:
        cfg, t = self.cfg, self.cfg.train
        batches = training_batches([len(self.train_samples)], t.batch_size * self.dist.world_size, cfg.seed, epoch)
        epoch_loss, epoch_batches, rolling_loss, rolling_batches, pending_loss, pending = 0.0, 0, 0.0, 0, 0.0, 0
        progress = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch}", unit="batch",
                        disable=not (self.dist.is_main and sys.stderr.isatty()))
        timer = time.perf_counter()
        for i in range(first, len(batches)):
            if cfg.fully_resumable:
                torch.manual_seed(cfg.seed + update)  # dropout masks as a function of the update
            loss = self.forward_backward(local_slice(batches[i], self.dist.rank, self.dist.world_size), epoch)
            epoch_loss, epoch_batches = epoch_loss + loss, epoch_batches + 1
            rolling_loss, rolling_batches = rolling_loss + loss, rolling_batches + 1
            pending_loss, pending = pending_loss + loss, pending + 1
            progress.update(1)
            if (i + 1) % t.gradient_accumulation_steps == 0:
                grad_norm = self.optimizer_step(scheduler)
                update += 1
                if update % t.log_batch_step == 0 or update == 1:
                    elapsed = time.perf_counter() - timer
                    logger.info("Epoch: %d: Step: %d/%d, loss=%f, lr=%.6e, grad_norm=%.6f, questions/s=%.1f",
                                epoch, update, total_updates, pending_loss / pending, scheduler.get_last_lr()[0],
                                grad_norm, pending * t.batch_size * self.dist.world_size / max(elapsed, 1e-9))
                self.scalars.add("train/loss", pending_loss / pending, update)
                self.scalars.add("train/lr", scheduler.get_last_lr()[0], update)
                pending_loss, pending, timer = 0.0, 0, time.perf_counter()
                if update % t.eval_step == 0 and i + 1 < len(batches):
                    self.validate_and_save(epoch, i + 1, scheduler, update)
                    self.model.train()
            if rolling_batches == t.train_rolling_loss_step:
                logger.info("Avg. loss per last %d batches: %f", rolling_batches, rolling_loss / rolling_batches)
                rolling_loss, rolling_batches = 0.0, 0
        progress.close()
        logger.info("Av Loss per epoch=%f", epoch_loss / max(1, epoch_batches))
        self.validate_and_save(epoch, 0, scheduler, update)
        self.model.train()
        return update

    # ---------------------------------------------------------------- validation and checkpoints
    def validate_and_save(self, epoch: int, offset: int, scheduler, update: int) -> Optional[str]:
        em = None
        if self.dev_samples:
            ems = self.validate()
            for n, value in ems.items():
                self.scalars.add(f"dev/em_top{n}", value, update)
            em = ems[self.thresholds()[-1]]
        path = None
        if self.dist.is_main:
            path = self.save(epoch, offset, scheduler)
            if em is not None and (self.best_em is None or em > self.best_em):
                self.best_em, self.best_checkpoint = em, path
                logger.info("New Best validation checkpoint %s", path)
        return path

    def thresholds(self) -> List[int]:
        """eval_top_docs; without it, one prediction from all the passages read."""
        top_docs = self.cfg.eval_top_docs
        return [int(n) for n in top_docs] if top_docs else [int(self.cfg.passages_per_question_predict)]

    @torch.no_grad()
    def validate(self) -> Dict[int, float]:
        """Predictions on the dev questions; returns EM (%) per eval_top_docs threshold."""
        cfg, t, world = self.cfg, self.cfg.train, self.dist.world_size
        self.model.eval()
        thresholds = self.thresholds()
        records: List[Tuple[int, dict]] = []
        for gb in evaluation_batches(len(self.dev_samples), t.dev_batch_size * world):
            indices = local_slice(gb, self.dist.rank, world)
            if len(indices) == 0:
                continue
            batch = make_eval_batch(self.dev_samples, indices, self.tensorizer, cfg.passages_per_question_predict)
            batch = batch.to(self.device)
            with self.precision.autocast():
                start_logits, end_logits, relevance_logits = self.model(batch.input_ids, batch.attention_mask)
            start_logits, end_logits = start_logits.float().cpu().numpy(), end_logits.float().cpu().numpy()
            relevance_logits = relevance_logits.float().cpu().numpy()
            for row, q in enumerate(batch.questions):
                sample = self.dev_samples[q]
                nbest = question_nbest(sample.passages[: cfg.passages_per_question_predict], start_logits[row],
                                       end_logits[row], relevance_logits[row], self.tokenizer, cfg.max_answer_length)
                predictions = select_predictions(nbest, thresholds, cfg.get("combine_scores", False))
                records.append((q, prediction_record(sample.question, sample.answers, predictions, self.tokenizer)))
        ordered = [record for _, record in sorted(_gather(records), key=lambda item: item[0])]
        ems = exact_match_by_top_k(ordered)
        log_exact_match(ems)
        if cfg.prediction_results_file and self.dist.is_main:
            write_predictions(cfg.prediction_results_file, ordered)
        return ems


def _gather(items: list) -> list:
    """Every process's items, concatenated (the local list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def run_training(cfg: DictConfig) -> Optional[str]:
    """Train the reader (or, without train_files, run inference) as the configuration says."""
    logger.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    return ReaderTrainer(cfg).run()
