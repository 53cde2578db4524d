"""DPR's passage collection (`psgs_w100.tsv`): streaming reads, counting, and ceil sharding.

The file is tab separated with a header `id\ttext\ttitle` and CSV-quoted texts, so it is read with
`csv.reader(delimiter='\t')`; texts get `strip('"')` as DPR's CsvCtxSrc does. `.gz` files are read transparently.
"""
import csv
import gzip
import itertools
import logging
import math
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, TextIO, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class Passage(NamedTuple):
    id: str
    text: str
    title: str


def open_text_file(path: PathLike) -> TextIO:
    """Open a UTF-8 text file for reading, gunzipping on the fly when the name ends in `.gz`."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _passage_rows(path: PathLike) -> Iterator[list[str]]:
    """The data rows of a passages TSV, header and blank lines left out."""
    with open_text_file(path) as reader:
        rows = csv.reader(reader, delimiter="\t")
        first = next(rows, None)
        if first and first[0] != "id":  # no header line: the first row is data
            yield first
        yield from (row for row in rows if row)


def _to_passage(row: list[str], id_prefix: str, path: PathLike) -> Passage:
    if len(row) < 3:
        raise ValueError(f"{path}: expected 'id<TAB>text<TAB>title', got {len(row)} column(s) in row {row[:1]}")
    return Passage(id_prefix + row[0], row[1].strip('"'), row[2])


def iter_passages(path: PathLike, id_prefix: str = "") -> Iterator[Passage]:
    """Stream every passage of the file, in file order, without holding the collection in memory."""
    for row in _passage_rows(path):
        yield _to_passage(row, id_prefix, path)


def count_passages(path: PathLike) -> int:
    """The number of passages (CSV rows, which may span several lines when a quoted text holds newlines)."""
    return sum(1 for _ in _passage_rows(path))


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [start, end) rows of a shard with DPR's ceil split; every row lands in exactly one shard.

    Trailing shards may be empty (n=1 over 3 shards gives [0,1), [1,1), [1,1)).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
    shard_size = math.ceil(n / num_shards)
    start = min(shard_id * shard_size, n)
    return start, min(start + shard_size, n)


def iter_passage_shard(
    path: PathLike,
    shard_id: int,
    num_shards: int,
    id_prefix: str = "",
    total: Optional[int] = None,
) -> Iterator[Passage]:
    """Stream only the passages of one shard; `total` (the passage count) saves a counting pass when known."""
    total = count_passages(path) if total is None else total
    start, end = shard_range(total, shard_id, num_shards)
    logger.info("shard %d of %d of %s: passages [%d, %d) of %d", shard_id, num_shards, path, start, end, total)
    passages = iter_passages(path, id_prefix)
    try:
        yield from itertools.islice(passages, start, end)
    finally:
        passages.close()  # closes the file now rather than when the half-read generator is collected


def load_passages(path: PathLike, id_prefix: str = "") -> dict[str, tuple[str, str]]:
    """All passages as `id -> (text, title)`, the form answer validation needs."""
    passages = {passage.id: (passage.text, passage.title) for passage in iter_passages(path, id_prefix)}
    logger.info("loaded %d passages from %s", len(passages), path)
    return passages
