"""hydra-submitit-launcher's launchers, with a job that ended without a result named in one line.

A job that raises is already reported by the job itself (`errors.user_errors_in_one_line`). A job killed from
outside (out of memory, out of time, preempted, `scancel`, `kill -9`) never gets to: the launching process meets
submitit's `UncompletedJobError`, whose traceback names a submitit job id, not the shard. Here it becomes one line
naming the job's number, its overrides (the shard) and its log, and the way out.
"""
import re
from typing import Sequence

from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError

from dpr.foundation.errors import JobFailedError

_JOB = re.compile(r"Job (\S+) \(task: (\d+)\)")


def _job_failure(error: UncompletedJobError, folder: str) -> JobFailedError:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    found = _JOB.search(str(error))
    if found is None:
        return JobFailedError(f"a job of the sweep ended without a result: {first_line}; the jobs' logs: {folder}")
    paths = JobPaths(folder, job_id=found.group(1), task_id=int(found.group(2)))
    # The job's own submission record (written by this process's submitit): its arguments are the job's
    # overrides and number, as the launcher passed them.
    overrides, _, number = DelayedSubmission.load(paths.submitted_pickle).args[:3]
    state = re.search(r"\(state: ([^)]*)\)", str(error))
    return JobFailedError(
        f"job {number} ({' '.join(filter_overrides(overrides))}) ended without a result"
        f"{' (state: ' + state.group(1) + ')' if state else ''}: killed, out of memory or out of time? Its log: "
        f"{paths.stderr}. Run the sweep again: the shards already written are skipped"
    )


class _NamesKilledJobs:
    params: dict

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        except UncompletedJobError as error:
            raise _job_failure(error, str(self.params["submitit_folder"])) from None


class NamedFailuresLocalLauncher(_NamesKilledJobs, LocalLauncher):
    pass


class NamedFailuresSlurmLauncher(_NamesKilledJobs, SlurmLauncher):
    pass
