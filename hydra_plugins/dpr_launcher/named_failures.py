"""hydra-submitit-launcher's launchers, with a job that ended without a result named in one line.

A job that raises is already reported by the job itself (`errors.user_errors_in_one_line`). A job killed from
outside (out of memory, out of time, preempted, `scancel`, `kill -9`) never gets to: the launching process meets
submitit's `UncompletedJobError`, whose traceback names a submitit job id, not the shard. Here it becomes one line
naming the job's number, its overrides (the shard) and its log, and the way out.

Hydra imports this module at every start of every entry script (it scans `hydra_plugins`), so it must import
without the `cluster` extra: submitit is imported only when a job is launched (as the plugin itself does), and
without the plugin the launchers become stand-ins whose use ends in one line naming the extra.
"""
import re
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, filter_overrides
from hydra.plugins.launcher import Launcher

from dpr.foundation.errors import JobFailedError

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # the cluster extra is not installed
    LocalLauncher = SlurmLauncher = None

_JOB = re.compile(r"Job (\S+) \(task: (\d+)\)")
CLUSTER_EXTRA = "pip install -e '.[cluster]'"


def _job_failure(error: Exception, folder: str) -> JobFailedError:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    generic = JobFailedError(f"a job of the sweep ended without a result: {first_line}; the jobs' logs: {folder}")
    found = _JOB.search(str(error))
    if found is None:
        return generic
    from submitit.core.utils import DelayedSubmission, JobPaths

    paths = JobPaths(folder, job_id=found.group(1), task_id=int(found.group(2)))
    # The job's own submission record (written by this process's submitit): its arguments are the job's
    # overrides and number, as the launcher passed them. A record that is missing or of another layout (another
    # submitit or plugin version) leaves the generic line, never a worse traceback.
    try:
        overrides, _, number = DelayedSubmission.load(paths.submitted_pickle).args[:3]
        job = f"job {int(number)} ({' '.join(filter_overrides(list(overrides)))})"
    except Exception:  # noqa: BLE001 - any unreadable record: the generic line
        return generic
    state = re.search(r"\(state: ([^)]*)\)", str(error))
    return JobFailedError(
        f"{job} ended without a result"
        f"{' (state: ' + state.group(1) + ')' if state else ''}: killed, out of memory or out of time? Its log: "
        f"{paths.stderr}. Run the sweep again: the shards already written are skipped"
    )


class _NamesKilledJobs:
    params: dict

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import UncompletedJobError

        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        except UncompletedJobError as error:
            raise _job_failure(error, str(self.params["submitit_folder"])) from None


class ClusterExtraMissingError(JobFailedError):
    """A submitit launcher was asked for without the `cluster` extra (printed by hydra in one line)."""


if LocalLauncher is not None:
    class NamedFailuresLocalLauncher(_NamesKilledJobs, LocalLauncher):
        pass

    class NamedFailuresSlurmLauncher(_NamesKilledJobs, SlurmLauncher):
        pass
else:
    class _NeedsTheClusterExtra(Launcher):
        """Stands in for both launchers without hydra-submitit-launcher: its use is one line naming the extra."""

        def __init__(self, **params: Any) -> None:
            self.params = params

        def setup(self, **kwargs: Any) -> None:
            raise ClusterExtraMissingError(
                f"hydra/launcher=local and hydra/launcher=slurm run jobs through hydra-submitit-launcher, which is "
                f"not installed: {CLUSTER_EXTRA}")

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            raise AssertionError("setup() refuses first")

    # hydra finds a launcher by its class's own name
    class NamedFailuresLocalLauncher(_NeedsTheClusterExtra):
        pass

    class NamedFailuresSlurmLauncher(_NeedsTheClusterExtra):
        pass

    # conf/hydra/launcher/{local,slurm}.yaml extend the plugin's configs: stand-ins so that they compose
    for _name, _launcher in (("submitit_local", NamedFailuresLocalLauncher),
                             ("submitit_slurm", NamedFailuresSlurmLauncher)):
        ConfigStore.instance().store(group="hydra/launcher", name=_name, provider="dpr_launcher",
                                     node={"_target_": f"{__name__}.{_launcher.__name__}"})
