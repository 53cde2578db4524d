"""Outputs: checked before the work, complete under their final name, and a full disk named in one line."""
import errno
import os
from types import SimpleNamespace

import pytest

from dpr.foundation import files
from dpr.foundation.files import (OutputWriteError, UnwritableDirectoryError, atomic_output, atomic_output_directory,
                                  ensure_writable_output,
                                  remove_stale_temporaries)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, code):
    target = tmp_path / "results.json"
    target.write_text("previous")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=2**20))
    with pytest.raises(OutputWriteError) as error:
        with atomic_output(target) as temp_name, open(temp_name, "w") as f:
            f.write("partial")
            raise OSError(code, os.strerror(code))
    assert str(error.value) == (f"could not write {target}: no space left on device (1 MB free in {tmp_path}); "
                                "the previous file under that name is intact. Free some space or write it elsewhere")
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["results.json"]


def test_other_write_failures_stay_what_they_are(tmp_path):
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_output(tmp_path / "x"):
            raise OSError(errno.EIO, "Input/output error")
    assert os.listdir(tmp_path) == []


def test_a_killed_write_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    (tmp_path / ".out.json.abcd1234.tmp").write_text("partial")
    assert remove_stale_temporaries(tmp_path, "out.json") == (1, 7)
    assert os.listdir(tmp_path) == []


def test_an_output_is_checked_before_the_work(tmp_path):
    ensure_writable_output(tmp_path / "new" / "out.json", "out_file")
    assert (tmp_path / "new").is_dir() and os.listdir(tmp_path / "new") == []
    with pytest.raises(UnwritableDirectoryError, match=r"^out_file=/proc/nope/x: its folder /proc/nope is not one"):
        ensure_writable_output("/proc/nope/x", "out_file")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UnwritableDirectoryError, match="choose another index_path"):
        ensure_writable_output(blocker / "index", "index_path")
    with pytest.raises(UnwritableDirectoryError, match="is a folder, not a file"):
        ensure_writable_output(tmp_path, "out_file")


def recording_fsync_and_replace(monkeypatch, refuse=None):
    """Log ("fsync", folder or file path) and ("replace", target) in order; fsync of a folder raises `refuse`."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        if refuse is not None and os.path.isdir(path):
            raise OSError(refuse, os.strerror(refuse))
        events.append(("fsync", path))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


def test_a_rename_is_made_durable_by_syncing_its_folder_after_it(tmp_path, monkeypatch):
    """A power loss after the rename keeps the new name: the parent folder is fsynced after os.replace (a file's
    own fsync makes its bytes durable, not its directory entry); the same for a folder written whole."""
    events = recording_fsync_and_replace(monkeypatch)
    with atomic_output(tmp_path / "out.json") as temp_name:
        open(temp_name, "w").write("x")
    assert events[-2:] == [("replace", str(tmp_path / "out.json")), ("fsync", str(tmp_path))]
    events.clear()
    with atomic_output_directory(tmp_path / "index") as temp_dir:
        open(os.path.join(temp_dir, "a"), "w").write("x")
    assert events[-3:] == [("replace", str(tmp_path / "index")), ("fsync", str(tmp_path / "index")),
                           ("fsync", str(tmp_path))]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_a_filesystem_that_cannot_sync_a_folder_still_gets_the_file(tmp_path, monkeypatch, code):
    recording_fsync_and_replace(monkeypatch, refuse=code)
    with atomic_output(tmp_path / "out.json") as temp_name:
        open(temp_name, "w").write("x")
    assert (tmp_path / "out.json").read_text() == "x"


def test_a_failing_folder_sync_is_an_error_not_a_silent_loss(tmp_path, monkeypatch):
    recording_fsync_and_replace(monkeypatch, refuse=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_output(tmp_path / "out.json") as temp_name:
            open(temp_name, "w").write("x")
