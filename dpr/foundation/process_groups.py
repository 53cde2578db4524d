"""Child commands in their own process group, so that ending a run ends all it started (the command, its data
loader workers), and the group a killed run left behind can be found and ended by the next run."""
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Union

STOP_GRACE_S = 10.0  # a process group ended gets this long after SIGTERM before SIGKILL


def run_in_process_group(command: List[str], cwd: Union[str, Path], on_start: Callable[[int], None]) -> int:
    """Run `command` in its own process group (`on_start` is told its id) and return its exit status. If this
    process is ended meanwhile (Ctrl-C, or SIGTERM inside `ending_raises`), the whole group ends with it, so no
    orphan keeps writing into the run's outputs."""
    process = subprocess.Popen(command, cwd=cwd, start_new_session=True)
    try:
        on_start(process.pid)
        return process.wait()
    except BaseException:
        stop_process_group(process)
        raise


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group of `process` (its leader), STOP_GRACE_S to end, then SIGKILL to what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


class ProcessEnded(SystemExit):
    """SIGTERM or SIGHUP to this process, raised where it waits so that the child it runs is stopped."""


@contextmanager
def ending_raises() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP end this process as Ctrl-C does: through an exception, which stops
    the running child (`run_in_process_group`) on its way out."""
    def end(signum: int, frame) -> None:
        raise ProcessEnded(128 + signum)

    previous = {signum: signal.signal(signum, end) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def end_orphan_process_group(process_group: int, marker: str) -> bool:
    """End a process group of this host that a killed run left behind, if one of its live members' command lines
    holds `marker` (the run's output folder: a process group id since reused by an unrelated program is left alone).
    Returns whether it was ended."""
    if not any(marker in cmdline for cmdline in live_members(process_group)):
        return False
    try:
        os.killpg(process_group, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + STOP_GRACE_S
    while live_members(process_group) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(process_group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def live_members(process_group: int) -> List[str]:
    """The command lines of the processes of a process group that have not ended (zombies have)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # ended meanwhile
        if int(group) == process_group and state not in ("Z", "X"):
            members.append(cmdline)
    return members
