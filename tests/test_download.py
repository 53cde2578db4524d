"""The downloader against a real loopback HTTP server that serves fixture files in DPR's remote layout."""
import gzip
import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpr.data.download import (MANIFEST_NAME, DownloadError, PartState, RetryPolicy, UnknownResourceError,
                               download)
from dpr.data.resources import RESOURCES_MAP

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, timeout_s=5.0)
NQ_DEV_QAS = "who sang it\t['someone']\n"
TRIVIA_QAS = {split: f"trivia {split} question\t['answer {split}']\n" * 50 for split in ("dev", "test", "train")}
LARGE_BODY = bytes(range(256)) * 1200  # ~300 KB, several read chunks on the client side


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-`` unless an ``If-Range`` names another version (ETag)
    (``server.ignore_if_range``: always); cuts the first response of paths in ``server.drop`` half-way (every
    response of those in ``server.always_drop``), then replaces the file by ``server.changed_after_drop[path]`` if
    given. ``server.validators`` / ``server.lengths`` off: no ETag / no Content-Length headers;
    ``server.validator_header``: the ETag or a Last-Modified; ``server.fixed_etag``: one ETag for every version;
    ``server.extra_bytes``: sent after the body; ``server.content_types[path]``: a Content-Type header;
    ``server.byte_delay``: seconds between the bytes of every body (a server that trickles)."""

    timeout = 5  # a stuck client cannot hold a handler thread for long

    def do_GET(self) -> None:
        relative_path = self.path.lstrip("/")
        range_header, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        self.server.requests.append((relative_path, range_header))
        self.server.if_ranges.append(if_range)
        file = self.server.root / relative_path
        if not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        etag = self.server.fixed_etag or f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if self.server.validator_header == "Last-Modified":
            etag = formatdate(int(hashlib.sha256(body).hexdigest()[:8], 16), usegmt=True)
        if if_range is not None and if_range != etag and not self.server.ignore_if_range:
            range_header = None  # another version: the whole file
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
        if start >= len(body) > 0 and range_header:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if range_header else 200)
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if self.server.validators:
            self.send_header(self.server.validator_header, etag)
        if self.server.lengths:
            self.send_header("Content-Length", str(len(body) - start))
        if relative_path in self.server.content_types:
            self.send_header("Content-Type", self.server.content_types[relative_path])
        self.end_headers()
        if self.server.byte_delay:
            try:
                for index in range(start, len(body)):
                    self.wfile.write(body[index:index + 1])
                    self.wfile.flush()
                    time.sleep(self.server.byte_delay)
            except OSError:
                pass  # the client gave up
            return
        if relative_path in self.server.drop | self.server.always_drop:
            self.server.drop.discard(relative_path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            if relative_path in self.server.changed_after_drop:
                file.write_bytes(self.server.changed_after_drop.pop(relative_path))
            return  # HTTP/1.0: the connection closes here, half-way through the body
        self.wfile.write(body[start:] + self.server.extra_bytes)

    def log_message(self, *args) -> None:
        pass


def write_remote_tree(root: Path) -> None:
    files = {
        "data/retriever/nq-dev.qa.csv": NQ_DEV_QAS.encode(),
        "nq_license/LICENSE": b"CC BY-SA 3.0\n",
        "nq_license/README": b"Natural Questions licence note\n",
        "checkpoint/reader/nq-single/hf_bert_base.cp": LARGE_BODY,
    }
    files.update({f"data/retriever/trivia-{split}.qa.csv.gz": gzip.compress(text.encode())
                  for split, text in TRIVIA_QAS.items()})
    for relative_path, content in files.items():
        (root / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (root / relative_path).write_bytes(content)


@pytest.fixture
def start_server(tmp_path):
    """Starts loopback servers, each serving its own copy of the remote tree (a mirror)."""
    started = []

    def start() -> ThreadingHTTPServer:
        remote = tmp_path / f"remote{len(started) or ''}"
        write_remote_tree(remote)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        httpd.root, httpd.requests, httpd.if_ranges, httpd.drop, httpd.always_drop = remote, [], [], set(), set()
        httpd.changed_after_drop, httpd.validators, httpd.lengths = {}, True, True
        httpd.validator_header, httpd.fixed_etag, httpd.ignore_if_range, httpd.extra_bytes = "ETag", None, False, b""
        httpd.content_types, httpd.byte_delay = {}, 0.0
        httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((httpd, thread))
        return httpd

    yield start
    for httpd, thread in started:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server(start_server):
    return start_server()


CHECKPOINT = "checkpoint.reader.nq-single.hf-bert-base"
CHECKPOINT_PATH = "checkpoint/reader/nq-single/hf_bert_base.cp"


@pytest.fixture(autouse=True)
def fixture_checkpoint_size(monkeypatch):
    """The fixture checkpoint stands in for the real one: its published size is the fixture's."""
    monkeypatch.setitem(RESOURCES_MAP, CHECKPOINT, replace(RESOURCES_MAP[CHECKPOINT], size=len(LARGE_BODY)))


def fetch(server, key, output_dir, **kwargs):
    return download(key, str(output_dir), mirror=server.url, retry=FAST_RETRY, **kwargs)


def manifest_entries(output_dir: Path) -> dict[str, str]:
    lines = (output_dir / "downloads" / MANIFEST_NAME).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ") for line in lines)}


def test_exact_key_downloads_file_licence_and_checksums(server, tmp_path):
    out = tmp_path / "out"
    files = fetch(server, "data.retriever.qas.nq-dev", out)
    folder = out / "downloads" / "data" / "retriever" / "qas"
    assert files == [str(folder / "nq-dev.csv")]
    assert (folder / "nq-dev.csv").read_text() == NQ_DEV_QAS
    assert (folder / "LICENSE").read_bytes() == b"CC BY-SA 3.0\n"
    assert (folder / "README").exists()
    manifest = manifest_entries(out)
    assert set(manifest) == {"data/retriever/qas/nq-dev.csv", "data/retriever/qas/LICENSE", "data/retriever/qas/README"}
    assert manifest["data/retriever/qas/nq-dev.csv"] == hashlib.sha256(NQ_DEV_QAS.encode()).hexdigest()


def test_prefix_downloads_every_match_and_gunzips_them(server, tmp_path):
    out = tmp_path / "out"
    files = fetch(server, "data.retriever.qas.trivia", out)
    folder = out / "downloads" / "data" / "retriever" / "qas"
    assert sorted(files) == [str(folder / f"trivia-{split}.csv") for split in ("dev", "test", "train")]
    for split, text in TRIVIA_QAS.items():
        assert (folder / f"trivia-{split}.csv").read_text() == text
    assert sorted(path.name for path in folder.iterdir()) == ["trivia-dev.csv", "trivia-test.csv", "trivia-train.csv"]


def test_dropped_connection_is_resumed_with_range_request(server, tmp_path):
    remote_path = "checkpoint/reader/nq-single/hf_bert_base.cp"
    server.drop.add(remote_path)
    [local] = fetch(server, "checkpoint.reader.nq-single.hf-bert-base", tmp_path / "out")
    assert Path(local).read_bytes() == LARGE_BODY
    assert server.requests == [(remote_path, None), (remote_path, f"bytes={len(LARGE_BODY) // 2}-")]


def test_exhausted_retries_leave_only_the_partial_file(server, tmp_path):
    remote_path = "checkpoint/reader/nq-single/hf_bert_base.cp"
    server.drop.add(remote_path)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="giving up after 1 attempts"):
        download("checkpoint.reader.nq-single.hf-bert-base", str(out), mirror=server.url,
                 retry=RetryPolicy(max_attempts=1, base_delay_s=0.01, timeout_s=5.0))
    folder = out / "downloads" / "checkpoint" / "reader" / "nq-single"
    assert sorted(path.name for path in folder.iterdir()) == ["hf-bert-base.cp.part", "hf-bert-base.cp.part.state"]
    [local] = fetch(server, "checkpoint.reader.nq-single.hf-bert-base", out)  # a rerun resumes the .part
    assert Path(local).read_bytes() == LARGE_BODY
    assert server.requests[-1][1] == f"bytes={len(LARGE_BODY) // 2}-"


def test_complete_partial_file_is_published_after_a_416(server, tmp_path):
    folder = tmp_path / "out" / "downloads" / "checkpoint" / "reader" / "nq-single"
    folder.mkdir(parents=True)
    (folder / "hf-bert-base.cp.part").write_bytes(LARGE_BODY)  # a run that stopped just before publishing
    etag = f'"{hashlib.sha256(LARGE_BODY).hexdigest()[:16]}"'
    PartState(etag, len(LARGE_BODY)).save(folder / "hf-bert-base.cp.part")
    [local] = fetch(server, "checkpoint.reader.nq-single.hf-bert-base", tmp_path / "out")
    assert Path(local).read_bytes() == LARGE_BODY
    assert [range_header for _, range_header in server.requests] == [f"bytes={len(LARGE_BODY)}-"]


def test_a_remote_file_changed_before_the_resume_is_downloaded_again_not_spliced(server, tmp_path):
    new_body = bytes(reversed(LARGE_BODY))
    server.drop.add(CHECKPOINT_PATH)
    server.changed_after_drop[CHECKPOINT_PATH] = new_body
    [local] = fetch(server, CHECKPOINT, tmp_path / "out")
    assert Path(local).read_bytes() == new_body
    old_etag = f'"{hashlib.sha256(LARGE_BODY).hexdigest()[:16]}"'
    assert server.requests[1][1] == f"bytes={len(LARGE_BODY) // 2}-" and server.if_ranges == [None, old_etag]
    assert manifest_entries(tmp_path / "out")[
        "checkpoint/reader/nq-single/hf-bert-base.cp"] == hashlib.sha256(new_body).hexdigest()


def test_without_a_validator_a_retry_starts_from_zero(server, tmp_path):
    server.validators = False
    server.drop.add(CHECKPOINT_PATH)
    [local] = fetch(server, CHECKPOINT, tmp_path / "out")
    assert Path(local).read_bytes() == LARGE_BODY
    assert [range_header for _, range_header in server.requests] == [None, None]


def test_a_body_cut_without_content_length_is_caught_by_the_published_size(server, tmp_path):
    server.lengths = False
    server.drop.add(CHECKPOINT_PATH)
    [local] = fetch(server, CHECKPOINT, tmp_path / "out")
    assert Path(local).read_bytes() == LARGE_BODY
    assert server.requests[1][1] == f"bytes={len(LARGE_BODY) // 2}-"  # resumed, as the size told it was cut


def test_a_cut_body_is_never_recorded_as_good(server, tmp_path):
    server.drop.add(CHECKPOINT_PATH)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="giving up after 1 attempts.*closed after 153600 of 307200 bytes"):
        download(CHECKPOINT, str(out), mirror=server.url, retry=RetryPolicy(max_attempts=1, base_delay_s=0.01))
    assert not (out / "downloads" / CHECKPOINT_PATH.replace("hf_bert_base", "hf-bert-base")).exists()
    assert not (out / "downloads" / MANIFEST_NAME).exists()


def test_a_file_of_another_size_than_the_published_one_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setitem(RESOURCES_MAP, CHECKPOINT, replace(RESOURCES_MAP[CHECKPOINT], size=len(LARGE_BODY) + 1))
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=f"has {len(LARGE_BODY)} bytes where {len(LARGE_BODY) + 1} are published"):
        fetch(server, CHECKPOINT, out)
    assert len(server.requests) == 1  # not worth a retry
    assert not any(path.is_file() for path in (out / "downloads").rglob("*"))
    [local] = fetch(server, CHECKPOINT, out, verify=False)  # the user's explicit choice
    assert Path(local).read_bytes() == LARGE_BODY


def test_second_run_downloads_nothing(server, tmp_path):
    out = tmp_path / "out"
    keys = ("data.retriever.qas.trivia", "data.retriever.qas.nq-dev")
    first = [fetch(server, key, out) for key in keys]
    requests_after_first_run = len(server.requests)
    assert [fetch(server, key, out) for key in keys] == first
    assert len(server.requests) == requests_after_first_run


def test_corrupted_file_is_reported_and_downloaded_again(server, tmp_path, caplog):
    out = tmp_path / "out"
    [local] = fetch(server, "data.retriever.qas.trivia-dev", out)
    Path(local).write_text("truncated")
    with caplog.at_level(logging.WARNING, logger="dpr.data.download"):
        fetch(server, "data.retriever.qas.trivia-dev", out)
    assert "Checksum mismatch" in caplog.text
    assert Path(local).read_text() == TRIVIA_QAS["dev"]
    assert len(server.requests) == 2


def test_no_verify_trusts_existing_files(server, tmp_path):
    out = tmp_path / "out"
    [local] = fetch(server, "data.retriever.qas.trivia-dev", out)
    Path(local).write_text("edited")
    fetch(server, "data.retriever.qas.trivia-dev", out, verify=False)
    assert Path(local).read_text() == "edited"


def test_missing_remote_file_fails_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server, "data.retriever.qas.squad1-test", tmp_path / "out")
    assert len(server.requests) == 1


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(UnknownResourceError, match="nothing.here"):
        download("nothing.here", str(tmp_path))


def test_file_url_mirror(tmp_path):
    remote = tmp_path / "remote"
    write_remote_tree(remote)
    [local] = download("data.retriever.qas.trivia-test", str(tmp_path / "out"), mirror=remote.as_uri(),
                       retry=FAST_RETRY)
    assert Path(local).read_text() == TRIVIA_QAS["test"]


def test_file_url_mirror_missing_file_fails_without_retrying(tmp_path):
    with pytest.raises(DownloadError, match="No such file"):
        download("data.retriever.qas.trivia-test", str(tmp_path / "out"), mirror=(tmp_path / "empty").as_uri(),
                 retry=RetryPolicy(max_attempts=3, base_delay_s=10.0))


def test_listing_names_every_key():
    out = io.StringIO()
    assert download(None, out=out) == []
    listed_keys = [line.split()[0] for line in out.getvalue().splitlines()[1:]]
    assert listed_keys == list(RESOURCES_MAP)


def test_entry_script_lists_and_downloads_from_env_mirror(server, tmp_path):
    script = [sys.executable, str(REPO_ROOT / "data" / "download_data.py")]
    listing = subprocess.run(script, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    assert "data.retriever.nq-adv-hn-train" in listing.stdout
    env = dict(os.environ, DPR_DOWNLOAD_MIRROR=server.url)
    subprocess.run(script + ["--resource", "data.retriever.qas.nq-dev", "--output_dir", str(tmp_path / "out")],
                   capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "out/downloads/data/retriever/qas/nq-dev.csv").read_text() == NQ_DEV_QAS


def test_a_206_of_another_version_from_a_server_ignoring_if_range_is_not_appended(server, tmp_path):
    new_body = bytes(reversed(LARGE_BODY))  # the same size: only the ETag tells the versions apart
    server.ignore_if_range = True
    server.drop.add(CHECKPOINT_PATH)
    server.changed_after_drop[CHECKPOINT_PATH] = new_body
    [local] = fetch(server, CHECKPOINT, tmp_path / "out")
    assert Path(local).read_bytes() == new_body
    assert [range_header for _, range_header in server.requests] == [None, f"bytes={len(LARGE_BODY) // 2}-", None]


def test_a_206_of_another_version_told_by_last_modified_is_not_appended(server, tmp_path):
    new_body = bytes(reversed(LARGE_BODY))
    server.ignore_if_range, server.validator_header = True, "Last-Modified"
    server.drop.add(CHECKPOINT_PATH)
    server.changed_after_drop[CHECKPOINT_PATH] = new_body
    [local] = fetch(server, CHECKPOINT, tmp_path / "out")
    assert Path(local).read_bytes() == new_body
    assert server.if_ranges[1] is not None and server.if_ranges[1].endswith("GMT")


def test_a_206_with_another_content_range_total_is_not_appended(server, tmp_path):
    new_body = LARGE_BODY[: len(LARGE_BODY) // 2 + 1000] + b"new tail"
    server.ignore_if_range, server.fixed_etag = True, '"one-etag-for-every-version"'  # a server's bug
    server.drop.add(CHECKPOINT_PATH)
    server.changed_after_drop[CHECKPOINT_PATH] = new_body
    [local] = fetch(server, CHECKPOINT, tmp_path / "out", verify=False)  # no published size to catch it
    assert Path(local).read_bytes() == new_body
    assert [range_header for _, range_header in server.requests] == [None, f"bytes={len(LARGE_BODY) // 2}-", None]


def test_a_file_shorter_than_published_is_refused_and_the_next_mirror_serves_it(start_server, tmp_path):
    short, good = start_server(), start_server()
    (short.root / CHECKPOINT_PATH).write_bytes(LARGE_BODY[:-100])
    [local] = download(CHECKPOINT, str(tmp_path / "out"), mirror=[short.url, good.url], retry=FAST_RETRY)
    assert Path(local).read_bytes() == LARGE_BODY
    assert len(short.requests) == 1 and len(good.requests) == 1


def test_a_body_longer_than_published_is_refused_and_the_next_mirror_serves_it(start_server, tmp_path):
    long, good = start_server(), start_server()
    long.lengths, long.extra_bytes = False, b"x" * 5000  # no Content-Length: only the published size tells
    [local] = download(CHECKPOINT, str(tmp_path / "out"), mirror=[long.url, good.url], retry=FAST_RETRY)
    assert Path(local).read_bytes() == LARGE_BODY
    assert len(long.requests) == 1


def test_a_mirror_that_always_cuts_the_body_gives_way_to_the_next(start_server, tmp_path):
    cutting, good = start_server(), start_server()
    cutting.always_drop.add(CHECKPOINT_PATH)
    [local] = download(CHECKPOINT, str(tmp_path / "out"), mirror=[cutting.url, good.url], retry=FAST_RETRY)
    assert Path(local).read_bytes() == LARGE_BODY
    assert len(cutting.requests) == FAST_RETRY.max_attempts
    assert [range_header for _, range_header in good.requests] == [None]  # not resumed from another server's part


def test_after_the_last_mirror_the_error_names_the_file_the_sizes_and_the_way_out(start_server, tmp_path):
    short, long = start_server(), start_server()
    (short.root / CHECKPOINT_PATH).write_bytes(LARGE_BODY[:-100])
    long.lengths, long.extra_bytes = False, b"x" * 5000
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as error:
        download(CHECKPOINT, str(out), mirror=[short.url, long.url], retry=FAST_RETRY)
    message = str(error.value)
    assert message.startswith("no mirror served hf-bert-base.cp whole")
    for text in (f"has {len(LARGE_BODY) - 100} bytes where {len(LARGE_BODY)} are published",
                 f"sent more than the {len(LARGE_BODY)} bytes published", "--mirror"):
        assert text in message
    assert not any(path.is_file() for path in (out / "downloads").rglob("*"))


def test_entry_script_tries_its_mirrors_in_order(start_server, tmp_path):
    empty, good = start_server(), start_server()
    (empty.root / "data/retriever/nq-dev.qa.csv").unlink()
    script = [sys.executable, str(REPO_ROOT / "data" / "download_data.py"), "--resource", "data.retriever.qas.nq-dev",
              "--output_dir", str(tmp_path / "out"), "--mirror", empty.url, good.url]
    subprocess.run(script, capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True)
    assert (tmp_path / "out/downloads/data/retriever/qas/nq-dev.csv").read_text() == NQ_DEV_QAS


NQ_DEV_PATH = "data/retriever/nq-dev.qa.csv"
NQ_DEV_LOCAL = "data/retriever/qas/nq-dev.csv"
TRIVIA_DEV_PATH = "data/retriever/trivia-dev.qa.csv.gz"


def serve_not_the_file(server, case: str) -> tuple[str, str]:
    """Make `server` answer one file with something that is not it, each answer a server may give with status
    200 and a Content-Length that matches what it sends; return the resource key and its local path."""
    if case == "html page for a csv":
        (server.root / NQ_DEV_PATH).write_bytes(b"<html><body>Please sign in</body></html>\n")
        server.content_types[NQ_DEV_PATH] = "text/html; charset=utf-8"
    elif case == "html page for a gz, no html type":
        (server.root / TRIVIA_DEV_PATH).write_bytes(b"<html><body>Please sign in</body></html>\n")
        server.content_types[TRIVIA_DEV_PATH] = "application/octet-stream"
        return "data.retriever.qas.trivia-dev", "data/retriever/qas/trivia-dev.csv"
    elif case == "csv cut in a line":
        (server.root / NQ_DEV_PATH).write_bytes(NQ_DEV_QAS.encode()[:-6])
    return "data.retriever.qas.nq-dev", NQ_DEV_LOCAL


CASES = ["html page for a csv", "html page for a gz, no html type", "csv cut in a line"]


@pytest.mark.parametrize("case", CASES)
def test_what_is_not_the_file_is_refused_and_the_next_mirror_serves_it(start_server, tmp_path, case):
    bad, good = start_server(), start_server()
    key, local_path = serve_not_the_file(bad, case)
    out = tmp_path / "out"
    [local] = download(key, str(out), mirror=[bad.url, good.url], retry=FAST_RETRY)
    expected = (good.root / good.requests[0][0]).read_bytes()
    expected = gzip.decompress(expected) if key.endswith("trivia-dev") else expected
    assert Path(local).read_bytes() == expected
    assert [path for path, _ in bad.requests].count(good.requests[0][0]) == 1  # not worth a retry
    assert manifest_entries(out)[local_path] == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_what_is_not_the_file_from_the_last_mirror_is_an_error_and_nothing_is_recorded(server, tmp_path, case):
    key, local_path = serve_not_the_file(server, case)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="not the|HTML page|newline"):
        fetch(server, key, out)
    assert not (out / "downloads" / local_path).exists()
    assert local_path not in (manifest_entries(out) if (out / "downloads" / MANIFEST_NAME).exists() else {})
    assert not [path for path in (out / "downloads").rglob("*.part")]
    if case.startswith("html page for a gz"):  # nothing to accept: it cannot be gunzipped
        with pytest.raises(DownloadError, match="not a valid gzip file"):
            fetch(server, key, out, verify=False)
    else:
        [local] = fetch(server, key, out, verify=False)  # the user's explicit choice
        assert Path(local).read_bytes() == (server.root / NQ_DEV_PATH).read_bytes()


def test_a_mirror_that_trickles_gives_way_to_the_next_at_its_deadline(start_server, tmp_path):
    slow, good = start_server(), start_server()
    slow.byte_delay = 0.02  # 50 bytes a second: 307,200 bytes would take 100 minutes
    started = time.monotonic()
    [local] = download(CHECKPOINT, str(tmp_path / "out"), mirror=[slow.url, good.url],
                       retry=replace(FAST_RETRY, deadline_s=1.0))
    assert Path(local).read_bytes() == LARGE_BODY
    assert time.monotonic() - started < 20 and len(slow.requests) == 1


def test_a_trickling_last_mirror_is_an_error_naming_the_deadline_and_a_rerun_resumes(server, tmp_path):
    server.byte_delay = 0.02
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"not complete within its deadline of 0.01 min \(\d+ bytes received\)"):
        download(CHECKPOINT, str(out), mirror=server.url, retry=replace(FAST_RETRY, deadline_s=0.6))
    server.byte_delay = 0.0
    [local] = fetch(server, CHECKPOINT, out)
    assert Path(local).read_bytes() == LARGE_BODY
    assert server.requests[-1][1] not in (None, "bytes=0-")  # resumed the bytes that had arrived


def test_giving_up_on_an_unreachable_server_names_the_mirror_option(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on: as offline, the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=r"giving up after 2 attempts .*--mirror URL"):
        download("data.retriever.qas.nq-dev", str(tmp_path / "out"), mirror=f"http://127.0.0.1:{port}/",
                 retry=RetryPolicy(max_attempts=2, base_delay_s=0.01, timeout_s=5.0))


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_deadline_that_cannot_work_is_one_line(tmp_path, value):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "data" / "download_data.py"), "--resource",
                             "data.retriever.qas.nq-dev", "--deadline_min", value], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--deadline_min: {value!r} is not a number of minutes above 0" in result.stderr
