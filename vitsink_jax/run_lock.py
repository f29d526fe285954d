"""One run per workdir: the lock train.py and evaluate.py take before they write anything there.

The lock is a file in the workdir, ``run.lock`` (``run.<process>.lock`` for each process of a
multi-process run whose process id is known before jax.distributed starts, as for
``log.<process>.txt``: :func:`vitsink_jax.parallel.planned_process_id`), holding the holder's
host, pid, start time and command (JSON), and an ``fcntl.flock`` held on it while the run lasts.
The flock is what makes taking the lock atomic (two runs starting together: one gets it), and the
kernel drops it when the holder dies however it dies. The file is removed when the run ends
(also on an error or Ctrl-C).

* A lock held by a live run refuses the second run in one line naming the holder.
* A lock left behind by a run that died (its pid is gone, on this host) is taken over with a
  one-line warning.
* A lock written by another host (a workdir on NFS) is never judged stale from here (its pid
  means nothing on this host): the message says to remove the file once that run is known to be
  over.
* A pid alive on this host whose file is not flocked (the pid was reused by another program) is
  refused too, naming the file to remove: a wrong refusal costs a command, a wrong take-over a
  run.

Several processes of one run do not refuse each other: each holds its own lock file (hosts
need not share a filesystem), and the lock files of one run record the same ``run`` id (the
configured coordinator, or the launcher's job: SLURM job id, mpirun's URI), so a lock file of
another run in the same workdir (say a one-process run where a two-process one runs) is refused.
A TPU pod, whose process ids JAX learns only when it starts, takes ``run.lock`` on each host's
own disk, as its log is ``log.txt`` on each.

A ``gs://`` workdir is not locked: object storage has no atomic create or lock through the file
interface used here, and a pod's hosts share that workdir without knowing their process ids
before jax.distributed starts. The run says so in one line; keep one run per ``gs://`` workdir
by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from . import paths
from .parallel import LAUNCHERS, planned_process_id


class WorkdirLocked(OSError):
    """Another run holds (or may hold) the workdir's lock; the message names it and the file."""


def lock_name(process: int | None) -> str:
    """``run.lock``, or ``run.<process>.lock`` for one process of several."""
    return "run.lock" if process is None else f"run.{process}.lock"


def run_id(dist, environ) -> str | None:
    """What the processes of one multi-process run share before jax.distributed starts: the
    configured coordinator, or the launcher's job (None for a one-process run)."""
    if dist is None or planned_process_id(dist, environ) is None:
        return None
    if dist.coordinator:
        return f"coordinator {dist.coordinator}"
    name, needs, _, _ = next(launch for launch in LAUNCHERS if all(v in environ for v in launch[1]))
    return f"{name} {environ[needs[0]]}"


def holder_text(holder: dict, path) -> str:
    """"pid 123 on host h since 2026-12-07 15:00:00 (python train.py ...)", from a lock file's
    contents (``path`` names the file when they are unreadable)."""
    if not holder:
        return f"a run that has not written its details yet (or an unreadable {path})"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('command')})")


def _read(fd: int) -> dict:
    """The holder recorded in an open lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _refusal(path: Path, holder: dict, why: str) -> WorkdirLocked:
    return WorkdirLocked(errno.EBUSY, f"workdir {path.parent} is in use by {holder_text(holder, path)}"
                         f" ({why}; lock file {path})")


def stale_reason(holder: dict, host: str) -> str | None:
    """Why a lock file whose flock nobody holds is stale (its run died on this host), or None
    when that cannot be judged from here (another host's, or its pid runs)."""
    pid = holder.get("pid")
    if not holder:
        return "an unreadable lock file"
    if holder.get("host") != host:
        return None
    if pid == os.getpid() or not _pid_alive(pid):
        return f"pid {pid} is not running"
    return None


def _flocked(path: Path) -> int:
    """An open fd of ``path`` (created if missing) holding its flock; the refusal when another
    process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _refusal(path, holder, "one run per workdir: wait for it to end or use another "
                           "--workdir") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and flock: take the new one


def _take(path: Path, me: dict) -> tuple[int, str | None]:
    """(an open fd of ``path`` holding its flock and naming ``me``, a warning when a stale lock
    was taken over)."""
    fd = _flocked(path)
    try:
        holder, warning = _read(fd), None
        if os.fstat(fd).st_size:
            reason = stale_reason(holder, me["host"])
            if reason is None:
                where = ("another host's run: judge there whether it still runs"
                         if holder.get("host") != me["host"] else
                         "its pid runs but holds no lock: if it is no vitsink_jax run, the pid was reused")
                raise _refusal(path, holder, f"{where}; remove the lock file once that run is over")
            warning = (f"warning: taking over the stale lock {path} of {holder_text(holder, path)}: "
                       f"{reason}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        return fd, warning
    except BaseException:
        os.close(fd)
        raise


def _check_siblings(path: Path, me: dict) -> None:
    """Refuses when another lock file of the workdir (another process count's name) belongs to
    a live run other than ours (judged by its contents: reading it takes no lock, so a sibling
    process of ours starting at the same moment is never blocked by the look)."""
    for other in sorted(path.parent.glob("run*.lock")):
        if other == path:
            continue
        try:
            holder = json.loads(other.read_text() or "{}")
        except (OSError, ValueError):
            continue
        if not isinstance(holder, dict) or not holder or (me["run"] and holder.get("run") == me["run"]):
            continue  # (empty: its taker has not written it yet, and judges the others itself)
        if holder.get("host") != me["host"] or _pid_alive(holder.get("pid")):
            raise _refusal(other, holder, "another run in this workdir: wait for it to end or use "
                           "another --workdir; remove the lock file once that run is over")


@contextlib.contextmanager
def workdir_lock(workdir, dist=None, environ=None, command=None):
    """Holds the lock of ``workdir`` (created if missing) while the block runs; raises
    :class:`WorkdirLocked` when another run holds it. Yields a line to print (a stale lock
    taken over, a ``gs://`` workdir left unlocked) or None. ``dist``: the config's
    ``distributed`` block (the process id and run id of a multi-process run); ``command``: the
    holder's command line (default ``sys.argv``)."""
    environ = os.environ if environ is None else environ
    if paths.is_remote(workdir):
        yield (f"note: {workdir} is not locked (gs:// has no atomic create or lock here): keep one "
               "run per workdir by hand")
        return
    process = None if dist is None else planned_process_id(dist, environ)
    path = Path(workdir) / lock_name(process)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "run": run_id(dist, environ),
          "command": " ".join(sys.argv if command is None else command)}
    fd, warning = _take(path, me)
    try:
        _check_siblings(path, me)
        yield warning
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
