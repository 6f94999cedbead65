"""Work folders in the temporary directory that outlive a process killed hard.

SIGKILL (the OOM killer, a container's stop past its grace) leaves no time to remove a work folder, and export's
holds gigabytes of ONNX for ruri-large. Each folder's name carries the pid of the process that made it, so the next
start of the same command removes those whose process is gone.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_left(prefix: str, folder: Path | None = None) -> None:
    """Remove the folders ``prefix<pid>-*`` (in ``folder``, default the temporary directory) of processes that are
    gone."""
    for left in Path(folder or tempfile.gettempdir()).glob(glob.escape(prefix) + "*-*"):
        pid = left.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)


def fresh(prefix: str, folder: Path | None = None) -> tempfile.TemporaryDirectory:
    """A work folder named for this process (in ``folder``, default the temporary directory), once the folders that
    killed ones left are gone."""
    remove_left(prefix, folder)
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=folder)
