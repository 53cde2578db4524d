"""FAISS indexes over passage embeddings: flat inner product, HNSW, HNSW with 8-bit SQ, and any factory string.

Every indexer is built from (ids, vectors) blocks, added `buffer_size` vectors at a time, so passages can stream
from shard files. HNSW turns maximum inner product search into L2 search (DPR): each passage vector v gets an
extra coordinate sqrt(phi - |v|^2), with phi the largest squared norm over all the data, and each query gets 0;
the L2 order then equals the inner-product order. Indexers that need to see all the data first (phi, SQ ranges,
a training sample) make a first pass over the blocks, so they take a re-iterable (a list, `EmbeddingFiles`).

Serialised form: `index.dpr` (faiss.write_index) and `index_meta.dpr` (JSON holding the ids) inside a directory,
or `{path}.index.dpr` / `{path}.index_meta.dpr` for a prefix path. DPR's pickled id lists are still read.
"""
import errno
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Optional, Sequence, Union

import faiss
import numpy as np
from tqdm import tqdm

from dpr.data.embeddings_io import non_finite_error
from dpr.foundation.errors import ConfigError
from dpr.foundation.files import atomic_output
from dpr.foundation.safe_pickle import NUMPY_GLOBALS, restricted_load
from dpr.indexing.exact_search import ExactTopK, search_results

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
IndexBlock = tuple[Sequence[object], np.ndarray]
SearchResult = tuple[list[object], np.ndarray]

DEFAULT_BUFFER_SIZE = 50000
INDEX_FILE_NAME = "index.dpr"
META_FILE_NAME = "index_meta.dpr"
META_FORMAT = "dpr-index-meta"
# Python's cost of one id string in index_id_to_db_id (object, characters, list slot), roughly.
_BYTES_PER_ID = 80
_FAISS_ID_BYTES = 8
_SEARCH_BATCH = 4096
# Norms recomputed on a buffer slice may differ from the first pass's in the last float32 bit.
_PHI_TOLERANCE = 1e-5


def _hnsw_link_bytes(m: int) -> int:
    """Per vector: 2*M int32 links on level 0, about one more for the upper levels, plus offset and level."""
    return (2 * m + 1) * 4 + 12


class InsufficientMemoryError(RuntimeError):
    """Building the index would need more memory than the machine has available."""


def available_memory_bytes() -> tuple[int, str]:
    """Memory available to this process now, and where the figure comes from.

    MemAvailable from /proc/meminfo (or os.sysconf free pages elsewhere), lowered to a cgroup v2 limit if any.
    """
    available, source = _meminfo_available()
    cgroup_left = _cgroup_memory_left()
    if cgroup_left is not None and cgroup_left < available:
        return cgroup_left, "the cgroup memory limit (memory.max - memory.current)"
    return available, source


def _meminfo_available() -> tuple[int, str]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf free physical pages"


def _cgroup_memory_left() -> Optional[int]:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - current, 0)


def ensure_memory(required_bytes: int, what: str, available: Optional[tuple[int, str]] = None) -> None:
    """Raise InsufficientMemoryError naming the estimate and the machine's figure when `what` will not fit."""
    available_bytes, source = available or available_memory_bytes()
    required_gib, available_gib = required_bytes / 2**30, available_bytes / 2**30
    logger.info("%s needs about %.2f GiB; %.2f GiB available (%s)", what, required_gib, available_gib, source)
    if required_bytes > available_bytes:
        raise InsufficientMemoryError(
            f"{what} needs about {required_gib:.2f} GiB of memory, but this machine has "
            f"{available_gib:.2f} GiB available ({source}). Use a compressed index (hnsw_sq or a "
            f"factory string such as IVF65536,PQ64), or a machine with more memory."
        )


@dataclass
class BlockStats:
    """What a first pass over the data learns: size, norms, per-dimension ranges and a uniform random sample."""

    count: int
    dim: int
    max_sq_norm: float
    min_sq_norm: float
    dim_min: np.ndarray
    dim_max: np.ndarray
    sample: np.ndarray


def _squared_norms(vectors: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", vectors, vectors)


def _as_vectors(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    return vectors


def _non_empty_blocks(blocks: Iterable[IndexBlock]) -> Iterator[tuple[Sequence[object], np.ndarray]]:
    for ids, vectors in blocks:
        if len(ids):
            vectors = _as_vectors(vectors)
            if len(ids) != len(vectors):
                raise ValueError(f"a block has {len(ids)} ids but {len(vectors)} vectors")
            yield ids, vectors


def _smallest_keys(keys: np.ndarray, vectors: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if len(keys) <= size:
        return keys, vectors
    keep = np.argpartition(keys, size)[:size]
    return keys[keep], vectors[keep]


class _UniformSample:
    """A uniform sample without repeats of a stream: the `size` vectors with the smallest random keys."""

    def __init__(self, size: int, dim: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.vectors = np.empty((0, dim), np.float32)

    def add(self, vectors: np.ndarray) -> None:
        # Thin the block first, so a large block is never copied whole.
        keys, candidates = _smallest_keys(self.rng.random(len(vectors)), vectors, self.size)
        self.keys, self.vectors = _smallest_keys(
            np.concatenate([self.keys, keys]), np.concatenate([self.vectors, candidates]), self.size
        )


def scan_blocks(blocks: Iterable[IndexBlock], sample_size: int = 0, seed: int = 0) -> BlockStats:
    """One pass over the blocks for their count, dimension, squared-norm range, per-dimension range and a sample."""
    stats: Optional[BlockStats] = None
    sample: Optional[_UniformSample] = None
    for _ids, vectors in tqdm(_non_empty_blocks(blocks), desc="first pass over embeddings", unit="block"):
        norms = _squared_norms(vectors)
        if stats is None:
            sample = _UniformSample(sample_size, vectors.shape[1], seed)
            stats = BlockStats(
                0, vectors.shape[1], 0.0, float("inf"), vectors.min(axis=0), vectors.max(axis=0), sample.vectors
            )
        elif vectors.shape[1] != stats.dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} after vectors of dimension {stats.dim}")
        stats.count += len(vectors)
        stats.max_sq_norm = max(stats.max_sq_norm, float(norms.max()))
        stats.min_sq_norm = min(stats.min_sq_norm, float(norms.min()))
        stats.dim_min = np.minimum(stats.dim_min, vectors.min(axis=0))
        stats.dim_max = np.maximum(stats.dim_max, vectors.max(axis=0))
        if sample_size:
            sample.add(vectors)
    if stats is None:
        raise ValueError("no vectors to index")
    stats.sample = sample.vectors
    logger.info(
        "first pass: %d vectors of dimension %d, max squared norm %.4f", stats.count, stats.dim, stats.max_sq_norm
    )
    return stats


def index_file_paths(path: PathLike) -> tuple[Path, Path]:
    """(index file, meta file): inside `path` when it is a directory (or ends with a separator), else beside it."""
    if os.path.isdir(path) or str(path).endswith(os.sep):
        return Path(path) / INDEX_FILE_NAME, Path(path) / META_FILE_NAME
    return Path(f"{path}.{INDEX_FILE_NAME}"), Path(f"{path}.{META_FILE_NAME}")


# faiss's write error ends in strerror(errno); these are a full disk or quota (ENOSPC, EDQUOT)
_FULL_DISK_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def _write_faiss_index(index: faiss.Index, file_name: str) -> None:
    """`faiss.write_index`, whose RuntimeError on a full disk becomes the OSError `atomic_output` reports in one
    line naming the file."""
    try:
        faiss.write_index(index, file_name)
    except RuntimeError as e:
        if any(message in str(e) for message in _FULL_DISK_MESSAGES):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file_name) from e
        raise


def _stored_vectors(index: faiss.Index) -> Optional[np.ndarray]:
    """A view (no copy) of the float vectors an index stores as they are: a flat index's, or an HNSW graph's flat
    storage (the L2 form with its extra coordinate); None for compressed codes."""
    index = faiss.downcast_index(index)
    storage = getattr(index, "storage", None)
    flat = faiss.downcast_index(storage) if storage is not None else index
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _refuse_non_finite_stored(index: faiss.Index, index_file: Path, ids: Sequence[object]) -> None:
    """A saved index (DPR's, or any built elsewhere) whose stored vectors hold NaN or infinity: those passages
    would vanish from every result list. Read a million rows at a time, without copying the index."""
    vectors = _stored_vectors(index)
    if vectors is None:
        return
    step = 1 << 20
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(vectors[start:start + step]).all(axis=1))
                          for start in range(0, len(vectors), step)])
    if len(bad):
        raise non_finite_error(bad, len(vectors), f"the saved index {index_file}", ids,
                               "rebuild it from finite embedding shards (delete it, or give another index_path)")


def index_exists(path: PathLike) -> bool:
    """Whether both the index and the meta file of a serialised index are at `path`."""
    return all(file.is_file() for file in index_file_paths(path))


def _read_meta(meta_file: Path) -> tuple[list[object], dict]:
    """The id list and the other meta fields; a pickled list is DPR's format, read admitting only ids."""
    with open(meta_file, "rb") as file:
        head = file.read(1)
        file.seek(0)
        if head == b"{":
            meta = json.load(file)
            if meta.get("format") != META_FORMAT:
                raise ConfigError(f"{meta_file} is not an index meta file of this project")
            return meta.pop("ids"), meta
        ids = restricted_load(file, NUMPY_GLOBALS, "DPR index id map")
    if not isinstance(ids, list):
        raise ConfigError(f"{meta_file}: expected a pickled list of ids, got {type(ids).__name__}")
    return ids, {}


class DenseIndexer(ABC):
    """An index plus `index_id_to_db_id`, the external id of each FAISS position."""

    kind: ClassVar[str]
    # Dimensions the index adds to the passage vectors (1 for the L2 conversion).
    extra_dims: ClassVar[int] = 0

    def __init__(self, buffer_size: int = DEFAULT_BUFFER_SIZE, check_memory: bool = True) -> None:
        """`check_memory`: after a first pass (which counts the vectors), refuse to build an index that won't fit."""
        self.buffer_size = buffer_size
        self.check_memory = check_memory
        self.index: Optional[faiss.Index] = None
        self.index_id_to_db_id: list[object] = []
        # the provenance record of the embedding shards the index was built from (dpr.indexing.shard_provenance),
        # kept in the meta file so that a saved index is never searched with another model's question vectors
        self.provenance: Optional[dict] = None
        # one such record per passage source (None: its shards had none), each source checked as its shards are
        self.source_records: Optional[list[Optional[dict]]] = None

    @abstractmethod
    def estimate_memory(self, n: int, dim: int) -> int:
        """Bytes an index of `n` vectors of dimension `dim` needs while it is built and searched."""

    def ensure_fits(self, n: int, dim: int, available: Optional[tuple[int, str]] = None) -> int:
        """This indexer's estimate (its own settings) for `n` vectors of dimension `dim`, logged; raises
        InsufficientMemoryError when it exceeds the memory available."""
        required = self.estimate_memory(n, dim)
        ensure_memory(required, f"a {self.kind} index of {n} vectors of dimension {dim}", available)
        return required

    @abstractmethod
    def _create_index(self, dim: int) -> faiss.Index:
        """An empty FAISS index for passage vectors of dimension `dim`."""

    def _needs_first_pass(self) -> bool:
        return False

    def _build_from_stats(self, stats: BlockStats) -> None:
        """Create (and train) the index once the first pass has seen all the data."""
        self.index = self._create_index(stats.dim)

    def _to_index_space(self, vectors: np.ndarray) -> np.ndarray:
        return vectors

    def _queries_to_index_space(self, queries: np.ndarray) -> np.ndarray:
        return queries

    def _restore(self, meta: dict) -> None:
        """Re-apply what the meta file records beyond the ids."""

    def _meta_fields(self) -> dict:
        return {}

    @property
    def vector_dim(self) -> Optional[int]:
        return None if self.index is None else self.index.d - self.extra_dims

    def index_data(self, blocks: Iterable[IndexBlock]) -> None:
        """Add (ids, vectors) blocks in `buffer_size` chunks; two-pass indexers need a re-iterable `blocks`."""
        expected = self._first_pass(blocks) if self._needs_first_pass() else None
        added_before = len(self.index_id_to_db_id)
        with tqdm(total=expected, desc=f"indexing ({self.kind})", unit="vectors") as progress:
            for ids, vectors in _non_empty_blocks(blocks):
                for start in range(0, len(ids), self.buffer_size):
                    chunk_ids = ids[start : start + self.buffer_size]
                    self._add_chunk(chunk_ids, vectors[start : start + self.buffer_size])
                    progress.update(len(chunk_ids))
        total = len(self.index_id_to_db_id)
        logger.info("indexed %d vectors; the index holds %d", total - added_before, total)

    def _first_pass(self, blocks: Iterable[IndexBlock]) -> int:
        """Scan all the data, check the memory, build the index; returns the number of vectors to add."""
        if iter(blocks) is blocks:
            raise TypeError(
                f"{type(self).__name__} makes a first pass over all the data (phi, training) before adding, "
                "so pass a re-iterable such as a list of blocks or dpr.data.embeddings_io.EmbeddingFiles"
            )
        stats = self._scan(blocks)
        if self.check_memory:
            self.ensure_fits(stats.count, stats.dim)
        self._build_from_stats(stats)
        return stats.count

    def _scan(self, blocks: Iterable[IndexBlock]) -> BlockStats:
        return scan_blocks(blocks)

    def _add_chunk(self, ids: Sequence[object], vectors: np.ndarray) -> None:
        if self.index is None:
            self.index = self._create_index(vectors.shape[1])
        if vectors.shape[1] != self.vector_dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} for an index of dimension {self.vector_dim}")
        self.index.add(self._to_index_space(vectors))
        self.index_id_to_db_id.extend(ids)

    def search_knn(self, query_vectors: np.ndarray, top_docs: int) -> list[SearchResult]:
        """Per query, the ids of the `top_docs` best passages (best first) and their scores.

        Positions FAISS leaves empty (-1, when an approximate index finds fewer than `top_docs`) are dropped.
        """
        queries = self._queries_to_index_space(self._checked_queries(query_vectors))
        results: list[SearchResult] = []
        batches = range(0, len(queries), _SEARCH_BATCH)
        for start in tqdm(batches, desc="searching", unit="batch", disable=len(batches) <= 1):
            scores, positions = self.index.search(queries[start : start + _SEARCH_BATCH], top_docs)
            for row_scores, row_positions in zip(scores, positions):
                found = row_positions >= 0
                results.append(([self.index_id_to_db_id[i] for i in row_positions[found]], row_scores[found]))
        return results

    def _checked_queries(self, query_vectors: np.ndarray) -> np.ndarray:
        if self.index is None or self.index.ntotal == 0:
            raise ValueError("the index is empty: call index_data or deserialize first")
        queries = _as_vectors(query_vectors)
        if queries.shape[1] != self.vector_dim:
            raise ValueError(f"queries of dimension {queries.shape[1]} for an index of dimension {self.vector_dim}")
        return queries

    def serialize(self, path: PathLike) -> None:
        """Write the index and its id map (JSON) inside directory `path`, or beside prefix `path`."""
        if self.index is None:
            raise ValueError("nothing to serialize: the index is empty")
        index_file, meta_file = index_file_paths(path)
        index_file.parent.mkdir(parents=True, exist_ok=True)
        logger.info("serializing a %s index of %d vectors to %s", self.kind, self.index.ntotal, index_file)
        with atomic_output(index_file) as temp_name:
            _write_faiss_index(self.index, temp_name)
        meta = {
            "format": META_FORMAT,
            "version": 1,
            "indexer": self.kind,
            **self._meta_fields(),
            **({"provenance": self.provenance} if self.provenance is not None else {}),
            **({"source_records": self.source_records} if self.source_records is not None else {}),
            "ids": self.index_id_to_db_id,
        }
        with atomic_output(meta_file) as temp_name, open(temp_name, "w", encoding="utf-8") as file:
            json.dump(meta, file)

    def deserialize(self, path: PathLike) -> None:
        """Load what `serialize` wrote (or DPR's files with a pickled id list) from directory or prefix `path`."""
        index_file, meta_file = index_file_paths(path)
        for file in (index_file, meta_file):
            if not file.is_file():
                raise FileNotFoundError(f"no index at {path}: {file} is missing")
        logger.info("loading index from %s", index_file)
        index = faiss.read_index(str(index_file))
        ids, meta = _read_meta(meta_file)
        if meta.get("indexer", self.kind) != self.kind:
            raise ConfigError(f"{meta_file} holds a {meta['indexer']} index, not {self.kind}")
        if len(ids) != index.ntotal:
            raise ConfigError(f"{meta_file} has {len(ids)} ids for an index of {index.ntotal} vectors")
        _refuse_non_finite_stored(index, index_file, ids)
        self.index, self.index_id_to_db_id = index, ids
        self.provenance = meta.get("provenance")
        self.source_records = meta.get("source_records")
        self._restore(meta)
        logger.info("loaded a %s index of %d vectors", self.kind, index.ntotal)


class DenseFlatIndexer(DenseIndexer):
    """Exact inner-product search over the vectors of an IndexFlatIP (the stored form, as DPR's); scores are dot
    products, descending, equal scores in insertion order (`dpr.indexing.exact_search`, the order and scores of
    the shard-wise search too)."""

    kind = "flat"

    def estimate_memory(self, n: int, dim: int) -> int:
        return n * (dim * 4 + _BYTES_PER_ID)

    def _create_index(self, dim: int) -> faiss.Index:
        return faiss.IndexFlatIP(dim)

    def search_knn(self, query_vectors: np.ndarray, top_docs: int) -> list[SearchResult]:
        queries = self._checked_queries(query_vectors)
        n, dim = self.index.ntotal, self.index.d
        stored = faiss.rev_swig_ptr(faiss.downcast_index(self.index).get_xb(), n * dim).reshape(n, dim)  # a view
        search = ExactTopK(queries, top_docs)
        search.add(stored)
        return search_results(*search.finish(), self.index_id_to_db_id.__getitem__)


class DenseHNSWFlatIndexer(DenseIndexer):
    """HNSW over L2-converted vectors (IndexHNSWFlat of dimension D+1); scores are L2 distances, ascending."""

    kind = "hnsw"
    extra_dims = 1

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        store_n: int = 512,
        ef_search: int = 128,
        ef_construction: int = 200,
        check_memory: bool = True,
    ) -> None:
        super().__init__(buffer_size, check_memory)
        self.store_n = store_n
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.phi: Optional[float] = None

    def _code_bytes(self, dim: int) -> int:
        return (dim + 1) * 4

    def estimate_memory(self, n: int, dim: int) -> int:
        per_vector = self._code_bytes(dim) + _hnsw_link_bytes(self.store_n) + _BYTES_PER_ID
        return n * per_vector + 2 * self.buffer_size * (dim + 1) * 4  # plus a buffer and its converted copy

    def _create_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim + 1, self.store_n)
        self._set_hnsw_params(index)
        return index

    def _set_hnsw_params(self, index: faiss.Index) -> None:
        index.hnsw.efSearch = self.ef_search
        index.hnsw.efConstruction = self.ef_construction

    def _needs_first_pass(self) -> bool:
        return self.index is None

    def _build_from_stats(self, stats: BlockStats) -> None:
        self.phi = stats.max_sq_norm
        logger.info("phi (max squared norm over all %d vectors) = %.4f", stats.count, self.phi)
        super()._build_from_stats(stats)

    def _to_index_space(self, vectors: np.ndarray) -> np.ndarray:
        if self.phi is None:
            raise ValueError("phi is unknown (an index loaded from DPR's files): adding vectors is not possible")
        norms = _squared_norms(vectors)
        if norms.max() > self.phi * (1 + _PHI_TOLERANCE):
            raise ValueError(
                f"a vector's squared norm {norms.max():.4f} exceeds phi={self.phi:.4f} fixed when the index was "
                "built; index all the data in one index_data call"
            )
        extra = np.sqrt(np.maximum(self.phi - norms, 0.0)).reshape(-1, 1)
        return np.hstack([vectors, extra]).astype(np.float32, copy=False)

    def _queries_to_index_space(self, queries: np.ndarray) -> np.ndarray:
        return np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)])

    def _meta_fields(self) -> dict:
        return {"phi": self.phi}

    def _restore(self, meta: dict) -> None:
        self.phi = meta.get("phi")  # None for DPR's files, which blocks further adds as DPR does
        self._set_hnsw_params(faiss.downcast_index(self.index))


class DenseHNSWSQIndexer(DenseHNSWFlatIndexer):
    """HNSW with 8-bit scalar-quantized storage (IndexHNSWSQ, QT_8bit) over the L2-converted vectors."""

    kind = "hnsw_sq"

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        store_n: int = 128,
        ef_search: int = 128,
        ef_construction: int = 200,
        check_memory: bool = True,
    ) -> None:
        super().__init__(buffer_size, store_n, ef_search, ef_construction, check_memory)

    def _code_bytes(self, dim: int) -> int:
        return dim + 1

    def _create_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWSQ(dim + 1, faiss.ScalarQuantizer.QT_8bit, self.store_n)
        self._set_hnsw_params(index)
        return index

    def _build_from_stats(self, stats: BlockStats) -> None:
        super()._build_from_stats(stats)
        self.index.train(self._range_training_vectors(stats))

    def _range_training_vectors(self, stats: BlockStats) -> np.ndarray:
        """Two vectors spanning every dimension's [min, max] over all the converted data.

        QT_8bit training only records each dimension's min and max, so training on these equals DPR's training
        on all the vectors, without holding them. The extra coordinate sqrt(phi - |v|^2) spans
        [0, sqrt(phi - min |v|^2)].
        """
        low = np.append(stats.dim_min, 0.0)
        high = np.append(stats.dim_max, np.sqrt(self.phi - stats.min_sq_norm))
        return np.stack([low, high]).astype(np.float32)


class DenseFactoryIndexer(DenseIndexer):
    """Any `faiss.index_factory` string with the inner-product metric, e.g. `IVF256,PQ16` or `HNSW32,Flat`.

    An index that needs training is trained on a uniform random sample of up to `train_sample_size` vectors.
    `search_params` (e.g. `nprobe=32`) are applied with faiss.ParameterSpace after building and loading.
    """

    kind = "factory"

    def __init__(
        self,
        factory_string: str,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        train_sample_size: int = 100_000,
        search_params: str = "",
        seed: int = 0,
        check_memory: bool = True,
    ) -> None:
        super().__init__(buffer_size, check_memory)
        self.factory_string = factory_string
        self.train_sample_size = train_sample_size
        self.search_params = search_params
        self.seed = seed

    def _create_index(self, dim: int) -> faiss.Index:
        try:
            return faiss.index_factory(dim, self.factory_string, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:  # FAISS's message: "Error in <C++ function> at <file>:<line>: <reason>"
            reason = str(e).split(": ", 1)[-1].strip()
            raise ConfigError(f"index_factory={self.factory_string!r} is refused by FAISS for {dim}-dimensional "
                              f"vectors ({reason}); give a FAISS index_factory string such as IVF4096,Flat or "
                              f"HNSW32,Flat") from None

    def _bytes_per_vector(self, dim: int) -> int:
        generic_index = self._create_index(dim)
        index = faiss.downcast_index(generic_index)  # a view: generic_index must outlive it
        if isinstance(index, faiss.IndexHNSW):
            storage = faiss.downcast_index(index.storage)
            return storage.sa_code_size() + _hnsw_link_bytes(index.hnsw.nb_neighbors(1))
        try:
            code_size = index.sa_code_size()
        except RuntimeError:  # index types without standalone codes: assume full vectors
            code_size = dim * 4
        ivf_ids = _FAISS_ID_BYTES if faiss.try_extract_index_ivf(index) is not None else 0
        return code_size + ivf_ids

    def estimate_memory(self, n: int, dim: int) -> int:
        training = min(n, self.train_sample_size) * dim * 4
        return n * (self._bytes_per_vector(dim) + _BYTES_PER_ID) + training

    def _needs_first_pass(self) -> bool:
        return self.index is None

    def _scan(self, blocks: Iterable[IndexBlock]) -> BlockStats:
        return scan_blocks(blocks, self.train_sample_size, self.seed)

    def _build_from_stats(self, stats: BlockStats) -> None:
        super()._build_from_stats(stats)
        if not self.index.is_trained:
            logger.info("training %s on %d sampled vectors", self.factory_string, len(stats.sample))
            self.index.train(np.ascontiguousarray(stats.sample))
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, self.search_params)

    def _meta_fields(self) -> dict:
        return {"factory_string": self.factory_string}

    def _restore(self, meta: dict) -> None:
        self._apply_search_params()


INDEXER_TYPES: dict[str, type[DenseIndexer]] = {
    "flat": DenseFlatIndexer,
    "hnsw": DenseHNSWFlatIndexer,
    "hnsw_sq": DenseHNSWSQIndexer,
    "factory": DenseFactoryIndexer,
}


def create_indexer(kind: str, **kwargs) -> DenseIndexer:
    """An indexer by DPR's config name (`flat`, `hnsw`, `hnsw_sq`) or `factory` (needs `factory_string`)."""
    if kind not in INDEXER_TYPES:
        raise ConfigError(f"unknown indexer {kind!r}; expected one of {tuple(INDEXER_TYPES)}")
    return INDEXER_TYPES[kind](**kwargs)

