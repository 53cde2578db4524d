"""Passage-embedding shard files: DPR/GC pickles for compatibility, and a pickle-free `.npz` format.

- `dpr`: a pickled `list[(id, np.float32[D])]` at `{out_file}_{shard_id}` (extra tuple fields are ignored on read).
- `gc`: the same pickle at `{out_file}_{shard_id}.pkl` (also the name of DPR's released shards).
- `npz`: `{out_file}_{shard_id}.npz` holding an `ids` string array and a `vectors` float32 [n, D] array.
  Pickles are read through a restricted unpickler (`dpr.foundation.safe_pickle`) that admits ids and numpy arrays only,
  so a shard carrying a payload is refused instead of run.

Writes are atomic (a temporary file in the same folder, then `os.replace`), so a shard file that exists is complete
and a rerun can skip it. Readers stream one file at a time.
"""
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from dpr.data.data_files import expand_glob
from dpr.data.resources import DataPathError
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import TEMP_SUFFIX, atomic_output
from dpr.foundation.safe_pickle import NUMPY_GLOBALS, restricted_load

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
EmbeddingBlock = tuple[list[str], np.ndarray]

SHARD_SUFFIXES = {"dpr": "", "gc": ".pkl", "npz": ".npz"}
_INDEX_FILE_ENDINGS = ("index.dpr", "index_meta.dpr")
_PICKLE_STOP_OPCODE = b"."


class ShardFileError(UserInputError):
    """An embedding shard that cannot be read as one."""


class NonFiniteVectorsError(UserInputError):
    """Vectors holding NaN or infinity: inner products with them are NaN, and FAISS drops those results."""


def refuse_non_finite(vectors: np.ndarray, what: str, ids: Optional[Sequence[object]] = None,
                      way_out: str = "re-embed them in fp32 or bf16 (fp16 overflow makes such vectors)") -> None:
    """Raise NonFiniteVectorsError naming `what` and its first rows (and ids) that hold NaN or infinity: such a
    passage would silently vanish from every result list, such a question would find nothing."""
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise non_finite_error(np.flatnonzero(~finite), len(finite), what, ids, way_out)


def non_finite_error(rows: np.ndarray, total: int, what: str, ids: Optional[Sequence[object]],
                     way_out: str) -> NonFiniteVectorsError:
    shown = ", ".join(f"{row}" + (f" (id {ids[row]})" if ids is not None else "") for row in rows[:5].tolist())
    return NonFiniteVectorsError(
        f"{what}: {len(rows)} of {total} vectors hold NaN or infinity (rows {shown}{' ...' if len(rows) > 5 else ''})"
        f"; {way_out}")


def shard_path(out_file: PathLike, shard_id: int, fmt: str = "npz") -> Path:
    """The file name of shard `shard_id` in format `dpr`, `gc` or `npz`."""
    if fmt not in SHARD_SUFFIXES:
        raise ValueError(f"unknown embedding format {fmt!r}; expected one of {tuple(SHARD_SUFFIXES)}")
    return Path(f"{out_file}_{shard_id}{SHARD_SUFFIXES[fmt]}")


def _is_npz(path: PathLike) -> bool:
    return str(path).endswith(".npz")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with atomic_output(path) as temp_name, open(temp_name, "wb") as temp_file:
        write(temp_file)


def write_embeddings(path: PathLike, ids: Sequence[object], vectors: np.ndarray) -> Path:
    """Atomically write one shard: `.npz` when the name ends so, otherwise DPR's pickled list of tuples."""
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"need a [len(ids)={len(ids)}, D] array of vectors, got shape {vectors.shape}")
    refuse_non_finite(vectors, f"refused to write the embedding shard {path}", ids)
    if _is_npz(path):
        id_array = np.array([str(doc_id) for doc_id in ids], dtype=str)
        _atomic_write(path, lambda file: np.savez(file, ids=id_array, vectors=vectors))
    else:
        records = [(doc_id, vector) for doc_id, vector in zip(ids, vectors)]
        _atomic_write(path, lambda file: pickle.dump(records, file, protocol=4))
    logger.info("wrote %d embeddings of dimension %d to %s", len(ids), vectors.shape[1], path)
    return path


def is_shard_complete(path: PathLike) -> bool:
    """Whether a finished shard is at `path`: a whole zip for `.npz`, a pickle ending in its STOP opcode otherwise.

    Files written here are atomic, so existence suffices for them; the content check also catches a truncated
    file left by another writer.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if _is_npz(path):
        return zipfile.is_zipfile(path)
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == _PICKLE_STOP_OPCODE


def _with_prefix(doc_id: object, id_prefix: str) -> str:
    """DPR's iterate_encoded_files: prefix the ids that lack the source's prefix."""
    doc_id = str(doc_id)
    return doc_id if doc_id.startswith(id_prefix) else id_prefix + doc_id


def read_embeddings(path: PathLike, id_prefix: str = "") -> EmbeddingBlock:
    """One shard file as (ids, float32 [n, D] vectors). Pickles are read admitting only ids and numpy arrays, so a
    shard cannot run code; a truncated or malformed shard, or one holding NaN or infinite vectors (every reader of
    shards comes here: the flat and built indexes, the shard-wise search, mining), is an error that names it."""
    if _is_npz(path):
        try:
            with np.load(path, allow_pickle=False) as shard:
                ids, vectors = shard["ids"].tolist(), shard["vectors"].astype(np.float32, copy=False)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise ShardFileError(f"{path}: truncated or not an embedding shard ({type(e).__name__}: {e})") from e
    else:
        records = restricted_load(path, NUMPY_GLOBALS, "DPR embedding shard")
        if not isinstance(records, list) or not all(isinstance(r, (tuple, list)) and len(r) >= 2 for r in records):
            raise ShardFileError(f"{path}: not an embedding shard (expected a pickled list of (id, vector) tuples)")
        ids = [record[0] for record in records]
        vectors = (
            np.stack([record[1] for record in records]).astype(np.float32, copy=False)
            if records
            else np.empty((0, 0), dtype=np.float32)  # an empty pickle does not tell the dimension
        )
    refuse_non_finite(vectors, f"the embedding shard {path}", ids,
                      "re-embed that shard in fp32 or bf16 (fp16 overflow makes such vectors)")
    return [_with_prefix(doc_id, id_prefix) for doc_id in ids], vectors


def _is_embedding_file(path: str) -> bool:
    """Leaves out what a `*` glob beside the shards would also match: FAISS index files and temporary files."""
    name = os.path.basename(path)
    return os.path.isfile(path) and not (
        name.endswith(_INDEX_FILE_ENDINGS) or name.endswith(TEMP_SUFFIX) or name.startswith(".")
    )


def expand_embedding_paths(patterns: Union[PathLike, Sequence[PathLike]]) -> list[Path]:
    """Shard files named by paths or globs, in order; each glob's matches are filtered and naturally sorted."""
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    paths: list[Path] = []
    for pattern in patterns:
        matches = expand_glob(pattern, keep=_is_embedding_file)
        if not matches:
            raise DataPathError(f"no embedding shard file is or matches {pattern}")
        paths.extend(Path(match) for match in matches)
    return paths


def check_dimension(path: PathLike, vectors: np.ndarray, dim: Optional[int], first: Optional[PathLike]) -> None:
    """Refuse a shard whose vectors have another dimension than `dim`, those of shard `first` (empty shards say
    nothing)."""
    if dim is not None and len(vectors) and vectors.shape[1] != dim:
        raise ShardFileError(
            f"{path} holds vectors of dimension {vectors.shape[1]}, {first} of dimension {dim}: they come from "
            "different models; name only shards of one model in encoded_ctx_files"
        )


def _read_each(paths: Sequence[Path], id_prefix: str) -> Iterator[EmbeddingBlock]:
    dim, first = None, None
    for path in paths:
        logger.info("reading embeddings from %s", path)
        ids, vectors = read_embeddings(path, id_prefix)
        check_dimension(path, vectors, dim, first)
        if dim is None and len(vectors):
            dim, first = vectors.shape[1], path
        yield ids, vectors


def iter_embedding_blocks(
    patterns: Union[PathLike, Sequence[PathLike]], id_prefix: str = ""
) -> Iterator[EmbeddingBlock]:
    """Stream (ids, vectors) per shard file, holding one file in memory at a time."""
    return _read_each(expand_embedding_paths(patterns), id_prefix)


class EmbeddingFiles:
    """A re-iterable view of shard files: each iteration streams them again (two-pass indexing needs this)."""

    def __init__(self, patterns: Union[PathLike, Sequence[PathLike]], id_prefix: str = "") -> None:
        self.paths = expand_embedding_paths(patterns)
        self.id_prefix = id_prefix

    def __iter__(self) -> Iterator[EmbeddingBlock]:
        return _read_each(self.paths, self.id_prefix)

    def __len__(self) -> int:
        return len(self.paths)
