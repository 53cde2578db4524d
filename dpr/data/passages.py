"""DPR's passage collection (`psgs_w100.tsv`): the one `Passage` type, streaming reads, counting, ceil sharding.

The file is tab separated with a header `id\ttext\ttitle` and CSV-quoted texts, so it is read with
`csv.reader(delimiter='\t')`; texts get `strip('"')` as DPR's CsvCtxSrc does. `.gz` files are read transparently.
A malformed file is refused, never read approximately: a row whose quoting runs across lines (an unbalanced quote
would merge the following rows), a row without exactly three fields (an unquoted tab in a text splits it) and an id
used twice (both index entries would show one of the two texts, so an answer in the other could never be found) are
errors naming the file and lines.
"""
import csv
import hashlib
import itertools
import logging
import math
import unicodedata
from array import array
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from dpr.data.data_files import DataFileError, open_text
from dpr.foundation.errors import ConfigError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
PassageFile = Tuple[PathLike, str]  # (path, id prefix)


class Passage(NamedTuple):
    """A passage of a collection (`id` with its source's prefix) or of a training sample (`id` is its
    `passage_id`, if any; `title` may be None)."""

    id: Optional[str]
    text: str
    title: Optional[str] = None


def passage_text_key(text: object) -> str:
    """A passage text as positives are recognised: Unicode NFC, case folded, whitespace runs as one space. A copy
    of a positive under another id (a collection split twice, a passage indexed twice) differs in no more, and
    mined as a negative it would train the model away from the answer."""
    if not isinstance(text, str):
        return ""
    return " ".join(unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold()).split())


def _numbered_rows(path: PathLike, digest=None) -> Iterator[Tuple[int, list]]:
    """(line number, fields) of the data rows of a passages TSV, read as DPR reads it (csv.reader, tab delimiter,
    its default double-quote quoting); header and blank lines are left out. A row must end on the line it starts
    on: DPR's file has one passage per line, and a text opening a quote it never closes would otherwise swallow
    the following rows into one passage. `digest`: see `open_text`."""
    with open_text(path, digest) as reader:
        rows = csv.reader(reader, delimiter="\t")
        line = 0
        try:
            for row in rows:
                line += 1
                if rows.line_num != line:
                    raise DataFileError(
                        f"{path}, line {line}: a double-quoted text opened here runs across lines "
                        f"{line}-{rows.line_num} (an unbalanced quote, or a newline inside a text): a passages "
                        "TSV holds one passage per line; close the quote or write an inner quote as \"\"")
                if not row or (line == 1 and row[0] == "id"):
                    continue
                yield line, row
        except csv.Error as e:
            raise DataFileError(f"{path}, line {rows.line_num}: not a readable passages TSV ({e})") from e


def _check_fields(row: list, path: PathLike, line: int) -> None:
    if len(row) != 3:
        hint = ("; a tab inside a text needs the text in double quotes" if len(row) > 3
                else "; is it a passages TSV?")
        raise DataFileError(f"{path}, line {line}: expected 3 tab-separated fields 'id<TAB>text<TAB>title', got "
                            f"{len(row)}{hint}")


def _to_passage(row: list, id_prefix: str, path: PathLike, line: int) -> Passage:
    _check_fields(row, path, line)
    return Passage(id_prefix + row[0], row[1].strip('"'), row[2])


def _numbered_passages(path: PathLike, id_prefix: str, digest=None) -> Iterator[Tuple[int, Passage]]:
    for line, row in _numbered_rows(path, digest):
        yield line, _to_passage(row, id_prefix, path, line)


class _UniqueIdCheck:
    """Refuses a collection whose ids repeat, at 8 bytes a passage: during a full pass only each id's hash is kept
    (168 MB for the 21M passages of psgs_w100, where a set of the ids would take about 2 GB), and the hashes are
    compared at the end. Only when one repeats are the files read again, to find the repeated id and its lines
    (a repeated hash of different ids is let through)."""

    def __init__(self, files: Sequence[PassageFile]):
        self.files = files
        self.hashes = array("q")

    def add(self, passage_id: str) -> None:
        self.hashes.append(hash(passage_id))

    def check(self) -> None:
        ordered = np.sort(np.frombuffer(self.hashes, dtype=np.int64))
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            return
        suspects = set(repeated.tolist())
        seen: dict = {}
        for path, id_prefix in self.files:
            for line, passage in _numbered_passages(path, id_prefix):
                if hash(passage.id) not in suspects:
                    continue
                if passage.id in seen:
                    first_path, first_line = seen[passage.id]
                    first = f"line {first_line}" + ("" if first_path == path else f" of {first_path}")
                    raise DataFileError(
                        f"{path}, line {line}: passage id {passage.id[len(id_prefix):]!r} is already used on "
                        f"{first}; ids must be unique (two passages under one id show one text, and an answer in "
                        f"the other is never found): remove or renumber one of them")
                seen[passage.id] = (path, line)


def iter_passage_files(files: Sequence[PassageFile],
                       on_file_read: Optional[Callable[[int, str], None]] = None) -> Iterator[Passage]:
    """Every passage of the files, in order, each id with its file's prefix, without holding them in memory. A pass
    that reaches the end raises DataFileError if an id (with its prefix) repeats, in one file or across them.
    `on_file_read(position, "sha256:...")`: told the digest of each file's every byte once it is read to its end
    (from the bytes this pass reads: no second reading)."""
    unique_ids = _UniqueIdCheck(files)
    for position, (path, id_prefix) in enumerate(files):
        digest = hashlib.sha256() if on_file_read is not None else None
        for _, passage in _numbered_passages(path, id_prefix, digest):
            unique_ids.add(passage.id)
            yield passage
        if on_file_read is not None:
            on_file_read(position, "sha256:" + digest.hexdigest())
    unique_ids.check()


def iter_passages(path: PathLike, id_prefix: str = "") -> Iterator[Passage]:
    """Stream every passage of the file, in file order (ids checked unique once the end is reached)."""
    return iter_passage_files([(path, id_prefix)])


def count_passages(path: PathLike, digest=None) -> int:
    """The number of passages (one per line). Being a full pass, it also refuses malformed rows and repeated ids,
    before any passage is embedded; `digest` (a hashlib object) gets every byte of the file."""
    unique_ids = _UniqueIdCheck([(path, "")])
    count = 0
    for line, row in _numbered_rows(path, digest):  # no Passage objects: this pass only counts and checks
        _check_fields(row, path, line)
        unique_ids.add(row[0])
        count += 1
    unique_ids.check()
    return count


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [start, end) rows of a shard with DPR's ceil split; every row lands in exactly one shard.

    Trailing shards may be empty (n=1 over 3 shards gives [0,1), [1,1), [1,1)).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"shard_id {shard_id} is not in [0, {num_shards})")
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
    """Stream only the passages of one shard; `total` (the passage count) saves a counting pass when known.

    A shard alone cannot see an id repeated in another shard: the counting pass (count_passages) checks the whole
    file, so pass a `total` that came from it.
    """
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
