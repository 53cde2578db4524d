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


def file_identity(path: Union[str, Path]) -> dict:
    """What a provenance record keeps of an input file: its absolute path, size, mtime and a hash of 64 blocks
    of 4 KiB spread over it (the whole of a file under 256 KiB): cheap for Wikipedia's 13 GB, and with size and
    mtime it catches any rewrite."""
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
    }


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
                    first_keys: Sequence[str] = ()) -> Optional[Difference]:
    """The first dotted field (of `keys`, or of all but `ignore`, those of `first_keys` first) whose values
    differ."""
    a, b = _flatten(first), _flatten(second)
    ignored = set(ignore)
    names = list(keys) if keys is not None else sorted(set(a) | set(b), key=lambda name: (name not in first_keys, name))
    for name in names:
        if name not in ignored and a.get(name) != b.get(name):
            return Difference(name, a.get(name), b.get(name))
    return None
