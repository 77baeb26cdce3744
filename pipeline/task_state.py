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
from pathlib import Path

from doit.dependency import Dependency, SqliteDB
from doit.exceptions import TaskFailed

from .errors import PipelineError
from .fsutil import FileLock, explain_os_error, leftovers, remove
from .progress import say

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


def task_action(fn, build_dir: Path):
    """A doit python-action running `fn` under the task's lock, after removing the task's leftovers.
    A PipelineError, or a full or read-only disk, becomes a clean task failure (one paragraph, no
    traceback)."""
    def action(*args, task, **kwargs):
        for name in list(_awaiting_commit):  # doit did not record that task (it failed to save): let go
            _awaiting_commit.pop(name).release()
        lock = FileLock(lock_path(build_dir, task.name))
        manager = _state_manager()
        try:
            if lock.acquire(task.name) and manager and done_by_another_build(task, manager):
                say(f"[shared] {task.name}: made by the build we waited for")
                result = None
            else:
                for path in leftovers((task.meta or {}).get("outputs", task.targets)):
                    remove(path)
                result = _user_errors(fn, args, kwargs, task)
        except BaseException:
            lock.release()
            raise
        if isinstance(result, TaskFailed):
            lock.release()
        elif os.getpid() == _OWNER_PID:  # held until doit has committed the task's state
            _awaiting_commit[task.name] = lock
        else:  # a `doit -n N` worker: the parent records the state
            lock.release()
        return result if isinstance(result, (dict, TaskFailed)) else None
    action.__name__ = fn.__name__
    return action
