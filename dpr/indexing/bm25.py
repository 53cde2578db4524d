"""A BM25 passage index on the ``bm25s`` package, with the dense indexers' search shape.

Defaults follow the DPR paper's BM25 baseline (Pyserini/Lucene: k1=0.9, b=0.4, Lucene's 33 English stopwords);
tokens are lowercased runs of word characters (no stemming). Index a passage as ``title + " " + text``
(:func:`passage_text`).

A saved index is a folder that appears under its name only when complete (built in a temporary folder beside it,
then renamed); :func:`check_index_location` tells before any work whether one can be loaded or written there.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import bm25s
import numpy as np
import regex
from bm25s.stopwords import STOPWORDS_EN

from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output_directory, ensure_writable_output, remove_stale_temporaries

logger = logging.getLogger(__name__)
# bm25s pins its logger at DEBUG; let it follow the application's level instead.
logging.getLogger("bm25s").setLevel(logging.NOTSET)

IDS_FILE = "passage_ids.json"
SETTINGS_FILE = "bm25_settings.json"
# what bm25s saves (and loads) beside ours
MODEL_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy",
               "indptr.csc.index.npy")
_TOKEN = regex.compile(r"\w+")


class BM25IndexError(UserInputError):
    """A saved BM25 index folder that cannot be loaded, or a place where none can be saved."""


def passage_text(title: str | None, text: str) -> str:
    return f"{title} {text}" if title else text


def _missing_files(directory: Path) -> list[str]:
    return [name for name in MODEL_FILES + (IDS_FILE, SETTINGS_FILE) if not (directory / name).is_file()]


def check_index_location(path: str | Path, option: str) -> None:
    """Before any work: `path` (set by `option`) holds a complete saved index, or is where one can be saved."""
    path = Path(path)
    if path.is_dir():
        missing = _missing_files(path)
        if missing:
            raise BM25IndexError(f"{option}={path}: {_incomplete_message(path, missing)}")
    elif path.exists():
        raise BM25IndexError(f"{option}={path} is a file, not a BM25 index folder: choose another {option}")
    else:
        ensure_writable_output(path, option)


def _incomplete_message(directory: Path, missing: list[str]) -> str:
    return (f"{directory} is not a complete BM25 index (no {', '.join(missing)}): delete the folder to build the "
            "index again, or choose another one")


class BM25Index:
    """Lexical index: ``build`` from passages, ``search`` a batch of queries, ``save``/``load`` a folder."""

    def __init__(self, ids: list[str], model: bm25s.BM25, remove_stopwords: bool, show_progress: bool = False,
                 built_from: Optional[dict] = None):
        self.ids = ids
        self.model = model
        self.remove_stopwords = remove_stopwords
        self.show_progress = show_progress
        # what the index was built from (passages files and settings), saved with it; None for older indexes
        self.built_from = built_from
        self._stopwords = frozenset(STOPWORDS_EN) if remove_stopwords else frozenset()

    @classmethod
    def build(cls, ids: list[str], texts: list[str], k1: float = 0.9, b: float = 0.4, remove_stopwords: bool = True,
              show_progress: bool = False) -> BM25Index:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        index = cls(list(ids), bm25s.BM25(k1=k1, b=b), remove_stopwords, show_progress)
        index.model.index(index.tokenize(texts), show_progress=show_progress)
        logger.info("BM25 index of %d passages (k1=%s, b=%s)", len(ids), k1, b)
        return index

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        return [[token for token in _TOKEN.findall(text.lower()) if token not in self._stopwords] for text in texts]

    def search(self, queries: list[str], k: int) -> list[tuple[list[str], np.ndarray]]:
        """Top-``k`` passages per query, best first: ``(ids, float32 scores)`` (k is capped at the corpus size)."""
        k = min(k, len(self.ids))
        if not queries or k == 0:
            return [([], np.zeros(0, dtype=np.float32)) for _ in queries]
        positions, scores = self.model.retrieve(self.tokenize(queries), k=k, show_progress=self.show_progress,
                                                n_threads=1)
        return [([self.ids[p] for p in row], row_scores.astype(np.float32))
                for row, row_scores in zip(positions, scores)]

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every passage (in ``ids`` order) for one query."""
        token_ids = self.model.get_tokens_ids(self.tokenize([query])[0])
        if not token_ids:
            return np.zeros(len(self.ids), dtype=np.float32)
        return self.model.get_scores_from_ids(token_ids).astype(np.float32)

    def save(self, directory: str | Path) -> None:
        """Into the folder `directory`, atomically: a previous index there stays until this one is complete, and
        temporary folders of killed saves are removed first."""
        directory = Path(directory)
        removed, _ = remove_stale_temporaries(directory.parent, directory.name)
        if removed:
            logger.info("removed %d temporary folder(s) of interrupted saves of %s", removed, directory)
        with atomic_output_directory(directory) as temporary:
            self.model.save(temporary, show_progress=self.show_progress)
            Path(temporary, IDS_FILE).write_text(json.dumps(self.ids), encoding="utf-8")
            settings = {"remove_stopwords": self.remove_stopwords, "built_from": self.built_from}
            Path(temporary, SETTINGS_FILE).write_text(json.dumps(settings), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path, show_progress: bool = False) -> BM25Index:
        directory = Path(directory)
        missing = _missing_files(directory)
        if missing:
            raise BM25IndexError(_incomplete_message(directory, missing))
        model = bm25s.BM25.load(str(directory), show_progress=show_progress)
        ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        settings = json.loads((directory / SETTINGS_FILE).read_text(encoding="utf-8"))
        return cls(ids, model, settings["remove_stopwords"], show_progress, settings.get("built_from"))
