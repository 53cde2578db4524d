"""Reading the user's data files: the one text opener (gzip by name, BOM stripped, bad bytes named with their
offset) and the one glob expander, for every data reader of the package."""
import codecs
import glob
import gzip
import io
import os
import re
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, TextIO, Union

from dpr.foundation.errors import UserInputError

PathLike = Union[str, Path]

GZIP_MAGIC = b"\x1f\x8b"
_GLOB_CHARS = re.compile(r"[*?\[]")
_CHUNK_SIZE = 1 << 20


class DataFileError(UserInputError, ValueError):
    """A data file that cannot be read as what it should be; the message names the file and the place."""


def is_gzip_name(path: PathLike) -> bool:
    return str(path).endswith(".gz")


def without_gz(path: PathLike) -> str:
    """The name that tells the format: `dev.json.gz` -> `dev.json`."""
    return str(path)[: -len(".gz")] if is_gzip_name(path) else str(path)


def _open_binary(path: PathLike) -> BinaryIO:
    return gzip.open(path, "rb") if is_gzip_name(path) else open(path, "rb")


class _DigestingReader(io.RawIOBase):
    """A binary file whose every byte read also goes into `digest` (a hashlib object): the digest of a whole file
    at the cost of the reading the caller does anyway."""

    def __init__(self, raw: BinaryIO, digest) -> None:
        super().__init__()
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        if count:
            self.digest.update(memoryview(buffer)[:count])
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


@contextmanager
def open_text(path: PathLike, digest=None) -> Iterator[TextIO]:
    """A UTF-8 text file for reading, gunzipped on the fly when its name ends in `.gz`. A leading byte order mark
    is dropped (else a TSV header or the first question would keep it). Bytes that are not UTF-8, and a damaged
    gzip stream, raise DataFileError naming the file and the byte offset, also when they are met half-way through
    the reading done inside the `with` block. newline="" leaves line ends to the csv module, as it requires.
    `digest` (a hashlib object): updated with every byte of the file read, so that once the text is read to its
    end it is the digest of the whole file."""
    opener = gzip.open if is_gzip_name(path) else open
    try:
        with ExitStack() as files:
            if digest is None:
                stream = files.enter_context(opener(path, "rt", encoding="utf-8-sig", newline=""))
            else:  # the digest is of the file's bytes (compressed ones for .gz)
                binary = files.enter_context(io.BufferedReader(
                    _DigestingReader(open(path, "rb", buffering=0), digest), buffer_size=_CHUNK_SIZE))
                stream = files.enter_context(
                    gzip.open(binary, "rt", encoding="utf-8-sig", newline="") if is_gzip_name(path)
                    else io.TextIOWrapper(binary, encoding="utf-8-sig", newline=""))
            yield stream
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: {_describe_bad_bytes(path)}") from error
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # EOFError: the stream ends before its trailer
        raise DataFileError(f"{path}: not a whole gzip file ({error}); download it again, or remove '.gz' from the "
                            f"name if it is not compressed") from error


def first_invalid_utf8_offset(path: PathLike) -> Optional[int]:
    """The offset of the first byte (of the decompressed data for `.gz`) that is not valid UTF-8; None if all are."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with _open_binary(path) as source:
        while True:
            chunk = source.read(_CHUNK_SIZE)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                return consumed - pending + error.start
            if not chunk:
                return None
            consumed += len(chunk)


def _describe_bad_bytes(path: PathLike) -> str:
    offset = first_invalid_utf8_offset(path)
    where = "the file" if offset is None else f"byte {offset}" + (" of the decompressed data" if is_gzip_name(path)
                                                                   else "")
    with _open_binary(path) as source:
        compressed = source.read(2) == GZIP_MAGIC
    if compressed and not is_gzip_name(path):
        return (f"{where} is not UTF-8 text: the file starts with gzip's magic bytes, so it is compressed; "
                f"name it {path}.gz or gunzip it")
    return f"{where} is not UTF-8 text; data files must be UTF-8 (convert it, e.g. with iconv)"


def natural_sort_key(path: PathLike) -> list:
    """`shard_2` before `shard_10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path))]


def expand_glob(pattern: PathLike, keep: Callable[[str], bool] = os.path.isfile) -> List[str]:
    """The files a path or glob names (`~` expanded), in natural order; [] when there is none. Only names for which
    `keep` is true count (files, by default)."""
    expanded = os.path.expanduser(str(pattern))
    if keep(expanded) or not _GLOB_CHARS.search(expanded):  # a name with brackets may be a file's own name
        return [expanded] if keep(expanded) else []
    return sorted((match for match in glob.glob(expanded) if keep(match)), key=natural_sort_key)
