"""One run per output (dpr/foundation/run_lock.py), the process groups a run's children run in
(dpr/foundation/process_groups.py) and the records of a multi-stage run's stages (dpr/foundation/stage_records.py)."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dpr.foundation import run_lock as run_lock_module
from dpr.foundation.process_groups import end_orphan_process_group, live_members
from dpr.foundation.run_lock import (LockHolder, LocksUnsupportedError, OutputInUseError, acquire_run_lock,
                                     lock_file_for, run_lock)
from dpr.foundation.stage_records import (DamagedStageRecordError, StageRecord, input_identities, read_stage_record,
                                          stage_record_path, write_stage_record)

HOLD_LOCK = """import sys, time
from dpr.foundation.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], "out_file")
lock.note_process_group(int(sys.argv[2]))
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_in_one_line_naming_the_holder(tmp_path):
    output = tmp_path / "results.json"
    with run_lock(output, "out_file") as lock:
        assert lock.earlier is None and lock_file_for(output).is_file()
        with pytest.raises(OutputInUseError) as refused:
            acquire_run_lock(output, "out_file")
    assert str(refused.value) == (
        f"out_file={output} is in use by another run ({os.path.basename(sys.argv[0])}, pid {os.getpid()} on "
        f"{socket.gethostname()}): wait for it to end, stop it, or choose another out_file")
    assert not lock_file_for(output).exists(), "a released lock leaves no file"
    with run_lock(output, "out_file"):  # free again
        pass


def test_a_folder_holds_its_lock_and_a_file_has_it_beside(tmp_path):
    (tmp_path / "run").mkdir()
    assert lock_file_for(tmp_path / "run") == tmp_path / "run" / ".run.lock"
    assert lock_file_for(tmp_path / "embs" / "psgs_0") == tmp_path / "embs" / ".psgs_0.lock"


def test_a_killed_holder_leaves_its_record_to_the_run_that_takes_over(tmp_path):
    output = tmp_path / "emb_0"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output), "4242"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid} on"):
            acquire_run_lock(output, "out_file")
    finally:
        holder.kill()  # kill -9: the kernel releases the lock, the file and its record stay
        holder.wait()
    with run_lock(output, "out_file") as lock:
        assert lock.earlier == LockHolder(holder.pid, socket.gethostname(), "-c", 4242)
        assert lock.earlier.on_this_host


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_filesystem_without_locks_is_one_line_with_the_way_out(tmp_path, monkeypatch, code):
    """NFS with nolock, Lustre without -o flock: flock fails with an OSError other than EWOULDBLOCK."""
    def flock(descriptor, operation):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(run_lock_module.fcntl, "flock", flock)
    with pytest.raises(LocksUnsupportedError, match=r"output_dir=.* is on a filesystem without file locks .*"
                                                    r"choose another output_dir .* DPR_RUN_LOCK=off"):
        acquire_run_lock(tmp_path, "output_dir")
    monkeypatch.setenv("DPR_RUN_LOCK", "off")
    assert acquire_run_lock(tmp_path, "output_dir") is None


def test_another_lock_failure_stays_what_it_is(tmp_path, monkeypatch):
    def flock(descriptor, operation):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(run_lock_module.fcntl, "flock", flock)
    with pytest.raises(OSError, match="Input/output error"):
        acquire_run_lock(tmp_path, "output_dir")


def test_a_lock_file_released_between_open_and_flock_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """The holder removes the file, then unlocks: a run that opened it meanwhile locks a removed file, which must
    not count (a third run would create and lock a new one: two holders)."""
    output = tmp_path / "results.json"
    real_flock, calls = run_lock_module.fcntl.flock, []

    def flock(descriptor, operation):
        calls.append(descriptor)
        if len(calls) == 1:
            os.unlink(lock_file_for(output))  # released by its holder just now
        real_flock(descriptor, operation)
    monkeypatch.setattr(run_lock_module.fcntl, "flock", flock)
    with run_lock(output, "out_file") as lock:
        assert len(calls) == 2 and os.path.samestat(os.stat(lock.path), os.fstat(lock._descriptor))


def start_group(marker: str) -> subprocess.Popen:
    """A process group whose leader's command line holds `marker`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker], start_new_session=True)


def test_an_orphan_group_is_ended_only_when_it_runs_a_command_of_the_run(tmp_path):
    ours, unrelated = start_group(str(tmp_path / "run")), start_group("another program")
    try:
        assert not end_orphan_process_group(unrelated.pid, str(tmp_path / "run"))
        assert end_orphan_process_group(ours.pid, str(tmp_path / "run"))
        ours.wait(timeout=10)
        assert unrelated.poll() is None and live_members(unrelated.pid)
    finally:
        for process in (ours, unrelated):
            process.kill()
            process.wait()


# ------------------------------------------------------------------ stage records
def test_stage_records_round_trip_and_a_rewritten_stage_makes_later_ones_run_again(tmp_path):
    data = tmp_path / "data.tsv"
    data.write_text("1\tpassage\n")
    inputs = input_identities([data, None, tmp_path / "absent"])
    assert list(inputs) == [str(data), str(tmp_path / "absent")] and inputs[str(tmp_path / "absent")] is None
    folder = tmp_path / "stages"
    for position in range(3):
        write_stage_record(stage_record_path(folder, position), StageRecord(f"s{position}", "python x.py", inputs, 2.0))
    write_stage_record(stage_record_path(folder, 1), StageRecord("s1", "python x.py --new", inputs, None))
    assert sorted(path.name for path in folder.iterdir()) == ["00.json", "01.json"]
    started = read_stage_record(stage_record_path(folder, 1))
    assert started.same_as("python x.py --new", inputs) and not started.done_as("python x.py --new", inputs)
    done = read_stage_record(stage_record_path(folder, 0))
    assert done.done_as("python x.py", inputs)
    data.write_text("1\tanother passage\n")
    assert not done.done_as("python x.py", input_identities([data, tmp_path / "absent"]))
    assert read_stage_record(stage_record_path(folder, 5)) is None


@pytest.mark.parametrize("damage", [b"", b'{"name": "train', b"\xff\xfe", b"[]",
                                    b'{"command": "python x.py", "inputs": {}, "seconds": "12"}'])
def test_a_damaged_stage_record_is_named(tmp_path, damage):
    path = stage_record_path(tmp_path, 0)
    path.write_bytes(damage)
    with pytest.raises(DamagedStageRecordError, match="00.json is damaged"):
        read_stage_record(path)


def test_squad_open_leaves_a_stage_of_another_host_alone_and_says_so(tmp_path, monkeypatch, capsys):
    """A run_dir on a shared disk whose killed run ran on another node: that node's process group ids mean nothing
    here (one of them may be a live group of this host), so nothing is ended; the message names the host."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("squad_open_under_test", repo / "scripts" / "squad_open.py")
    squad_open = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(squad_open)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bystander = start_group(str(run_dir))  # a live group of this host with the id the record names
    try:
        (run_dir / ".run.lock").write_text(json.dumps(
            {"pid": 1, "host": "another-node", "program": "squad_open.py", "process_group": bystander.pid}))
        with run_lock(run_dir, "--run_dir") as lock:
            squad_open.take_over_orphan_stage(lock, run_dir)
        assert bystander.poll() is None
        assert "a killed run on another-node" in capsys.readouterr().out
        (run_dir / ".run.lock").write_text(json.dumps(
            {"pid": 1, "host": socket.gethostname(), "program": "squad_open.py", "process_group": bystander.pid}))
        with run_lock(run_dir, "--run_dir") as lock:
            squad_open.take_over_orphan_stage(lock, run_dir)
        assert bystander.wait(timeout=15) == -signal.SIGTERM
    finally:
        bystander.kill()
        bystander.wait()
