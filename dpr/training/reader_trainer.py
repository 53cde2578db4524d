"""Extractive reader training and inference, on one or many processes; the loop is the Trainer base's
(dpr/training/trainer_base.py).

Training validates (EM on the dev questions) and saves a checkpoint every `eval_step` optimizer updates and at
the end of each epoch; the best checkpoint is the one with the highest EM (DPR and GC-DPR keep the lowest).
Without training files it runs inference: predictions for each eval_top_docs threshold, EM logged as
`n=<k>\tEM <value>` and, with prediction_results_file, DPR's prediction file.
"""
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dpr.data.batching import GlobalBatch, evaluation_batches, local_slice, training_batches
from dpr.data.data_files import expand_glob
from dpr.data.reader_data import (
    ReaderSample,
    SampleFileOptions,
    cached_sample_files,
    load_samples,
    make_eval_batch,
    make_train_batch,
    preprocess_retriever_results,
    sample_files,
    stale_samples_reason,
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
from dpr.foundation.errors import ConfigError
from dpr.models.reader import Reader, build_reader, reader_loss
from dpr.training.distributed import barrier
from dpr.training.trainer_base import BatchResult, Trainer, TrainingRun, Validation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReaderSettings:
    """The reader's own training and prediction settings, resolved once from the configuration."""

    seed: int
    passages_per_question: int
    passages_per_question_predict: int
    max_n_answers: int
    max_answer_length: int
    thresholds: Tuple[int, ...]  # eval_top_docs; without it, one prediction from all the passages read
    eval_step: int
    prediction_results_file: Optional[str]
    fully_resumable: bool
    combine_scores: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ReaderSettings":
        settings = cls(
            seed=int(cfg.seed),
            passages_per_question=int(cfg.passages_per_question),
            passages_per_question_predict=int(cfg.passages_per_question_predict),
            max_n_answers=int(cfg.max_n_answers),
            max_answer_length=int(cfg.max_answer_length),
            thresholds=tuple(int(n) for n in cfg.eval_top_docs) if cfg.eval_top_docs
            else (int(cfg.passages_per_question_predict),),
            eval_step=int(cfg.train.eval_step),
            prediction_results_file=cfg.prediction_results_file or None,
            fully_resumable=bool(cfg.fully_resumable),
            combine_scores=bool(cfg.get("combine_scores", False)),
        )
        if settings.eval_step < 1:
            raise ConfigError(f"train.eval_step={settings.eval_step} must be >= 1")
        if min(settings.passages_per_question, settings.passages_per_question_predict, settings.max_n_answers) < 1:
            raise ConfigError("passages_per_question(_predict) and max_n_answers must be >= 1")
        return settings


class ReaderTrainer(Trainer):
    def __init__(self, cfg: DictConfig):
        self.options = ReaderSettings.from_config(cfg)
        super().__init__(cfg, trains=bool(cfg.train_files))
        spec = self.spec
        given = [key for key in ("query_sequence_length", "query_prefix", "passage_prefix") if getattr(spec, key)]
        if given:
            raise ConfigError(f"encoder.{given[0]}={getattr(spec, given[0])!r} is a bi-encoder setting: the reader "
                              "reads question and passage as one sequence of encoder.sequence_length; leave it unset")
        self.tensorizer = Tensorizer.for_spec(spec)
        self.check_checkpoint_tokenizer()
        self.tokenizer = self.tensorizer.tokenizer
        # Data is read (and preprocessed if need be) before the model is built: a bad file fails early.
        self.train_samples = self._samples(cfg.train_files, is_train=True)
        self.dev_samples = self._samples(cfg.dev_files, is_train=False)

        self.model: Reader = build_reader(spec, self.tokenizer.sep_token_id,
                                          load_pretrained=self.checkpoint is None).to(self.device)
        self._prepare_model([(self.model.encoder, True)])

    def _samples(self, files: Union[None, str, Sequence[str]], is_train: bool) -> List[ReaderSample]:
        if not files:
            return []
        samples = load_samples(self._sample_files(files, is_train))
        if not samples:
            raise ConfigError(f"no {'training' if is_train else 'dev'} samples in {files}")
        return samples

    def _sample_files(self, files: Union[str, Sequence[str]], is_train: bool) -> List[str]:
        """Sample files as given, or those of the one retriever-results JSON given: reused when a previous run
        wrote them next to it ({dir}/{name}.{k}.*) from this very file with this tokenizer and length
        (`stale_samples_reason`), preprocessed by the main process otherwise."""
        patterns = [files] if isinstance(files, str) else list(files)
        matched = sorted({path for pattern in patterns for path in expand_glob(pattern)})
        if not matched:
            raise FileNotFoundError(f"no file matches {patterns}")
        found = sample_files(matched)
        if found:
            return found
        results = [path for path in matched if path.endswith(".json")]
        if len(results) != 1:
            raise ConfigError(f"expected sample files (.pkl/.npz) or exactly one retriever-results .json: {matched}")
        prefix = os.path.splitext(results[0])[0]
        options = SampleFileOptions.from_config(self.cfg)
        cached = cached_sample_files(prefix)
        stale = stale_samples_reason(results[0], prefix, is_train, options) if cached else None
        barrier()  # every process has looked before the main one rewrites anything
        if cached and stale is None:
            logger.info("Using the preprocessed samples of %s: %s", results[0], cached)
            return cached
        if stale is not None:
            logger.info("Preprocessing %s again: its earlier sample files are stale (%s)", results[0], stale)
        if self.dist.is_main:
            preprocess_retriever_results(results[0], prefix, is_train, options)
        barrier()
        return cached_sample_files(prefix)

    # ---------------------------------------------------------------- training
    def has_training_data(self) -> bool:
        return bool(self.train_samples)

    def epoch_batches(self, epoch: int) -> List[GlobalBatch]:
        global_batch = self.settings.batch_size * self.dist.world_size
        return training_batches([len(self.train_samples)], global_batch, self.options.seed, epoch)

    def train_step(self, batch: GlobalBatch, epoch: int, update: int) -> BatchResult:
        if self.options.fully_resumable:
            torch.manual_seed(self.options.seed + update)  # dropout masks as a function of the update
        questions = len(batch.indices)
        local = local_slice(batch, self.dist.rank, self.dist.world_size)
        loss, attention_mask, trained = self.forward_backward(local, epoch)
        return BatchResult(loss, questions, model_flops=self.flops.of_sequences(0, attention_mask),
                           skipped=len(local) - trained)

    def forward_backward(self, indices: np.ndarray, epoch: int) -> Tuple[float, torch.Tensor, int]:
        """Loss of this process's questions (summed, as DPR), gradients times self.backward_weight accumulated
        into .grad, the attention mask of the sequences encoded (their FLOPs) and the number of questions trained
        on (those with a usable positive); 0, an empty mask and 0 when none has one."""
        o = self.options
        rngs = [np.random.default_rng([o.seed, epoch, int(q)]) for q in indices]
        batch = make_train_batch(self.train_samples, indices, self.tensorizer, o.passages_per_question,
                                 o.max_n_answers, rngs)
        if batch is None:
            if len(indices):
                logger.warning("No question of this batch has a usable positive passage; skipped")
            return 0.0, torch.zeros(0, 0), 0
        batch = batch.to(self.device)
        with self.precision.autocast():
            start_logits, end_logits, relevance_logits = self.model(batch.input_ids, batch.attention_mask)
        loss = reader_loss(batch.start_positions, batch.end_positions, batch.answers_mask,
                           start_logits, end_logits, relevance_logits)
        weighted = loss * self.backward_weight
        scaler = self.precision.grad_scaler
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        return float(loss.detach()), batch.attention_mask, len(batch.questions)

    def validation_due(self, epoch_update: int, update: int, updates_per_epoch: int) -> bool:
        """DPR's: every eval_step updates, counted over the whole training."""
        return update % self.options.eval_step == 0

    def describe_setup(self, batches_per_epoch: int, total_updates: int) -> str:
        s, world = self.settings, self.dist.world_size
        return (
            f"World size {world}; {s.batch_size} questions per process, {s.batch_size * world} global, "
            f"{self.options.passages_per_question} passages each; {batches_per_epoch} batches per epoch, "
            f"{total_updates} updates in all; precision {self.precision.name}; gradient compensation "
            f"{self.gradient_compensation():g}; validation every {self.options.eval_step} updates"
        )

    # ---------------------------------------------------------------- validation
    def validate(self, epoch: int) -> Optional[Validation]:
        """EM at each threshold; the best checkpoint is the one with the highest EM at the last threshold (DPR
        and GC-DPR keep the lowest)."""
        if not self.dev_samples:
            return None
        ems = self.exact_match()
        last = self.options.thresholds[-1]
        return Validation(f"em_top{last}", ems[last], higher_is_better=True,
                          scalars={f"em_top{n}": value for n, value in ems.items()})

    def evaluate(self) -> List[Validation]:
        if not self.dev_samples:
            raise ConfigError("nothing to do: give train_files, or dev_files (and model_file) for inference")
        if self.checkpoint is None:
            logger.warning("No model_file: evaluating the untrained reader (pretrained encoder, random heads)")
        return [self.validate(0)]

    @torch.no_grad()
    def exact_match(self) -> Dict[int, float]:
        """Predictions on the dev questions; returns EM (%) per eval_top_docs threshold."""
        o, world = self.options, self.dist.world_size
        self.model.eval()
        thresholds = list(o.thresholds)
        records: List[Tuple[int, dict]] = []
        for gb in evaluation_batches(len(self.dev_samples), self.settings.dev_batch_size * world):
            indices = local_slice(gb, self.dist.rank, world)
            if len(indices) == 0:
                continue
            batch = make_eval_batch(self.dev_samples, indices, self.tensorizer, o.passages_per_question_predict)
            batch = batch.to(self.device)
            with self.precision.autocast():
                start_logits, end_logits, relevance_logits = self.model(batch.input_ids, batch.attention_mask)
            start_logits, end_logits = start_logits.float().cpu().numpy(), end_logits.float().cpu().numpy()
            relevance_logits = relevance_logits.float().cpu().numpy()
            for row, q in enumerate(batch.questions):
                sample = self.dev_samples[q]
                nbest = question_nbest(sample.passages[: o.passages_per_question_predict], start_logits[row],
                                       end_logits[row], relevance_logits[row], self.tokenizer, o.max_answer_length)
                predictions = select_predictions(nbest, thresholds, o.combine_scores)
                records.append((q, prediction_record(sample.question, sample.answers, predictions, self.tokenizer)))
        ordered = [record for _, record in sorted(_gather(records), key=lambda item: item[0])]
        ems = exact_match_by_top_k(ordered)
        log_exact_match(ems)
        if o.prediction_results_file and self.dist.is_main:
            write_predictions(o.prediction_results_file, ordered)
        return ems


def _gather(items: list) -> list:
    """Every process's items, concatenated (the local list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def run_training(cfg: DictConfig) -> TrainingRun:
    """Train the reader (or, without train_files, run inference) as the configuration says."""
    logger.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    return ReaderTrainer(cfg).run()
