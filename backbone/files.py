"""Files of a run written so that a crash, a full disk or a SIGKILL never leaves half of one.

:func:`write_atomically` is the one writer of checkpoints, metrics, policies and state files;
:func:`remove_stale_temporary_files` clears what a SIGKILLed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

from backbone.errors import CheckpointError, DyndepthError


def write_atomically(
    path: str | os.PathLike, data: bytes, what: str = "checkpoint", error: type[DyndepthError] = CheckpointError
) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers see the old
    file or the new one, never half of one. A failed write (a full disk, say) raises ``error``
    naming the file; the previous file stays unchanged and no temporary file is left behind.
    Under torchrun only rank 0 writes (checkpoints, metrics, policies): on the other ranks this
    returns without touching the disk."""
    path = Path(path)
    if not _writes_here():
        return path  # under torchrun every file of a run is rank 0's
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open honours the umask (tempfile would always create 0600 files).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        raise error(f"{what} {path} could not be written ({err.strerror or err}); any previous file there is unchanged") from err
    with contextlib.suppress(OSError):  # make the rename durable; not possible on every OS
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _writes_here() -> bool:
    from backbone.training import distributed  # imported here: backbone.training imports this module

    return distributed.is_main_process()


#: The temporary files of write_atomically: ``.<name>.<8 hex digits>.tmp``.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_stale_temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Delete what :func:`write_atomically` leaves when its process is SIGKILLed between writing
    and renaming (no handler runs then), anywhere under ``directory``. Only for the owner of a run
    directory (``experiments.common.lock_run_dir``): another writer's file would be in flight."""
    removed = [p for p in Path(directory).rglob(".*.tmp") if p.is_file() and _TEMPORARY.fullmatch(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
