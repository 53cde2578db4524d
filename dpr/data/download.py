"""Download the resources of :mod:`dpr.data.resources` into DPR's layout (spec §7), robustly (spec §9 item 18).

Where DPR's downloader is fragile, this one streams in constant memory (also when gunzipping), resumes a partial
``.part`` file with an HTTP Range request, retries dropped connections with exponential backoff, publishes a file
under its final name only once complete, and records the sha256 of every file in ``downloads/checksums.sha256``
(``sha256sum -c`` format), which a rerun verifies: a corrupted file is reported and downloaded again.

A file is complete when it has the size the server announced (Content-Length, or the total of a Content-Range)
and, where the resource has a published size, that size; a body longer than either is refused. A resume only ever
appends bytes of the same version of the remote file: the first response's validator (a strong ETag, else
Last-Modified) is kept beside the ``.part`` and sent as ``If-Range``, so a server whose file changed answers with
the whole new file, which replaces the part; a 206 is appended only when it proves the same version (it starts at
the part's end, its Content-Range total is the first response's size and its validator the saved one), so a
server that ignores If-Range cannot splice two versions. A server that gives no validator gets no resume: each
attempt starts from zero. Several mirrors (base URLs) can be given: a file that one of them cannot serve whole
(of the published size, within the retries and the file's deadline) is fetched from the next, and so is one
that serves what cannot be the file: an HTML page, a ``.gz`` without gzip's first bytes, a ``.csv``/``.tsv``
that does not end with a newline (cut short, with a Content-Length to match).

What the sha256 proves: DPR publishes no digests, so the first download's is recorded and later runs check the
file against it; it catches a later corruption, never a wrong first download (the checks above do what they can).
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, TextIO

from tqdm import tqdm

from dpr.data.resources import (DOWNLOADS_DIR, DPR_BASE_URL, NQ_LICENSE_FILES, RESOURCES_MAP, join_url,
                                local_paths, matching_keys, resource_dir)
from dpr.foundation.errors import UserInputError
from dpr.foundation.files import atomic_output
from dpr.foundation.provenance import sha256_of_file

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
PART_STATE_SUFFIX = ".state"
MANIFEST_NAME = "checksums.sha256"
MIRROR_ENV = "DPR_DOWNLOAD_MIRROR"


class UnknownResourceError(UserInputError, ValueError):
    """The requested name is neither a resource key nor the prefix of one."""


class DownloadError(RuntimeError):
    """A file could not be downloaded (a permanent HTTP error, or retries exhausted)."""


class IncompleteDownloadError(ConnectionError):
    """The connection ended before the announced number of bytes arrived; worth a retry."""


class WrongSizeError(DownloadError):
    """The server serves a file of another size than the published one, or a body longer than it announced: not
    worth a retry from this server."""


class NotTheFileError(DownloadError):
    """The server answers with something that cannot be the file: an HTML page (a login, an error or a captcha
    page served with status 200), a ``.gz`` without gzip's magic bytes, a text file cut in the middle of a line
    (whose short Content-Length matched its short body): not worth a retry from this server."""


class DeadlineError(DownloadError):
    """A file was not complete within its deadline from one server (a server sending a byte a second never trips
    the per-read timeout): the next mirror is asked, or a rerun resumes."""


# A gzip stream's first two bytes (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"
# Uncompressed text data whose last byte must be a newline (DPR's question files end so): a body cut at the end of
# a shortened Content-Length would pass every size check but this one.
LINE_FILES = (".csv", ".tsv")
DEFAULT_DEADLINE_MIN = 360.0


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: attempt ``i`` (from 1) waits ``base_delay_s * 2**(i-1)`` seconds before the next.
    ``timeout_s`` bounds each read; ``deadline_s`` each file from one server, attempts and waits included."""

    max_attempts: int = 6
    base_delay_s: float = 2.0
    timeout_s: float = 60.0
    deadline_s: float = DEFAULT_DEADLINE_MIN * 60


@dataclass(frozen=True)
class PartState:
    """What the bytes of a ``.part`` file are the start of: the remote version (``validator``, for If-Range) and the
    whole file's size. Kept in ``{part}.state`` so that a retry, in this run or a later one, resumes the same
    version and knows when it is complete."""

    validator: str | None
    total: int | None

    @staticmethod
    def file(part: Path) -> Path:
        return part.with_name(part.name + PART_STATE_SUFFIX)

    def save(self, part: Path) -> None:
        with atomic_output(PartState.file(part)) as temp_name:
            Path(temp_name).write_text(json.dumps({"validator": self.validator, "total": self.total}))

    @staticmethod
    def load(part: Path) -> PartState | None:
        try:
            fields = json.loads(PartState.file(part).read_text())
            return PartState(fields["validator"], fields["total"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    PartState.file(part).unlink(missing_ok=True)


class ChecksumManifest:
    """sha256 of every downloaded file, as ``<hex>  <path relative to the downloads folder>`` lines."""

    def __init__(self, path: Path):
        self.path = path
        self.root = path.parent
        self._digests = self._read()

    def _read(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        digests = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.partition("  ")
            if name:
                digests[name] = digest
        return digests

    def _name(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix()

    def get(self, file: Path) -> str | None:
        return self._digests.get(self._name(file))

    def record(self, file: Path, digest: str) -> None:
        self._digests[self._name(file)] = digest
        with atomic_output(self.path) as temp_name:
            Path(temp_name).write_text("".join(f"{d}  {n}\n" for n, d in sorted(self._digests.items())),
                                       encoding="utf-8")


def download(resource: str | None, output_dir: str = "./", mirror: str | Sequence[str] | None = None,
             verify: bool = True, retry: RetryPolicy = RetryPolicy(), out: TextIO = sys.stdout) -> list[str]:
    """Download every resource matching ``resource`` (exact key or raw prefix) and return their local files.

    With ``resource=None`` the keys and their descriptions are printed to ``out`` instead. ``mirror`` (one base URL
    or several, tried in order for each file) replaces the base URL (a mirror holds the same relative paths);
    ``verify=False`` trusts existing files without hashing and accepts a file of another size than the published
    one.
    """
    if resource is None:
        out.write(format_listing())
        return []
    keys = matching_keys(resource)
    if not keys:
        raise UnknownResourceError(f"no resource key is or starts with {resource!r}; "
                                   f"run python data/download_data.py without --resource to list them")
    logger.info("Resources to download: %s", ", ".join(keys))
    manifest = ChecksumManifest(Path(output_dir, DOWNLOADS_DIR, MANIFEST_NAME))
    files: list[str] = []
    for key in keys:
        files.extend(str(path) for path in download_resource(key, output_dir, manifest, mirror, verify, retry))
    return files


def format_listing() -> str:
    width = max(len(key) for key in RESOURCES_MAP)
    lines = ["Resources (python data/download_data.py --resource KEY; a key prefix downloads every match):"]
    lines += [f"  {key:<{width}}  {resource.description}" for key, resource in RESOURCES_MAP.items()]
    return "\n".join(lines) + "\n"


def mirror_list(mirror: str | Sequence[str] | None) -> list[str]:
    return [mirror] if isinstance(mirror, str) else list(mirror or [])


def download_resource(key: str, output_dir: str, manifest: ChecksumManifest,
                      mirror: str | Sequence[str] | None = None, verify: bool = True,
                      retry: RetryPolicy = RetryPolicy()) -> list[Path]:
    """Fetch one key's file(s), plus the NQ licence files next to NQ-derived data."""
    resource = RESOURCES_MAP[key]
    targets = local_paths(key, output_dir)
    bases = mirror_list(mirror) or [resource.base_url]
    for position, target in enumerate(targets):
        urls = [resource.urls(base)[position] for base in bases]
        ensure_file(urls, target, resource.compressed, manifest, verify, retry, resource.size)
    if resource.nq_license:
        for remote_path in NQ_LICENSE_FILES:
            license_target = resource_dir(key, output_dir) / Path(remote_path).name
            urls = [join_url(base, remote_path) for base in mirror_list(mirror) or [DPR_BASE_URL]]
            ensure_file(urls, license_target, False, manifest, verify, retry)
    return targets


def ensure_file(urls: Sequence[str], target: Path, compressed: bool, manifest: ChecksumManifest, verify: bool,
                retry: RetryPolicy, published_size: int | None = None) -> None:
    """Make ``target`` a complete, checksum-verified copy of the file at ``urls`` (mirrors of one file, tried in
    order; gunzipped when ``compressed``). Unless ``verify`` is off, what is fetched must be of ``published_size``
    (the size of the file as fetched) and look like the file (`NotTheFileError`); a server that fails this, or
    its deadline, gives way to the next one."""
    if target.exists():
        if is_intact(target, manifest, verify):
            logger.info("Skipping %s: already downloaded", target)
            return
        logger.warning("Checksum mismatch for %s: the file is corrupted, downloading it again", target)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + (".gz" if compressed else "") + ".part")
    failures = []
    for url in urls:
        logger.info("Downloading %s to %s", url, target)
        try:
            fetch_with_retries(url, part, retry, published_size if verify else None,
                               expected_content(target, compressed) if verify else None)
            if verify and not compressed:
                check_line_file_end(url, part, target)
            digest = gunzip_to(part, target) if compressed else publish(part, target)
        except DownloadError as err:
            failures.append(str(err))
            if url != urls[-1]:
                logger.warning("%s; trying the next mirror", err)
                discard_part(part)  # another server's version: never resumed from another one
            continue
        manifest.record(target, digest)
        return
    if len(failures) == 1:
        raise DownloadError(failures[0])
    raise DownloadError(f"no mirror served {target.name} whole: " + "; ".join(failures)
                        + ". Check the mirrors (--mirror), or rerun later to resume")


def is_intact(target: Path, manifest: ChecksumManifest, verify: bool) -> bool:
    """Whether an existing file matches its recorded sha256; a file with no record is trusted and recorded."""
    recorded = manifest.get(target)
    if not verify:
        return True
    digest = sha256_of_file(target)
    if recorded is None:
        logger.info("No recorded checksum for existing %s: recording it", target)
        manifest.record(target, digest)
        return True
    return digest == recorded


@dataclass(frozen=True)
class ExpectedContent:
    """What the fetched bytes of a file must look like: not an HTML page, and starting with ``magic``."""

    name: str
    magic: bytes = b""


def expected_content(target: Path, compressed: bool) -> ExpectedContent:
    return ExpectedContent(target.name, GZIP_MAGIC if compressed else b"")


def check_line_file_end(url: str, part: Path, target: Path) -> None:
    """A text data file (``.csv``, ``.tsv``) that does not end with a newline was cut in a line."""
    if target.suffix not in LINE_FILES or part.stat().st_size == 0:
        return
    with open(part, "rb") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) != b"\n":
            discard_part(part)
            raise NotTheFileError(f"{url} does not end with a newline: cut short in a line, not the whole "
                                  f"{target.name} (check the mirror; --no-verify accepts it)")


def fetch_with_retries(url: str, part: Path, retry: RetryPolicy, published_size: int | None = None,
                       content: ExpectedContent | None = None) -> None:
    """Fetch ``url`` into ``part``, resuming after each dropped connection, with bounded exponential backoff,
    within ``retry.deadline_s``."""
    deadline = time.monotonic() + retry.deadline_s
    for attempt in range(1, retry.max_attempts + 1):
        try:
            fetch_to_part(url, part, retry.timeout_s, published_size, content, deadline)
            return
        except DeadlineError as err:
            raise deadline_error(url, retry.deadline_s, part) from err
        except urllib.error.HTTPError as err:
            if not is_transient_http_error(err.code):
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
            failure: Exception = err
        except urllib.error.URLError as err:
            if isinstance(err.reason, FileNotFoundError):  # a file:// mirror that lacks the file
                raise DownloadError(f"{url}: {err.reason}") from err
            failure = err
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, incomplete bodies
            failure = err
        if attempt == retry.max_attempts:
            raise DownloadError(f"{url}: giving up after {attempt} attempts ({failure}); another server may hold "
                                f"the same files: --mirror URL [URL ...] (or ${MIRROR_ENV}), tried in order") \
                from failure
        delay = retry.base_delay_s * 2 ** (attempt - 1)
        if time.monotonic() + delay > deadline:
            raise deadline_error(url, retry.deadline_s, part) from failure
        logger.warning("Attempt %d/%d for %s failed (%s); resuming in %.1f s",
                       attempt, retry.max_attempts, url, failure, delay)
        time.sleep(delay)


def is_transient_http_error(code: int) -> bool:
    return code in (408, 429) or code >= 500


def deadline_error(url: str, deadline_s: float, part: Path) -> DeadlineError:
    received = part.stat().st_size if part.exists() else 0
    return DeadlineError(f"{url}: not complete within its deadline of {deadline_s / 60:g} min ({received} bytes "
                         f"received); a slower server needs a longer --deadline_min, a rerun resumes")


def fetch_to_part(url: str, part: Path, timeout_s: float, published_size: int | None = None,
                  content: ExpectedContent | None = None, deadline: float = float("inf")) -> None:
    """Append the rest of ``url`` to ``part`` (a Range request, valid only for the version the part holds, when it
    has bytes); raise IncompleteDownloadError when fewer bytes than the file's size arrived, WrongSizeError when
    the server's size is not the published one or it sends more bytes than that, NotTheFileError when the answer
    is not of ``content``, DeadlineError past ``deadline`` (a ``time.monotonic()``)."""
    state = PartState.load(part) if part.exists() else None
    offset = part.stat().st_size if state is not None and state.validator else 0
    headers = {"Range": f"bytes={offset}-", "If-Range": state.validator} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        if content_range_total(err.headers.get("Content-Range")) == offset and state.total in (None, offset):
            return  # the part already holds the whole file
        logger.warning("Partial file %s does not fit the remote file: restarting it", part)
        discard_part(part)
        fetch_to_part(url, part, timeout_s, published_size, content, deadline)
        return
    with response:
        if content is not None and response.headers.get_content_type() == "text/html":
            response.close()
            discard_part(part)
            raise NotTheFileError(f"{url} answered with an HTML page, not the data file {content.name} (a login, "
                                  f"error or captcha page? check the mirror; --no-verify accepts it)")
        # A changed remote file (If-Range failed), a server that ignores Range and file:// URLs (status None)
        # answer with the whole file.
        if response.status == 206:
            total = content_range_total(response.headers.get("Content-Range"))
            mismatch = resume_mismatch(response.headers, offset, state, published_size)
            if mismatch:
                logger.warning("%s answered the resume of %s with %s: not the version the part holds, downloading "
                               "it from the start", url, part.name, mismatch)
                response.close()
                discard_part(part)
                fetch_to_part(url, part, timeout_s, published_size, content, deadline)
                return
        else:
            if offset:
                logger.warning("%s changed since %s was started (or ignores ranges): downloading it from the start",
                               url, part.name)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            state = PartState(strong_validator(response.headers), total)
            state.save(part)
        if published_size is not None and total is not None and total != published_size:
            discard_part(part)
            raise WrongSizeError(f"{url} has {total} bytes where {published_size} are published for it: not the "
                                 f"expected file (check the mirror; --no-verify accepts it)")
        expected = total if total is not None else published_size
        magic = content.magic if content is not None and not offset else b""
        with open(part, "ab" if offset else "wb") as sink:
            stopped = copy_with_progress(response, sink, expected, offset, part.name, deadline, magic)
        if stopped == "magic":
            discard_part(part)
            raise NotTheFileError(f"{url} does not start as a gzip file ({content.name} is fetched gzipped): not "
                                  f"the file (check the mirror; --no-verify accepts it)")
        if stopped == "deadline":
            raise DeadlineError(url)
        received = part.stat().st_size
    if expected is not None and received > expected:
        discard_part(part)
        raise WrongSizeError(f"{url} sent more than the {expected} bytes "
                             f"{'announced' if total is not None else 'published'} for it: not the expected file "
                             f"(check the mirror)")
    if expected is None:
        logger.warning("%s announced no size: the completeness of %s cannot be checked", url, part.name)
    elif received != expected:
        raise IncompleteDownloadError(f"connection closed after {received} of {expected} bytes")


def strong_validator(headers) -> str | None:
    """What identifies this version of the remote file for If-Range: a strong ETag, else Last-Modified (a weak
    ETag may not be used there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def resume_mismatch(headers, offset: int, state: PartState, published_size: int | None) -> str | None:
    """Why a 206 answer to a resume at `offset` does not prove the version the part holds (None when it does):
    its range must start at the part's end, its total be the first response's size (else the published one) and
    its validator the saved one; a server that ignores If-Range answers a changed file with a 206 all the same."""
    content_range = headers.get("Content-Range")
    start = content_range_start(content_range)
    total = content_range_total(content_range)
    expected_total = state.total if state.total is not None else published_size
    validator = strong_validator(headers)
    if start != offset:
        return f"a range starting at {start} where {offset} was asked"
    if total is None or total != expected_total:
        return f"a file of {total} bytes where the part is of one of {expected_total}"
    if validator != state.validator:
        return f"another version ({validator} where the part is of {state.validator})"
    return None


def content_range_start(content_range: str | None) -> int | None:
    """The first byte in a ``Content-Range: bytes A-B/TOTAL`` header."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    first = content_range[len("bytes "):].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def content_range_total(content_range: str | None) -> int | None:
    """The total size in a ``Content-Range: bytes */TOTAL`` (or ``bytes A-B/TOTAL``) header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def copy_with_progress(source: BinaryIO, sink: BinaryIO, total: int | None, initial: int, label: str,
                       deadline: float = float("inf"), magic: bytes = b"") -> str | None:
    """Copy until the body ends; stop early, returning why, when the first bytes are not ``magic`` ("magic") or
    ``deadline`` has passed ("deadline"). ``read1`` returns what has arrived, so a server sending a byte a second
    still meets the deadline (``read`` would wait for a whole chunk)."""
    read = getattr(source, "read1", source.read)
    head = b""
    # disable=None: the bar shows on a terminal only, so logs and tests stay clean.
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              disable=None) as progress:
        while chunk := read(CHUNK_SIZE):
            if len(head) < len(magic):
                head += chunk[:len(magic) - len(head)]
                if not magic.startswith(head):
                    return "magic"
            sink.write(chunk)
            progress.update(len(chunk))
            if total is not None and sink.tell() > total:
                break  # longer than the file: refused by the caller, without reading an endless body to the end
            if time.monotonic() > deadline:
                return "deadline"
    return "magic" if head != magic else None


def publish(part: Path, target: Path) -> str:
    """Move a complete download to its final name; return its sha256."""
    digest = sha256_of_file(part)
    os.replace(part, target)
    PartState.file(part).unlink(missing_ok=True)
    return digest


def gunzip_to(part: Path, target: Path) -> str:
    """Stream-decompress a complete ``.gz`` download into ``target``; return the sha256 of the decompressed file."""
    logger.info("Decompressing %s", part)
    digest = hashlib.sha256()
    try:
        with atomic_output(target) as temp_name, gzip.open(part, "rb") as source, open(temp_name, "wb") as sink:
            while chunk := source.read(CHUNK_SIZE):
                digest.update(chunk)
                sink.write(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # EOFError: a truncated stream
        discard_part(part)
        raise DownloadError(f"{part} is not a valid gzip file ({err}); it was removed, rerun to fetch it again") \
            from err
    discard_part(part)
    return digest.hexdigest()


