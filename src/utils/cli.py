"""Running a Hydra entry point so that a user's mistake ends in one clear line, not a traceback.

Hydra is told to let exceptions through (HYDRA_FULL_ERROR=1) and this wrapper reports the kinds a
user causes: the framework's own errors, config composition and interpolation errors, failed
instantiation, and an output path that cannot be created. Anything else is a bug and keeps its
full traceback; so does everything when the user sets HYDRA_FULL_ERROR=1 to debug.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from src.errors import LicError

USER_ERRORS = (LicError, HydraException, OmegaConfBaseException)


def missing_option(err: MissingConfigException) -> str:
    """A config group option that does not exist, with the group's options, on one line."""
    wanted = err.missing_cfg_file or ""
    group, _, name = wanted.rpartition("/")
    if not group or not err.options:  # not a group option (a missing primary config): first line
        return str(err).strip().splitlines()[0]
    return f"{group}={name}: no such option of '{group}'; choose one of: {', '.join(err.options)}"


def explain(err: BaseException) -> str:
    """The innermost framework error's message if there is one, else this error's."""
    if isinstance(err, MissingConfigException):
        return missing_option(err)
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, LicError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, OSError) and err.filename:
        return f"cannot write {err.filename}: {err.strerror}"
    return str(err).strip()


def run_entry_point(main: Callable[[], None]) -> None:
    """Call a `@hydra.main` function; report user errors on stderr and exit with status 2."""
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
    try:
        main()
    except (*USER_ERRORS, OSError) as err:
        # MissingConfigException is an OSError without a file name: a user's typo all the same.
        unexplained_os_error = isinstance(err, OSError) and not err.filename
        if wants_traceback or (unexplained_os_error and not isinstance(err, HydraException)):
            raise
        print(f"error: {explain(err)}", file=sys.stderr)
        sys.exit(2)


def run_command(fn: Callable[[], None]) -> int:
    """Run an argparse command; the framework's errors and file errors become one `error:` line
    on stderr and exit status 2."""
    try:
        fn()
    except (LicError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
