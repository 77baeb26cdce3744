"""Atomic file writes: every artifact appears whole under its final name, or not at all.

Temporary files and folders are named `.<final name>.<random>.tmp` (and `.<final name>.old`) beside
the artifact, so the next run of a killed task finds its leftovers (pipeline/graph/task_state.py)."""
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import PipelineError
from .progress import say

UMASK = os.umask(0)
os.umask(UMASK)


@contextmanager
def atomic_path(final: Path):
    """Yield a temp path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; an artifact gets the usual permissions
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path):
    """Yield a temp folder beside `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FileLock:
    """An exclusive flock on a file, with who holds it written inside (for messages). The kernel
    drops it when its process dies, so a lock never outlives a killed build."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None
        self.previous = ""  # what the last holder left written (who it was, or release's note)

    def acquire(self, what: str) -> bool:
        """Take the lock, waiting for another build if need be; True if it had to wait."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        waited = False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another build"
            say(f"[wait] {what} is being built by {holder}; waiting for it")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            waited = True
        self.previous = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        return waited

    def release(self, note: str = "") -> None:
        """Let go; `note` is left for the next holder to read."""
        if self.fd is not None:
            if note:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, note.encode(), 0)
            os.close(self.fd)  # closing the file drops the flock
            self.fd = None


def leftovers(outputs) -> list[Path]:
    """Temporary files and folders of these outputs (atomic_path and atomic_dir name them), left by a
    killed writer. Remove them only holding the lock of whatever writes the outputs."""
    found = []
    for output in map(Path, outputs):
        if output.parent.is_dir():
            found += [p for p in output.parent.glob(f".{output.name}.*") if p.name.endswith((".tmp", ".old"))]
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def ensure_writable_dir(path: Path, variable: str, create: bool = True) -> None:
    """A folder the build will write to (or, with create=False, its nearest existing parent) must be
    writable: say so at once, naming the variable that sets it, rather than fail mid-build."""
    path = Path(path)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"{variable}={path} cannot be created: {err.strerror}; "
                                f"choose a writable folder with {variable}=") from None
    existing = nearest_existing(path)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise PipelineError(f"{variable}={path}: {existing} {what}; choose a writable folder with {variable}=")


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists (where it would be created)."""
    return next(p for p in (Path(path), *Path(path).parents) if p.exists())


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or would)."""
    return shutil.disk_usage(nearest_existing(path)).free


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def require_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing, rather than leave the tools to fail on a full disk (model_tool --combine
    reports success on a file it could not finish)."""
    free = free_bytes(folder)
    if free < needed:
        raise PipelineError(f"no space left for {what} in {folder}: {gib(free)} free, about {gib(needed)} needed; "
                            "free some space, or build elsewhere with build_dir= / dist_dir=")


def explain_os_error(err: OSError) -> str | None:
    """One paragraph for the file-system errors a user can fix (full disk, read-only or foreign
    folder); None for the others, which are bugs and keep their traceback."""
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = gib(free_bytes(where)) if err.filename else "?"
        return (f"no space left on the device while writing {where} ({free} free); free some space, or build "
                "elsewhere with build_dir= / dist_dir=")
    if err.errno == errno.EROFS:
        return f"cannot write {where}: {err.strerror}; use a writable folder (build_dir= / dist_dir=)"
    if err.errno in (errno.EACCES, errno.EPERM):  # a file to read, or a folder to write
        return (f"{where}: {err.strerror}; check its permissions (build_dir= / dist_dir= choose where the build "
                "writes)")
    return None


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_json_if_changed(path: Path, data) -> bool:
    """Keep the file (and its mtime) when the content is the same, so nothing downstream reruns."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if Path(path).exists() and Path(path).read_text(encoding="utf-8") == text:
        return False
    write_text(path, text)
    return True


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
