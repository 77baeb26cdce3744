"""What makes a build survive a kill, and two builds of one build folder at once:

- `DurableSqliteDB`, the doit backend this project registers as `sqlite3-durable` (an entry point
  in pyproject.toml, group doit.BACKEND): doit's own sqlite3 backend keeps every task's state in memory and
  commits once at exit, so a SIGKILL (an OOM kill, a CI time-out) forgot every task of the run.
  This one commits each task's row as soon as doit has recorded it.
- A lock per task (`flock` on build_dir/.locks/<task>.lock): one build at a time runs a given task.
  A build that finds the task locked waits; then it re-reads the task's state, and if the other
  build has just made it, takes its work instead of doing it again. The kernel drops the lock of a
  killed process, so a lock never outlives its build.
- Leftovers: every artifact is written to `.<name>.<random>.tmp` beside it (pipeline/fsutil.py);
  a killed run leaves those behind. Holding the task's lock, the next run of the task removes the
  ones of its own outputs: no live build can be writing them, since that build would hold the lock.
"""
import os
import re
import socket
import threading
import time
from pathlib import Path

from doit.dependency import Dependency, SqliteDB
from doit.exceptions import TaskFailed

from pipeline.toolchain.lifetime import die_with_parent

from ..errors import PipelineError
from ..fsutil import FileLock, explain_os_error, leftovers, remove
from ..progress import say

_OWNER_PID = None  # the process whose doit records task states (not a `doit -n N` worker)
_awaiting_commit: dict[str, FileLock] = {}  # task -> its lock, held until doit has recorded it


class DurableSqliteDB(SqliteDB):
    """doit's sqlite3 backend, committing each task's state when doit has written all of it."""

    desc = "sqlite3, each task's state committed when the task ends (survives SIGKILL)"
    LAST_ENTRY = "deps:"  # doit's Dependency.save_success writes this entry last

    def __init__(self, name, codec, **kwargs):
        global _OWNER_PID
        super().__init__(name, codec, **kwargs)
        _OWNER_PID = os.getpid()

    def _sqlite3(self, name):
        conn = super()._sqlite3(name)
        conn.execute("PRAGMA busy_timeout = 60000")  # another build may be committing
        return conn

    def set(self, task_id, dependency, value):
        super().set(task_id, dependency, value)
        if dependency in (self.LAST_ENTRY, "ignore:"):
            self._commit(task_id)

    def _commit(self, task_id):
        self._conn.execute("insert or replace into doit values (?,?)",
                           (task_id, self.codec.encode(self._cache[task_id])))
        self._conn.commit()
        self._dirty.discard(task_id)
        lock = _awaiting_commit.pop(task_id, None)
        if lock:
            lock.release()

    def remove(self, task_id):
        super().remove(task_id)
        self._conn.commit()

    def remove_all(self):
        super().remove_all()
        self._conn.commit()


def lock_path(build_dir: Path, task_name: str) -> Path:
    return Path(build_dir) / ".locks" / (task_name.replace("/", "~").replace(":", "=") + ".lock")


def _state_manager():
    """doit's dependency manager of this run, when it keeps its state with this module's backend."""
    from doit.globals import Globals

    manager = Globals.dep_manager
    return manager if manager is not None and isinstance(manager.backend, DurableSqliteDB) else None


def done_by_another_build(task, manager) -> bool:
    """The task's state read again from the file (another build may have just recorded it)."""
    global _OWNER_PID
    owner = _OWNER_PID
    fresh = Dependency(DurableSqliteDB, manager.backend.name, checker_cls=type(manager.checker))
    _OWNER_PID = owner  # opening a second connection does not make this process the recorder
    try:
        return fresh.get_status(task, None).status == "up-to-date"
    finally:
        fresh.close()


RECORD_WAIT_SECONDS = 60


def hand_over_note() -> str:
    """What a `doit -n N` worker leaves in a task's lock: it finished the task, and which process
    will record it (a moment later)."""
    return (f"finished by pid {os.getpid()} on {socket.gethostname()}; recorded by pid {_OWNER_PID} "
            f"at {time.time():.3f}")


def another_build_was_here(note: str) -> bool:
    """The lock's last holder, or the process recording its work, is another live build on this host."""
    import psutil

    if f" on {socket.gethostname()}" not in note:
        return False
    mine = {os.getpid(), _OWNER_PID}
    return any(pid not in mine and psutil.pid_exists(pid) for pid in map(int, re.findall(r"pid (\d+)", note)))


def recorded_soon(task, manager, note: str) -> bool:
    """A worker of another build handed the task over to its doit a moment ago (hand_over_note):
    wait for that record, while that doit lives, rather than make the task again."""
    import psutil

    m = re.fullmatch(r"finished by pid \d+ on (\S+); recorded by pid (\d+) at ([\d.]+)", note)
    if not m or m[1] != socket.gethostname() or time.time() - float(m[3]) > RECORD_WAIT_SECONDS:
        return False
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while psutil.pid_exists(int(m[2])) and time.monotonic() < deadline:
        if done_by_another_build(task, manager):
            return True
        time.sleep(0.1)
    return False


def _user_errors(fn, args, kwargs, task):
    """fn's result; what a user can act on (a PipelineError, a full or read-only disk, Ctrl-C) as one
    paragraph instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except PipelineError as err:
        return TaskFailed(str(err))
    except OSError as err:
        if (message := explain_os_error(err)) is None:
            raise
        return TaskFailed(message)
    except KeyboardInterrupt:  # Ctrl-C: stop the build, quietly, as the user asked
        say(f"[interrupted] {task.name} stopped by Ctrl-C; nothing of it was kept. The same command goes on "
            "from there.")
        raise SystemExit(130) from None


def stop_quietly_on_ctrl_c() -> None:
    """In doit's process, when its workers do the work (jobs=): Ctrl-C ends the build with a word
    and exit status 130, not a traceback from doit's wait for its workers. (The workers, which get
    the same Ctrl-C, stop their tasks as a serial build does: _user_errors.)"""
    import signal

    def interrupted(signum, frame):
        say("[interrupted] the build stopped by Ctrl-C; nothing of its unfinished tasks was kept. The same "
            "command goes on from there.")
        raise SystemExit(130)

    signal.signal(signal.SIGINT, interrupted)


def _die_with_doit() -> None:
    """In a process the doit process forked (a `doit -n N` worker): die with doit. Killed, doit
    leaves its workers waiting for work forever on a queue they hold open themselves (Linux's
    parent-death signal; elsewhere nothing is done). Ctrl-C is a KeyboardInterrupt there again."""
    if _OWNER_PID is None or os.getppid() != _OWNER_PID:
        return
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    die_with_parent(_OWNER_PID)


os.register_at_fork(after_in_child=_die_with_doit)

_running = threading.local()  # the task an action of this thread runs


def current_outputs() -> list:
    """What the task this thread runs writes (its targets, or its meta "outputs")."""
    return list(getattr(_running, "outputs", []))


def task_action(fn, build_dir: Path):
    """A doit python-action running `fn` under the task's lock, after removing the task's leftovers.
    A PipelineError, or a full or read-only disk, becomes a clean task failure (one paragraph, no
    traceback)."""
    def action(*args, task, **kwargs):
        # doit did not record that task (it failed to save): let go. (Serial runs only: with threads
        # (cluster=) another task may be waiting for its record right now; exit releases any left.)
        for name in list(_awaiting_commit) if threading.current_thread() is threading.main_thread() else []:
            lock = _awaiting_commit.pop(name, None)
            if lock is not None:
                lock.release()
        lock = FileLock(lock_path(build_dir, task.name))
        manager = _state_manager()
        try:
            waited = lock.acquire(task.name)
            if manager and (waited or another_build_was_here(lock.previous)) and (
                    done_by_another_build(task, manager) or recorded_soon(task, manager, lock.previous)):
                say(f"[shared] {task.name}: made by the build we waited for")
                result = None
            else:
                _running.outputs = (task.meta or {}).get("outputs", task.targets)
                for path in leftovers(_running.outputs):
                    remove(path)
                result = _user_errors(fn, args, kwargs, task)
        except BaseException:
            lock.release()
            raise
        if isinstance(result, TaskFailed):
            lock.release()
        elif os.getpid() == _OWNER_PID:  # held until doit has committed the task's state
            _awaiting_commit[task.name] = lock
        else:  # a `doit -n N` worker: the parent records the state, a moment later
            lock.release(note=hand_over_note())
        return result if isinstance(result, (dict, TaskFailed)) else None
    action.__name__ = fn.__name__
    return action
