"""Retrieval's options (`conf/dense_retriever.yaml`, read by `dense_retriever.py` and `mine_hard_negatives.py`),
resolved once at the entry into the typed settings that travel instead of the hydra config, as training's
`TrainSettings` do: which questions, which passages, which encoder and indexes, what is written."""
from dataclasses import dataclass
from typing import Mapping, Optional

from omegaconf import DictConfig, ListConfig

from dpr.data.ctx_sources import CtxSource, resolve_ctx_sources
from dpr.data.qa_data import QASample, read_qa_file
from dpr.data.resources import resolve_data_path
from dpr.foundation.config_values import existing_file
from dpr.foundation.errors import ConfigError
from dpr.indexing.configured_index import BM25Settings, IndexSettings
from dpr.indexing.encoder_backend import EncoderBackend
from dpr.indexing.encoding import EncoderSettings

RETRIEVERS = ("dense", "bm25", "hybrid")
# encoder_path values (DPR: the BiEncoder attribute) -> load_inference_encoder's encoder_type
ENCODER_PATHS = {None: "question", "": "question", "question_model": "question", "ctx_model": "ctx"}
QA_COLUMNS = ("question_col", "answers_col", "id_col")


def retriever_names(value) -> tuple[str, ...]:
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    unknown = [name for name in names if name not in RETRIEVERS]
    if not names or unknown:
        raise ConfigError(f"retriever must be one or a list of {RETRIEVERS}, got {value!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class QuestionSettings:
    """The question files of `qa_dataset` (a `datasets` name or a path) and the dataset entry's column settings."""

    files: tuple[str, ...]
    columns: Mapping[str, int]  # read_qa_file's question_col / answers_col / id_col, where the entry sets them

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "QuestionSettings":
        entry = (cfg.get("datasets") or {}).get(cfg.qa_dataset)
        files = resolve_data_path(str(entry.file if entry is not None else cfg.qa_dataset), cfg.get("data_dir"))
        columns = {key: entry[key] for key in QA_COLUMNS if entry and key in entry}
        return cls(tuple(files), columns)

    def load(self) -> list[QASample]:
        return [sample for path in self.files for sample in read_qa_file(path, **self.columns)]


@dataclass(frozen=True)
class QuestionEncodingSettings:
    """How the questions become vectors: encoded by `encoder`'s `encoder_type` half, or GC-DPR's saved encodings."""

    encoder: EncoderSettings
    encoder_type: str  # question | ctx (encoder_path)
    saved_path: Optional[str]  # q_encoding_path
    re_encode: bool  # re_encode_q
    save_only: bool  # encode_q_and_save
    backend: EncoderBackend  # encoder_backend: torch, or ONNX Runtime on the exported graph

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "QuestionEncodingSettings":
        if cfg.encoder_path not in ENCODER_PATHS:
            raise ConfigError(f"encoder_path must be question_model or ctx_model, not {cfg.encoder_path!r}")
        return cls(EncoderSettings.from_config(cfg), ENCODER_PATHS[cfg.encoder_path], cfg.q_encoding_path or None,
                   bool(cfg.re_encode_q), bool(cfg.encode_q_and_save), EncoderBackend.from_config(cfg))


@dataclass(frozen=True)
class RetrievalSettings:
    retrievers: tuple[str, ...]
    questions: Optional[QuestionSettings]  # None without qa_dataset (mining brings its own questions)
    sources: tuple[CtxSource, ...]  # ctx_datatsets; () when only the questions are encoded (encode_q_and_save)
    question_encoding: QuestionEncodingSettings
    index: IndexSettings
    bm25: BM25Settings
    n_docs: int
    alpha: float  # hybrid: the dense weight
    hybrid_depth: int
    match: str  # string | regex
    validation_workers: int
    out_file: Optional[str]
    qrels: Optional[str]  # relevance labels: the questions are also judged by them (judged_evaluation)
    metrics_file: Optional[str]
    trec_run_file: Optional[str]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RetrievalSettings":
        question_encoding = QuestionEncodingSettings.from_config(cfg)
        return cls(
            retrievers=retriever_names(cfg.retriever),
            questions=QuestionSettings.from_config(cfg) if cfg.qa_dataset else None,
            # the GPU host of GC-DPR's split (encode_q_and_save) may lack the passages
            sources=() if question_encoding.save_only else tuple(resolve_ctx_sources(cfg.ctx_datatsets, cfg)),
            question_encoding=question_encoding,
            index=IndexSettings.from_config(cfg),
            bm25=BM25Settings.from_config(cfg),
            n_docs=cfg.n_docs,
            alpha=cfg.alpha,
            hybrid_depth=cfg.hybrid_depth,
            match=cfg.match,
            validation_workers=cfg.validation_workers,
            out_file=str(cfg.out_file) if cfg.out_file else None,
            qrels=existing_file("qrels", cfg.qrels, "TREC qrels or BEIR's qrels TSV") if cfg.get("qrels") else None,
            metrics_file=_metrics_file(cfg),
            trec_run_file=str(cfg.trec_run_file) if cfg.get("trec_run_file") else None,
        )

    def outputs(self) -> list[tuple[str, str]]:
        """(option, path) of every file the run writes besides GC-DPR's question encodings."""
        named = (("out_file", self.out_file), ("metrics_file", self.metrics_file),
                 ("trec_run_file", self.trec_run_file))
        return [(option, path) for option, path in named if path]


def _metrics_file(cfg: DictConfig) -> Optional[str]:
    if not cfg.get("metrics_file"):
        return None
    if not cfg.get("qrels"):
        raise ConfigError("metrics_file needs qrels, the relevance labels the metrics are computed from (TREC qrels "
                          "or BEIR's qrels TSV)")
    return str(cfg.metrics_file)
