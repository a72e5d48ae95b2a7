"""The project's errors: what a user can fix, told apart from bugs.

Every problem the user can act on (a bad recipe, bad or missing data, a run that cannot start, no
cluster to join) is a `RaytuneError`; its message names the file / field / option and the fix, and
the command line prints that message alone and exits with the error's `exit_code`:

    2  the recipe (or the command line) is wrong: nothing ran          RecipeError
    4  the inputs are wrong or missing: data, weights, earlier stages  DataError and the stage errors
    5  the device under the run directory is full                      storage.NoSpace
    1  no cluster to join, or not the GPUs the stage needs              ClusterError

Anything else is a bug: `raytune-app` prints its traceback and asks for a report (exit 70).

Stage errors subclass ValueError as well, as they did before this base existed, so code that caught
ValueError still does. Pure Python; no Ray.
"""

from __future__ import annotations

EXIT_BAD_RECIPE = 2
EXIT_BAD_DATA = 4
EXIT_NO_SPACE = 5
EXIT_NO_CLUSTER = 1
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: an internal error


class RaytuneError(Exception):
    """A problem the user can fix; the message says what and how. The CLI exits with `exit_code`."""

    exit_code = EXIT_BAD_DATA


class RecipeError(RaytuneError, ValueError):
    """A recipe that cannot run. ``problems`` holds one line per problem, each naming the field."""

    exit_code = EXIT_BAD_RECIPE

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n  " + "\n  ".join(problems))


class DataError(RaytuneError, ValueError):
    """Inputs that are wrong or missing: data rows, files, weights, the output of an earlier stage."""

    exit_code = EXIT_BAD_DATA


class MissingInput(DataError, FileNotFoundError):
    """A file or folder the run needs is not there (a FileNotFoundError too, as it was)."""


class ClusterError(RaytuneError, RuntimeError):
    """No Ray cluster to join, or the cluster cannot get what the stage needs."""

    exit_code = EXIT_NO_CLUSTER


def user_error(exc: BaseException) -> RaytuneError | None:
    """The RaytuneError behind `exc`, also when it was raised inside a Ray task, actor or Train worker
    (Ray wraps it, sometimes twice: RayTaskError, TrainingFailedError); None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        exc = current
        seen.add(id(exc))
        if isinstance(exc, RaytuneError):
            cause = getattr(exc, "cause", None)  # Ray's RayTaskError subclasses the cause's class
            return cause if isinstance(cause, RaytuneError) else exc
        worker_failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
        if isinstance(worker_failures, dict):
            for failure in worker_failures.values():
                found = user_error(failure)
                if found is not None:
                    return found
        cause = getattr(exc, "cause", None)
        current = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None
