"""Bi-encoder training: DPR's loss and validation with GC-DPR's gradient cache, on one or many processes; the
loop is the Trainer base's (dpr/training/trainer_base.py)."""
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dpr.data.batching import GlobalBatch, evaluation_batches, local_slice, training_batches
from dpr.data.biencoder_batch import BiEncoderBatch, make_biencoder_batch, sample_examples
from dpr.data.biencoder_data import BiEncoderSample, load_biencoder_samples
from dpr.data.passages import Passage
from dpr.data.resources import resolve_dataset
from dpr.data.tensorizer import Tensorizer
from dpr.evaluation.rank_metrics import MRR_NAME, recall_name
from dpr.foundation.config_values import one_of, true_or_false
from dpr.foundation.errors import ConfigError
from dpr.models.biencoder import BiEncoder, build_biencoder, nll_loss, similarity_scores
from dpr.training.distributed import all_gather_rows, all_reduce_sum
from dpr.training.false_negatives import IN_BATCH_NEGATIVES, FalseNegativeMask
from dpr.training.grad_cache import GradCache, Tower, full_batch_step
from dpr.training.retrieval_validation import (RetrievalCorpus, RetrievalValidationSettings, build_retrieval_corpus,
                                               local_part, ranking_sums)
from dpr.training.trainer_base import BatchResult, Trainer, TrainingRun, Validation

logger = logging.getLogger(__name__)


def resolve_dataset_files(names: Optional[Sequence[str]], cfg: DictConfig) -> List[List[str]]:
    """The files of each entry of train_datasets / dev_datasets: a name of conf/datasets, a path, a glob or a
    resource key."""
    if isinstance(names, str):
        names = [names]
    return [resolve_dataset(name, cfg.get("datasets"), cfg.get("data_dir")).files for name in names or []]


def load_datasets(names, cfg: DictConfig, kind: str) -> List[List[BiEncoderSample]]:
    datasets = [load_biencoder_samples(files) for files in resolve_dataset_files(names, cfg)]
    for name, samples in zip(names or [], datasets):
        if not samples:
            raise ConfigError(f"{kind} dataset '{name}' has no usable sample (each needs a question and a positive)")
    return datasets


@dataclass(frozen=True)
class BiEncoderSettings:
    """The bi-encoder's own training settings, resolved once from the configuration."""

    seed: int
    hard_negatives: int
    other_negatives: int
    shuffle_positives: bool
    sampling_rates: Optional[Tuple[float, ...]]  # per training dataset: batches taken from it per epoch
    dataset_loss_weights: Optional[Tuple[float, ...]]  # per training dataset: DPR's loss_scale_factors
    grad_cache: bool
    q_chunk_size: int
    ctx_chunk_size: int
    grad_compensation_ref_world: int  # 0: none
    example_dropout: bool
    compile_dropout: bool  # per-example dropout drawn by its compiled kernel (the same masks as the eager draw)
    in_batch_negatives: str  # all (DPR's), mask_duplicates or mask_answers (dpr/training/false_negatives.py)
    eval_per_epoch: int
    val_av_rank_start_epoch: int
    val_av_rank_hard_neg: int
    val_av_rank_other_neg: int
    val_av_rank_bsz: int
    val_av_rank_max_qs: int
    retrieval: Optional[RetrievalValidationSettings]  # None: DPR's average rank from val_av_rank_start_epoch on

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "BiEncoderSettings":
        t = cfg.train
        rates, weights = cfg.get("train_sampling_rates"), cfg.get("loss_scale_factors")
        settings = cls(
            seed=int(cfg.seed),
            hard_negatives=int(t.hard_negatives),
            other_negatives=int(t.other_negatives),
            shuffle_positives=bool(cfg.get("shuffle_positive_ctx", False)),
            sampling_rates=tuple(float(r) for r in rates) if rates else None,
            dataset_loss_weights=tuple(float(w) for w in weights) if weights else None,
            grad_cache=bool(t.grad_cache),
            q_chunk_size=int(t.q_chunk_size),
            ctx_chunk_size=int(t.ctx_chunk_size),
            grad_compensation_ref_world=int(t.get("grad_compensation_ref_world") or 0),
            example_dropout=bool(t.get("example_dropout", True)),
            compile_dropout=true_or_false("train.compile_dropout", t.compile_dropout),
            in_batch_negatives=one_of("train.in_batch_negatives", t.in_batch_negatives,
                                      IN_BATCH_NEGATIVES),
            eval_per_epoch=int(t.eval_per_epoch),
            val_av_rank_start_epoch=int(cfg.val_av_rank_start_epoch),
            val_av_rank_hard_neg=int(t.val_av_rank_hard_neg),
            val_av_rank_other_neg=int(t.val_av_rank_other_neg),
            val_av_rank_bsz=int(t.val_av_rank_bsz),
            val_av_rank_max_qs=int(t.val_av_rank_max_qs),
            retrieval=RetrievalValidationSettings.from_config(t),
        )
        if settings.grad_cache and (settings.q_chunk_size < 1 or settings.ctx_chunk_size < 1):
            raise ConfigError("train.q_chunk_size and train.ctx_chunk_size must be >= 1")
        for key in ("eval_per_epoch", "val_av_rank_bsz"):
            if getattr(settings, key) < 1:
                raise ConfigError(f"train.{key}={getattr(settings, key)} must be >= 1")
        if settings.grad_compensation_ref_world < 0:
            raise ConfigError("train.grad_compensation_ref_world must be a number of processes, or 0/null for none")
        return settings


class BiEncoderTrainer(Trainer):
    def __init__(self, cfg: DictConfig):
        self.options = BiEncoderSettings.from_config(cfg)
        super().__init__(cfg, trains=bool(cfg.train_datasets))
        spec = self.spec
        self.tensorizer = Tensorizer.for_biencoder(spec)
        self.check_checkpoint_tokenizer()
        # Data is read and checked before the model is built: a bad file fails in seconds, not minutes.
        self.train_sets = load_datasets(cfg.train_datasets, cfg, "training")
        self._check_dataset_lists(len(self.train_sets))
        self.dev_set = [s for d in load_datasets(cfg.dev_datasets, cfg, "dev") for s in d]
        self.retrieval_corpus: Optional[RetrievalCorpus] = None
        if self.options.retrieval is not None and self.dev_set:
            self.retrieval_corpus = build_retrieval_corpus(self.dev_set, self.options.retrieval)
            logger.info("Retrieval validation corpus (seed %d): %s", self.options.retrieval.seed,
                        self.retrieval_corpus.describe())

        self.model: BiEncoder = build_biencoder(spec, self.options.compile_dropout).to(self.device)
        self._prepare_model(list(zip((self.model.question_model, self.model.ctx_model), self.model.trainable_towers())))
        self.grad_cache = GradCache(self._global_loss, self.precision.autocast, self.precision.grad_scaler)
        self.false_negatives = FalseNegativeMask(self.options.in_batch_negatives)

    def _check_dataset_lists(self, datasets: int) -> None:
        o = self.options
        for key, values in (("train_sampling_rates", o.sampling_rates), ("loss_scale_factors", o.dataset_loss_weights)):
            if values is not None and len(values) != datasets:
                raise ConfigError(f"{key} has {len(values)} values for {datasets} train_datasets: give one per dataset")

    def gradient_compensation(self) -> float:
        """GC-DPR's: 1 / grad_compensation_ref_world (the trainer base's docstring has the rule)."""
        return 1.0 / (self.options.grad_compensation_ref_world or 1)

    def describe_setup(self, batches_per_epoch: int, total_updates: int) -> str:
        s, o, world = self.settings, self.options, self.dist.world_size
        return (
            f"World size {world}; batch {s.batch_size} per process, {s.batch_size * world} global; "
            f"{batches_per_epoch} batches ({batches_per_epoch // s.gradient_accumulation_steps} updates) per epoch, "
            f"{total_updates} updates in all. Gradient cache: "
            + (f"on, chunks q={o.q_chunk_size} ctx={o.ctx_chunk_size}" if o.grad_cache else "off")
            + f"; precision {self.precision.name}; gradient compensation {self.gradient_compensation():g} "
            f"(grad_compensation_ref_world={o.grad_compensation_ref_world or None}); "
            f"example dropout {('on, ' + ('compiled' if o.compile_dropout else 'eager')) if o.example_dropout else 'off'}; "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}; "
            f"similarity {self.spec.similarity}; in-batch negatives {o.in_batch_negatives}; "
            f"hard negatives {o.hard_negatives}, other negatives {o.other_negatives}"
        )

    def recipe_details(self) -> dict:
        o = self.options
        return {
            "grad_cache": o.grad_cache, "q_chunk_size": o.q_chunk_size if o.grad_cache else None,
            "ctx_chunk_size": o.ctx_chunk_size if o.grad_cache else None, "hard_negatives": o.hard_negatives,
            "other_negatives": o.other_negatives, "similarity": self.spec.similarity,
            "temperature": self.spec.temperature, "share_encoders": self.spec.share_encoders,
        }

    # ---------------------------------------------------------------- the loss
    def _global_loss(self, q: torch.Tensor, ctx: torch.Tensor, positive_indices: torch.Tensor,
                     loss_weight: float = 1.0, masked: Optional[torch.Tensor] = None):
        """The loss of the global batch (times a dataset's loss weight), the same on every process; gradients
        reach this process's rows only. `masked` is the global batch's false-negative mask, the same on every
        process (dpr/training/false_negatives.py)."""
        q_all = torch.cat(all_gather_rows(q))
        ctx_parts = all_gather_rows(ctx)
        positive_parts = all_gather_rows(positive_indices)
        offsets = [0]
        for part in ctx_parts[:-1]:
            offsets.append(offsets[-1] + part.shape[0])
        positives = torch.cat([p + o for p, o in zip(positive_parts, offsets)])
        ctx_all = torch.cat(ctx_parts)
        if masked is not None and tuple(masked.shape) != (q_all.shape[0], ctx_all.shape[0]):
            raise ValueError(f"a false-negative mask of shape {tuple(masked.shape)} for a global batch of "
                             f"{q_all.shape[0]} questions and {ctx_all.shape[0]} contexts")
        loss, correct = nll_loss(q_all, ctx_all, positives, self.spec.similarity, self.spec.temperature, masked)
        return loss * loss_weight, correct

    def _towers(self, batch: BiEncoderBatch) -> List[Tower]:
        o, model = self.options, self.model

        def inputs(ids, mask, seeds):
            out = {"input_ids": ids, "attention_mask": mask}
            if o.example_dropout and seeds is not None:
                out["seeds"] = seeds
            return out

        q_grad, ctx_grad = model.trainable_towers()
        return [
            Tower(lambda c: model.encode_questions(c["input_ids"], c["attention_mask"], c.get("seeds")),
                  inputs(batch.question_ids, batch.question_mask, batch.question_seeds), o.q_chunk_size, q_grad),
            Tower(lambda c: model.encode_contexts(c["input_ids"], c["attention_mask"], c.get("seeds")),
                  inputs(batch.context_ids, batch.context_mask, batch.context_seeds), o.ctx_chunk_size, ctx_grad),
        ]

    # ---------------------------------------------------------------- training
    def has_training_data(self) -> bool:
        return bool(self.train_sets)

    def epoch_batches(self, epoch: int) -> List[GlobalBatch]:
        o = self.options
        sizes = [len(d) for d in self.train_sets]
        return training_batches(sizes, self.settings.batch_size * self.dist.world_size, o.seed, epoch, o.sampling_rates)

    def train_step(self, batch: GlobalBatch, epoch: int, update: int) -> BatchResult:
        o = self.options
        samples = self.train_sets[batch.dataset_index]
        local = make_biencoder_batch(
            samples, local_slice(batch, self.dist.rank, self.dist.world_size),
            self.tensorizer, o.hard_negatives, o.other_negatives, shuffle=True, seed=o.seed, epoch=epoch,
            shuffle_positives=o.shuffle_positives, dataset_index=batch.dataset_index,
        )
        return self.forward_backward(local, self.false_negative_mask(samples, batch.indices, epoch))

    def false_negative_mask(self, samples: Sequence[BiEncoderSample], indices: Sequence[int],
                            epoch: int) -> Optional[torch.Tensor]:
        """The mask of the global training batch `indices` (None for `all`): every process samples the whole
        global batch's contexts, as each samples its own part, and gets the same mask."""
        if self.false_negatives.mode == "all":
            return None
        o = self.options
        examples = sample_examples(samples, indices, o.hard_negatives, o.other_negatives, shuffle=True, seed=o.seed,
                                   epoch=epoch, shuffle_positives=o.shuffle_positives)
        return self.false_negatives(examples, [samples[int(i)].answers for i in indices])

    def forward_backward(self, batch: BiEncoderBatch, masked: Optional[torch.Tensor] = None) -> BatchResult:
        """Loss and gradients (times self.backward_weight, accumulated into .grad) of one batch, with or without
        the gradient cache; `masked`: the global batch's false-negative mask."""
        batch = batch.to(self.device)
        towers = self._towers(batch)
        weights = self.options.dataset_loss_weights
        loss_weight = weights[batch.dataset_index] if weights else 1.0
        if self.options.grad_cache:
            loss, correct = self.grad_cache(towers, self.backward_weight, positive_indices=batch.positive_indices,
                                            loss_weight=loss_weight, masked=masked)
        else:
            loss, correct = full_batch_step(
                towers, self._global_loss, self.backward_weight, self.precision.autocast, self.precision.grad_scaler,
                positive_indices=batch.positive_indices, loss_weight=loss_weight, masked=masked,
            )
        return BatchResult(float(loss), batch.question_ids.shape[0] * self.dist.world_size, correct,
                           self.flops.of_biencoder_batch(batch),
                           masked_pairs=int(masked.sum()) if masked is not None else None)

    def validation_due(self, epoch_update: int, update: int, updates_per_epoch: int) -> bool:
        """DPR's: eval_per_epoch times per epoch, counted in the epoch."""
        return epoch_update % max(1, math.ceil(updates_per_epoch / self.options.eval_per_epoch)) == 0

    # ---------------------------------------------------------------- validation
    def validate(self, epoch: int) -> Optional[Validation]:
        """NLL validation, or from val_av_rank_start_epoch on average-rank validation (retrieval validation with
        train.val_retrieval)."""
        if not self.dev_set:
            return None
        if epoch >= self.options.val_av_rank_start_epoch:
            return self._ranking_validation()
        return self.validate_nll()

    def _ranking_validation(self) -> Validation:
        return self.validate_retrieval() if self.retrieval_corpus is not None else self.validate_average_rank()

    def evaluate(self) -> List[Validation]:
        if self.checkpoint is None or not self.dev_set:
            raise ConfigError("nothing to do: give train_datasets, or model_file and dev_datasets to validate")
        logger.info("No training data: validating %s only", self.checkpoint_file)
        return [self.validate_nll(), self._ranking_validation()]

    def _dev_batches(self, hard_negatives: int, other_negatives: int):
        world = self.dist.world_size
        for gb in evaluation_batches(len(self.dev_set), self.settings.dev_batch_size * world):
            yield make_biencoder_batch(
                self.dev_set, local_slice(gb, self.dist.rank, world), self.tensorizer,
                hard_negatives, other_negatives, shuffle=False,
            ).to(self.device)

    @torch.no_grad()
    def validate_nll(self) -> Validation:
        o = self.options
        self.model.eval()
        total_loss, correct, batches, questions = 0.0, 0, 0, 0
        for batch in self._dev_batches(o.hard_negatives, o.other_negatives):
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
        return Validation("nll_loss", loss, higher_is_better=False)

    @torch.no_grad()
    def validate_average_rank(self) -> Validation:
        """DPR's average-rank validation: the 0-based rank of each question's gold passage among the contexts
        (gold, 30 hard and 30 other negatives per question) of the questions this process collected, scored with
        the encoder's similarity."""
        o = self.options
        self.model.eval()
        limit = o.val_av_rank_max_qs // self.dist.world_size
        q_reps, ctx_reps, positives = [], [], []
        n_ctx = 0
        for batch in self._dev_batches(o.val_av_rank_hard_neg, o.val_av_rank_other_neg):
            with self.precision.autocast():
                q_reps.append(self.model.encode_questions(batch.question_ids, batch.question_mask).float())
                for s in range(0, batch.context_ids.shape[0], o.val_av_rank_bsz):
                    ctx_reps.append(self.model.encode_contexts(
                        batch.context_ids[s : s + o.val_av_rank_bsz], batch.context_mask[s : s + o.val_av_rank_bsz]
                    ).float())
            positives.append(batch.positive_indices + n_ctx)
            n_ctx += batch.context_ids.shape[0]
            if sum(r.shape[0] for r in q_reps) > limit:
                break
        rank_sum, q_num = 0.0, 0.0
        if q_reps:
            q, ctx, pos = torch.cat(q_reps), torch.cat(ctx_reps), torch.cat(positives)
            scores = similarity_scores(q, ctx, self.spec.similarity, self.spec.temperature)
            gold = scores.gather(1, pos.unsqueeze(1))
            rank_sum, q_num = float((scores > gold).sum()), float(q.shape[0])
        rank_sum, q_num = all_reduce_sum([rank_sum, q_num], self.device)
        av_rank = rank_sum / max(1.0, q_num)
        logger.info("Av.rank validation: average rank %s, total questions=%d", av_rank, int(q_num))
        return Validation("average_rank", av_rank, higher_is_better=False)

    @torch.no_grad()
    def validate_retrieval(self) -> Validation:
        """MRR@10 and Recall@k of the retrieval corpus (dpr/training/retrieval_validation.py): each process encodes
        its part of the passages (train.val_av_rank_bsz at a time) and of the questions (train.dev_batch_size at a
        time), ranks the gathered corpus for its questions, and the sums are added across processes."""
        corpus, rank, world = self.retrieval_corpus, self.dist.rank, self.dist.world_size
        self.model.eval()
        passages = [corpus.passages[i] for i in local_part(len(corpus.passages), rank, world)]
        passage_vectors = torch.cat(all_gather_rows(self._encode_passages(passages)))
        mine = local_part(len(corpus.questions), rank, world)
        question_vectors = self._encode_questions([corpus.questions[i] for i in mine])
        sums = ranking_sums(question_vectors, passage_vectors, [corpus.relevant[i] for i in mine], corpus.recall_at,
                            lambda q, ctx: similarity_scores(q, ctx, self.spec.similarity, self.spec.temperature))
        *sums, questions = all_reduce_sum(sums, self.device)
        values = {name: total / questions for name, total in
                  zip([MRR_NAME] + [recall_name(k) for k in corpus.recall_at], sums)}
        logger.info("Retrieval validation: %s; %s", ", ".join(f"{name} = {v:.4f}" for name, v in values.items()),
                    corpus.describe())
        return Validation(MRR_NAME, values.pop(MRR_NAME), higher_is_better=True, scalars=values)

    def _encode_passages(self, passages: Sequence[Passage]) -> torch.Tensor:
        return self._encode(self.model.encode_contexts, passages, self.options.val_av_rank_bsz,
                            lambda part: self.tensorizer.tensorize([p.text for p in part], [p.title for p in part]))

    def _encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        return self._encode(self.model.encode_questions, questions, self.settings.dev_batch_size,
                            self.tensorizer.questions.tensorize)

    def _encode(self, encode, items: Sequence, batch_size: int, tensorize) -> torch.Tensor:
        """The float32 vectors of `items`, tensorized and encoded `batch_size` at a time, in order; a process
        without any gets 0 rows (one empty batch)."""
        vectors = []
        for start in range(0, max(1, len(items)), batch_size):
            ids, mask = tensorize(items[start : start + batch_size])
            with self.precision.autocast():
                vectors.append(encode(ids.to(self.device), mask.to(self.device)).float())
        return torch.cat(vectors)


def run_training(cfg: DictConfig) -> TrainingRun:
    """Train (or, without training data, validate) as the configuration says."""
    logger.info("Configuration:\n%s", OmegaConf.to_yaml(cfg))
    return BiEncoderTrainer(cfg).run()
