"""Folders the build cannot write: read-only, or full. A one-paragraph error naming the folder (and
for space: free and needed), exit code 1 or 2, no traceback, nothing half-written."""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import run_cli


@contextmanager
def mounted(target: Path, *options: str):
    """A real file-system condition: a read-only bind mount or a small tmpfs (needs root, as CI has)."""
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (not root?): {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@contextmanager
def read_only(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:  # permissions stop everyone but root
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:  # root ignores permissions: a read-only file system stops root too
        with mounted(folder, "--bind", "-o", "ro", str(folder)):
            yield folder


def _refused(result, *phrases):
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for phrase in phrases:
        assert phrase in output, output


@pytest.mark.fast
def test_read_only_build_dir(tmp_path):
    with read_only(tmp_path / "ro") as ro:
        _refused(run_cli(["build", f"build_dir={ro / 'build'}"]), f"build_dir={ro / 'build'}",
                 "choose a writable folder")


@pytest.mark.fast
def test_read_only_dist_dir(tmp_path):
    with read_only(tmp_path / "ro") as ro:
        _refused(run_cli(["build", f"build_dir={tmp_path / 'build'}", f"dist_dir={ro / 'dist'}"]),
                 f"dist_dir={ro / 'dist'}", "is not writable")
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").rglob("*.onnx"))


@pytest.mark.sim
def test_full_dist_disk_names_free_and_needed_space(tmp_path):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=3m", "tmpfs") as small:
        result = run_cli(["build", f"build_dir={tmp_path / 'build'}", f"dist_dir={small}"])
        _refused(result, f"no space left for the combined tiny-qwen2_int8_seq32_1dev_dyn.bmodel in {small}",
                 "3.0 MiB free", "needed")
        assert list(small.iterdir()) == []  # nothing half-written


@pytest.mark.sim
def test_a_folder_that_turns_read_only_mid_build_is_named(tmp_path):
    common = [f"build_dir={tmp_path / 'build'}", f"dist_dir={tmp_path / 'dist'}"]
    assert run_cli(["transform", *common]).returncode == 0
    deploy = tmp_path / "build" / "tiny-qwen2" / "seq32" / "deploy"
    with read_only(deploy):  # e.g. a disk remounted read-only after an error
        why = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
        _refused(run_cli(["build", *common]), f"{deploy}/int8_1dev_bm1684x_dyn", why)
