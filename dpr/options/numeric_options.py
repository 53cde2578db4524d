"""Every numeric option of every entry script with the values it can take, checked at the script's start (before
any model, file or index is touched), so that a value that cannot work (`n_docs=0`, `batch_size=0`, a negative
learning rate, `abc`) ends in one line naming the key instead of a traceback deep in a run.

One table per configuration (`conf/*.yaml`); `tests/test_numeric_options.py` tries a value out of bounds for every
row through each entry script, and checks that every numeric option of each configuration has a row.
"""
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dpr.foundation.config_values import number, whole_number
from dpr.foundation.errors import ConfigError
from dpr.models.encoder_spec import MIN_SEQUENCE_LENGTH

UNSIGNED_32 = 2**32 - 1  # numpy's seeds


@dataclass(frozen=True)
class Bound:
    """`key` (a dotted path) is a whole number (`whole`) or any number from `minimum` (excluded with `above`) to
    `maximum`; `null` admits null (the option's "none"); `each`: a list of such numbers; `too_small`: what a
    value below `minimum` means, with the way out (else "must be at least")."""

    key: str
    minimum: float
    maximum: Optional[float] = None
    whole: bool = True
    above: bool = False
    null: bool = False
    each: bool = False
    too_small: Optional[str] = None

    def check(self, value: Any) -> None:
        if value is None and self.null:
            return
        if not self.each:
            self._check_one(self.key, value)
        elif not isinstance(value, (list, tuple)):
            raise ConfigError(f"{self.key}={value!r} must be a list of whole numbers of at least {int(self.minimum)}, "
                              f"e.g. [10,20]")
        else:
            for position, item in enumerate(value):
                self._check_one(f"{self.key}[{position}]", item)

    def _check_one(self, key: str, value: Any) -> None:
        if self.too_small and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value < self.minimum:
            raise ConfigError(f"{key}={value} {self.too_small}")
        if self.whole:
            whole_number(key, value, int(self.minimum), maximum=self.maximum)
        else:
            number(key, value, self.minimum, self.maximum, self.above)


def _whole(key: str, minimum: int, **options) -> Bound:
    return Bound(key, minimum, **options)


def _real(key: str, minimum: float, **options) -> Bound:
    return Bound(key, minimum, whole=False, **options)


ENCODER = (
    _whole("encoder.sequence_length", MIN_SEQUENCE_LENGTH,
           too_small=f"leaves no room for text after [CLS] and [SEP]: use at least {MIN_SEQUENCE_LENGTH} (DPR: 256 for "
                     f"the retriever, 350 for the reader)"),
    _whole("encoder.projection_dim", 0),
    _real("encoder.dropout", 0.0, maximum=1.0),
    _real("encoder.temperature", 0.0, above=True),
)

TRAINING = ENCODER + (
    _whole("seed", 0, maximum=UNSIGNED_32),
    _whole("train.batch_size", 1),
    _whole("train.dev_batch_size", 1),
    _real("train.learning_rate", 0.0),
    _real("train.adam_eps", 0.0),
    _real("train.weight_decay", 0.0),
    _real("train.max_grad_norm", 0.0, null=True),  # 0 or null: no clipping
    _whole("train.warmup_steps", 0),
    _whole("train.gradient_accumulation_steps", 1),
    _whole("train.num_train_epochs", 1),
    _whole("train.log_batch_step", 1),
    _whole("train.train_rolling_loss_step", 1),
)

BIENCODER_TRAINING = TRAINING + (
    _whole("train.eval_per_epoch", 1),
    _whole("train.hard_negatives", 0),
    _whole("train.other_negatives", 0),
    _whole("train.val_av_rank_hard_neg", 0),
    _whole("train.val_av_rank_other_neg", 0),
    _whole("train.val_av_rank_bsz", 1),
    _whole("train.val_av_rank_max_qs", 1),
    _whole("train.val_retrieval_other_passages", 0),
    _whole("train.val_retrieval_recall_at", 1, each=True),
    _whole("train.val_retrieval_seed", 0, maximum=UNSIGNED_32),
    _whole("train.val_retrieval_max_qs", 1, null=True),  # null: every dev question
    _whole("train.q_chunk_size", 1),
    _whole("train.ctx_chunk_size", 1),
    _whole("train.grad_compensation_ref_world", 0, null=True),  # 0 or null: unscaled
    _real("train.peak_tflops", 0.0, above=True, null=True),
    _whole("val_av_rank_start_epoch", 0),
    _whole("global_loss_buf_sz", 1),
)

READER = TRAINING + (
    _whole("train.eval_step", 1),
    _whole("passages_per_question", 1),
    _whole("passages_per_question_predict", 1),
    _whole("max_n_answers", 1),
    _whole("max_answer_length", 1),
    _whole("num_workers", 1),
    _whole("eval_top_docs", 1, each=True, null=True),  # null or []: one prediction from all the passages
)

RETRIEVAL = ENCODER + (
    _whole("validation_workers", 1),
    _whole("batch_size", 1),
    _real("alpha", 0.0, maximum=1.0),
    _whole("hybrid_depth", 1),
    _real("bm25_k1", 0.0),
    _real("bm25_b", 0.0, maximum=1.0),
    _whole("index_train_sample", 1),
    _whole("hnsw_store_n", 1, null=True),
    _whole("hnsw_ef_search", 1, null=True),
    _whole("hnsw_ef_construction", 1, null=True),
    _whole("index_buffer", 1),
    _real("shard_search_memory_gb", 0.0, above=True, null=True),
)

NUMERIC_OPTIONS: dict[str, tuple[Bound, ...]] = {
    "biencoder_train_cfg": BIENCODER_TRAINING,
    "extractive_reader_train_cfg": READER,
    "preprocess_reader_data": READER,
    "gen_embs": ENCODER + (
        _whole("shard_id", 0),
        _whole("num_shards", 1),
        _whole("batch_size", 1),
        _whole("num_workers", 0),
        _whole("tokenize_chunk", 1),
    ),
    "dense_retriever": RETRIEVAL + (_whole("n_docs", 1),),
    "mine_hard_negatives": RETRIEVAL + (
        _whole("mine_rank_from", 1),
        _whole("mine_rank_to", 1),
        _whole("num_hard_negatives", 1),
        _whole("n_docs", 1, null=True),  # by default mine_rank_to's value (checked first, named first)
    ),
}


def check_numeric_options(cfg: DictConfig, config_name: str) -> None:
    """Refuse, in one line, the first numeric option of `cfg` (the configuration `config_name`) out of bounds."""
    for bound in NUMERIC_OPTIONS[config_name]:
        value = OmegaConf.select(cfg, bound.key)
        bound.check(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)
