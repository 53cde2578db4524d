"""Provenance records: what a derived file (an embedding shard, reader samples) was made from, and the first
field in which two records differ."""
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Type, Union

_SAMPLE_BLOCKS, _SAMPLE_BLOCK_BYTES = 64, 4096



def read_record(location: Union[str, Path], record_format: str, error: Type[Exception], what: str,
                way_out: str) -> Optional[dict]:
    """The JSON record at `location` whose `format` is `record_format`, or None when there is none; a file that is
    not one raises `error` naming it as `what`, with `way_out`."""
    location = Path(location)
    if not location.is_file():
        return None
    try:
        record = json.loads(location.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{location}: unreadable {what} ({e}); {way_out}") from e
    if not isinstance(record, dict) or record.get("format") != record_format:
        raise error(f"{location} is not a {what}; {way_out}")
    return record


def file_identity(path: Union[str, Path], sha256: Optional[str] = None) -> dict:
    """What a provenance record keeps of an input file. The fast check, before any work: its size and a hash of 64
    blocks of 4 KiB spread over it (the whole of a file under 256 KiB; milliseconds for Wikipedia's 13 GB): it
    proves the file was not replaced by one of another size or with other sampled blocks, NOT that it is unchanged
    (a same-size edit between the blocks, a case change, two equal-length rows swapped pass it). The full check:
    `sha256`, a digest of every byte, recorded when given (computed by the caller while it read the whole file
    anyway). For information and for `full_identity`: the absolute path, mtime, and the file's device, inode and
    ctime (which every write sets to now, and which no call can set back)."""
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        if stat.st_size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
            digest.update(file.read())
        else:
            stride = (stat.st_size - _SAMPLE_BLOCK_BYTES) // (_SAMPLE_BLOCKS - 1)
            for block in range(_SAMPLE_BLOCKS):
                file.seek(block * stride)
                digest.update(file.read(_SAMPLE_BLOCK_BYTES))
    return {
        "path": os.path.abspath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sample_hash": "blake2b:" + digest.hexdigest(),
        "stat": {"device": stat.st_dev, "inode": stat.st_ino, "ctime_ns": stat.st_ctime_ns},
        **({"sha256": sha256} if sha256 else {}),
    }


# The fields of `file_identity` that say what a file holds, wherever it lies (not its path, mtime or stat).
CONTENT_KEYS = ("size", "sample_hash")


def unchanged_since(earlier: Optional[dict], now: dict) -> bool:
    """Whether `now` (a `file_identity`) is provably the very file `earlier` identified, untouched since: the same
    inode of the same device, with the same ctime, size and mtime (a write, a rename over it, a copy all change one
    of them). Not comparable between machines: there it is False and the content is read."""
    return bool(earlier) and earlier.get("stat") is not None and all(
        earlier.get(key) == now.get(key) for key in ("stat", "size", "mtime_ns", "sample_hash"))


def full_identity(path: Union[str, Path], earlier: Optional[dict] = None) -> dict:
    """`file_identity` with the sha256 of the whole file: `earlier`'s (an identity recorded before) when the file
    is unchanged since (`unchanged_since`: no byte read), else computed by reading the whole file."""
    now = file_identity(path)
    if unchanged_since(earlier, now) and earlier.get("sha256"):
        return {**now, "sha256": earlier["sha256"]}
    return {**now, "sha256": "sha256:" + sha256_of_file(path)}


def content_difference(saved: dict, now: dict) -> Optional["Difference"]:
    """The first content field (size, sampled hash, then the whole file's sha256 where both identities have one)
    in which a recorded file identity and the file's now differ."""
    return differing_field(saved, now, keys=CONTENT_KEYS, when_both=("sha256",))


def sha256_of_file(path: Union[str, Path]) -> str:
    """The hex sha256 of the whole file (for files whose every byte must be vouched for: downloads, the question
    samples a recipe stage reads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Difference(NamedTuple):
    field: str  # dotted, e.g. model.encoder_params.encoder.pooling
    first: object
    second: object

    def __str__(self) -> str:
        return f"{self.field} differs ({self.first!r} vs {self.second!r})"


def differing_field(first: dict, second: dict, keys: Optional[Iterable[str]] = None, ignore: Iterable[str] = (),
                    first_keys: Sequence[str] = (), when_both: Iterable[str] = ()) -> Optional[Difference]:
    """The first dotted field (of `keys`, or of all but `ignore`, those of `first_keys` first) whose values
    differ. Fields of `when_both` (and those under them: `a` covers `a.b`), which records of older versions lack,
    are compared only where both records hold them, after the others."""
    a, b = _flatten(first), _flatten(second)
    optional = tuple(when_both)

    def is_optional(name: str) -> bool:
        return any(name == key or name.startswith(key + ".") for key in optional)

    ignored = set(ignore)
    names = list(keys) if keys is not None else sorted(set(a) | set(b), key=lambda name: (name not in first_keys, name))
    names = [name for name in names if not is_optional(name)]
    names += sorted(name for name in set(a) | set(b) if is_optional(name) and name in a and name in b)
    for name in names:
        if name not in ignored and a.get(name) != b.get(name):
            return Difference(name, a.get(name), b.get(name))
    return None
