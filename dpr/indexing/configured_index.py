"""The indexes a retriever configuration (`conf/dense_retriever.yaml`) describes: the dense FAISS index, loaded from
where it was saved or built from the embedding shards (after one memory check, with the configured indexer's own
settings), or searched shard by shard without an index (`shard_search`); and the BM25 index over the passage
sources. Their options are resolved once into `IndexSettings` and `BM25Settings`."""
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from dpr.data.ctx_sources import CtxSource, iter_sources
from dpr.data.embeddings_io import EmbeddingFiles
from dpr.foundation.errors import ConfigError, UserInputError
from dpr.foundation.provenance import Difference, content_difference, differing_field
from dpr.foundation.files import ensure_writable_output, remove_stale_temporaries
from dpr.indexing.bm25 import BM25Index, BM25IndexError, passage_text
from dpr.indexing.faiss_indexers import DenseIndexer, SearchResult, create_indexer, index_exists, index_file_paths
from dpr.indexing.shard_provenance import (
    check_saved_index, index_source_records, passages_identity,
)
from dpr.indexing.shard_search import describe_shards, search_shards

logger = logging.getLogger(__name__)

HNSW_SETTINGS = {"hnsw_store_n": "store_n", "hnsw_ef_search": "ef_search", "hnsw_ef_construction": "ef_construction"}


class ShardSearchOptionError(UserInputError):
    """Options that the shard-wise search cannot honour."""


@dataclass(frozen=True)
class IndexSettings:
    """The dense index's options (conf/dense_retriever.yaml), resolved once."""

    kind: str  # flat | hnsw | hnsw_sq | factory (GC-DPR's hnsw_index resolved to hnsw)
    hnsw: Mapping[str, int]  # create_indexer's store_n / ef_search / ef_construction where set
    factory: Optional[str]
    train_sample: int
    search_params: str
    buffer_size: int
    path: Optional[str]  # index_path
    save_or_load: bool  # GC-DPR's save_or_load_index
    shard_search: bool
    shard_search_memory_gib: Optional[float]  # None: one shard at a time
    encoded_ctx_files: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "IndexSettings":
        shard_search = bool(cfg.get("shard_search"))
        return cls(
            kind="hnsw" if cfg.hnsw_index else cfg.indexer,
            hnsw={arg: cfg[key] for key, arg in HNSW_SETTINGS.items() if cfg.get(key) is not None},
            factory=cfg.index_factory or None,
            train_sample=cfg.index_train_sample,
            search_params=cfg.index_search_params or "",
            buffer_size=cfg.index_buffer,
            path=str(cfg.index_path) if cfg.index_path else None,
            save_or_load=bool(cfg.save_or_load_index),
            shard_search=shard_search,
            shard_search_memory_gib=memory_budget_gib(cfg.get("shard_search_memory_gb")) if shard_search else None,
            encoded_ctx_files=tuple(cfg.encoded_ctx_files or ()),
        )


@dataclass(frozen=True)
class BM25Settings:
    k1: float
    b: float
    index_path: Optional[str]  # load the index there, or build and save it there

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "BM25Settings":
        return cls(cfg.bm25_k1, cfg.bm25_b, cfg.bm25_index_path or None)


class ChainedBlocks:
    """The embedding blocks of several shard-file sets, re-iterable (two-pass indexers read them twice)."""

    def __init__(self, files: Sequence[EmbeddingFiles]) -> None:
        self.files = list(files)

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for shard_files in self.files:
            yield from shard_files

    @property
    def paths(self) -> list[Path]:
        return [path for shard_files in self.files for path in shard_files.paths]


def embedding_files(settings: IndexSettings, sources: Sequence[CtxSource]) -> ChainedBlocks:
    """`encoded_ctx_files[i]` with the id prefix of `ctx_datatsets[i]`."""
    patterns = list(settings.encoded_ctx_files)
    if not patterns:
        raise ConfigError("encoded_ctx_files is required to build a dense index (or give an existing index_path)")
    if len(patterns) != len(sources):
        raise ConfigError(
            f"encoded_ctx_files has {len(patterns)} entries but ctx_datatsets {len(sources)}: they pair up 1:1"
        )
    return ChainedBlocks([EmbeddingFiles(pattern, source.id_prefix) for pattern, source in zip(patterns, sources)])


def shards_of(settings: IndexSettings, sources: Sequence[CtxSource]) -> Optional[ChainedBlocks]:
    """The embedding shards, or None when `index_path` holds a saved index (no shard is needed then)."""
    if settings.path and index_exists(settings.path):
        return None
    return embedding_files(settings, sources)


def create_configured_indexer(settings: IndexSettings) -> DenseIndexer:
    """The indexer of `indexer` with its configured settings. Its memory is checked once, before building
    (`build_or_load_index`), so it does not check again after its first pass."""
    kind = settings.kind
    common = {"buffer_size": settings.buffer_size, "check_memory": False}
    if kind in ("hnsw", "hnsw_sq"):
        return create_indexer(kind, **common, **settings.hnsw)
    if kind == "flat":
        return create_indexer(kind, **common)
    if not settings.factory:
        raise ConfigError("indexer=factory needs index_factory, a FAISS index_factory string such as IVF4096,PQ64")
    return create_indexer(
        kind,
        factory_string=settings.factory,
        train_sample_size=settings.train_sample,
        search_params=settings.search_params,
        **common,
    )


def index_location(settings: IndexSettings, blocks: Optional[ChainedBlocks]) -> Optional[str]:
    """`index_path`, or with `save_or_load_index` GC-DPR's prefix from the first embedding file (emb_0 -> emb)."""
    if settings.path:
        return settings.path
    if settings.save_or_load and blocks is not None and blocks.paths:
        return "_".join(str(blocks.paths[0]).split("_")[:-1])
    return None


def estimate_vector_count(paths: Sequence[Path]) -> tuple[int, int]:
    """(vectors, dimension) of shard files: exact for `.npz` (array headers), for pickles scaled from the first
    pickle's vectors per byte (reading every pickle would cost a pass over all the data)."""
    shards = describe_shards([(paths, "")])
    return sum(shard.vectors for shard in shards), next((shard.dim for shard in shards if shard.dim), 0)


def check_shard_search_options(settings: IndexSettings) -> None:
    """`shard_search=true` is an exact flat search that builds no index: refuse options that ask for another."""
    if not settings.shard_search:
        return
    kind = settings.kind
    if kind != "flat":
        raise ShardSearchOptionError(
            f"shard_search=true searches exactly, as indexer=flat, but indexer={kind} was asked: drop shard_search "
            "for a compressed index (it is built streaming the shards too), or set indexer=flat"
        )
    if settings.path or settings.save_or_load:
        raise ShardSearchOptionError(
            "shard_search=true reads the embedding shards and builds no index, so there is no index to save or "
            "load: drop index_path / save_or_load_index, or shard_search"
        )


def memory_budget_gib(budget: object) -> Optional[float]:
    """`shard_search_memory_gb` as a positive number of GiB, or None when unset."""
    if budget is None:
        return None
    try:
        gib = float(budget)
    except (TypeError, ValueError):
        gib = float("nan")
    if not gib > 0:
        raise ShardSearchOptionError(f"shard_search_memory_gb must be a positive number of GiB, got {budget!r}")
    return gib


def shard_wise_search(settings: IndexSettings, shards: ChainedBlocks, queries: np.ndarray, depth: int
                      ) -> list[SearchResult]:
    """`shard_search=true`: the flat index's results, one group of shards (within shard_search_memory_gb) at a
    time."""
    budget = settings.shard_search_memory_gib
    shard_sets = [(files.paths, files.id_prefix) for files in shards.files]
    return search_shards(shard_sets, queries, depth, None if budget is None else int(budget * 2**30))


def prepare_index_location(settings: IndexSettings, location: str) -> None:
    """Before an index is built for saving at `location`: prove it can be written (an hour of indexing never ends
    at an unwritable location) and remove what killed saves left there."""
    ensure_writable_output(index_file_paths(location)[0], "index_path" if settings.path else "save_or_load_index")
    for file in index_file_paths(location):
        remove_stale_temporaries(file.parent, file.name + ".")


def build_or_load_index(settings: IndexSettings, shards: Optional[ChainedBlocks],
                        shards_model: Optional[tuple[Path, dict]] = None) -> DenseIndexer:
    """The dense index: loaded from its location when saved there (and made from the same model as the shards
    of `shards_model`, when both say), else built from the shards (then saved, with their provenance record)."""
    indexer = create_configured_indexer(settings)
    location = index_location(settings, shards)
    if location and index_exists(location):
        indexer.deserialize(location)
        check_saved_index(location, indexer.provenance, shards_model)
        return indexer
    if location:
        prepare_index_location(settings, location)
    indexer.provenance = shards_model[1] if shards_model else None
    indexer.source_records = index_source_records([files.paths for files in shards.files])
    count, dim = estimate_vector_count(shards.paths)
    indexer.ensure_fits(count, dim)  # logs the estimate; raises when the index will not fit
    started = time.perf_counter()
    indexer.index_data(shards)
    logger.info("built the %s index in %.1f s", indexer.kind, time.perf_counter() - started)
    if location:
        indexer.serialize(location)
    return indexer


def bm25_settings(settings: BM25Settings) -> dict:
    return {"k1": settings.k1, "b": settings.b}


def check_saved_bm25(path: str, saved: Optional[dict], settings: BM25Settings, sources: Sequence[CtxSource]) -> None:
    """Refuse a saved BM25 index built from other passages (by content: path and mtime may differ) or settings;
    the whole content's sha256 it recorded is checked when the passages are read for the results' texts."""
    if saved is None:
        logger.info("the BM25 index %s has no record of its passages (saved by an older version): used as it is", path)
        return
    way_out = "Delete the folder to build it from these passages, or give another bm25_index_path"
    changed = differing_field(saved, bm25_settings(settings), keys=("k1", "b"))
    if changed is None and len(saved["passages"]) != len(sources):
        changed = Difference("passages", f"{len(saved['passages'])} files", f"{len(sources)} files")
    for position, (before, source) in enumerate(zip(saved["passages"], sources)):
        file_changed = content_difference(before, passages_identity(source))
        if changed is None and file_changed is not None:
            changed = Difference(f"passages[{position}] ({source.path}).{file_changed.field}", file_changed.first,
                                 file_changed.second)
    if changed is not None:
        raise BM25IndexError(f"bm25_index_path={path} was built from other passages or settings than these: "
                             f"{changed} (saved index vs now). {way_out}")
    for position, (before, source) in enumerate(zip(saved["passages"], sources)):
        if before.get("sha256"):  # checked by the pass that reads the passages for the results' texts
            source.expect_sha256(before["sha256"], f"bm25_index_path={path} (source {position + 1})", way_out)


def bm25_index(settings: BM25Settings, sources: Sequence[CtxSource]) -> BM25Index:
    """Loaded from `bm25_index_path` when saved there from these passages, else built over the passage sources
    (and saved, with what it was built from: the passages' identities with the sha256 of the pass that read them)."""
    path = settings.index_path
    if path and os.path.isdir(path):
        index = BM25Index.load(path)
        check_saved_bm25(path, index.built_from, settings, sources)
        return index
    ids, texts = [], []
    digests: list = [None] * len(sources)
    for passage in iter_sources(sources, digests):
        ids.append(passage.id)
        texts.append(passage_text(passage.title, passage.text))
    index = BM25Index.build(ids, texts, k1=settings.k1, b=settings.b)
    index.built_from = {"passages": [passages_identity(source, sha256) for source, sha256 in zip(sources, digests)],
                        **bm25_settings(settings)}
    if path:
        index.save(path)
    return index
