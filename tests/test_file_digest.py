"""doit's file checks by content (pipeline/graph/file_digest.py): what counts as a changed dependency, and
that a file is read once while it is unchanged on disk."""
import os

import pytest
from doit.dependency import MD5Checker

from pipeline.graph import file_digest
from pipeline.graph.file_digest import ContentChecker
from pipeline.graph.file_digest import file_digest as digest_of

pytestmark = pytest.mark.fast


def touch_later(path, seconds=5):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_a_dependency_changes_with_its_content_not_its_time(tmp_path):
    checker, dep = ContentChecker(), tmp_path / "piece.onnx"
    dep.write_bytes(b"graph and weights")
    state = checker.get_state(str(dep), None)
    assert checker.get_state(str(dep), state) is None  # recorded at this mtime: nothing to record
    assert not checker.check_modified(str(dep), dep.stat(), state)

    dep.write_bytes(b"graph and weights")  # made again, the same bytes: dependents need not rerun
    touch_later(dep)
    assert not checker.check_modified(str(dep), dep.stat(), state)

    dep.write_bytes(b"graph and WEIGHTS")  # the same size, other bytes
    touch_later(dep, 10)
    assert checker.check_modified(str(dep), dep.stat(), state)
    dep.write_bytes(b"graph")
    assert checker.check_modified(str(dep), dep.stat(), state)


def test_a_state_recorded_by_doits_md5_checker_is_kept_until_the_file_changes(tmp_path):
    checker, dep = ContentChecker(), tmp_path / "block_0.onnx"
    dep.write_bytes(b"weights")
    old = MD5Checker().get_state(str(dep), None)  # a build folder from before this checker
    assert not checker.check_modified(str(dep), dep.stat(), old)
    touch_later(dep)
    assert checker.check_modified(str(dep), dep.stat(), old)  # its digest cannot be compared: once


def test_a_file_is_read_once_while_unchanged(tmp_path, monkeypatch):
    dep = tmp_path / "lm_head.onnx"
    dep.write_bytes(b"x" * 3_000_000)
    opened = []
    real_open = open
    monkeypatch.setattr(file_digest, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k),
                        raising=False)
    first = digest_of(str(dep))
    assert digest_of(str(dep)) == first and len(opened) == 1  # a second dependent task: no reading

    replacement = tmp_path / ".lm_head.onnx.tmp"  # made again and renamed into place: a new file
    replacement.write_bytes(b"y" * 3_000_000)
    os.replace(replacement, dep)
    assert digest_of(str(dep)) != first and len(opened) == 2
