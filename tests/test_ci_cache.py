"""Incremental CI: the build folder lives outside the checkout; a CI job restores it from a cache
into a fresh clone (another checkout path, new file times everywhere) and rebuilds nothing."""
import shutil
import subprocess

import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.sim


def _checkout(dest):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, dest / name)  # copy, not copy2: new file times
    return dest


def test_restored_build_folder_in_a_fresh_clone_rebuilds_nothing(tmp_path):
    cache = tmp_path / "ci-cache"
    common = ["model=tiny-qwen2", f"build_dir={cache}", f"dist_dir={cache / 'dist'}"]
    first = run_cli(["build", *common], cwd=_checkout(tmp_path / "clone-1"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(".  deploy:") == 9

    saved = tmp_path / "saved"
    shutil.move(cache, saved)  # the CI cache: saved, then restored with new file times
    shutil.copytree(saved, cache, copy_function=shutil.copy)
    second = run_cli(["build", *common], cwd=_checkout(tmp_path / "clone-2"))
    assert second.returncode == 0, second.stdout + second.stderr
    ran = [line for line in second.stdout.splitlines() if line.startswith(".  ")]
    compiled = [t for t in ran if t.split()[1].split(":")[0] in ("export", "transform", "deploy", "combine",
                                                                 "verify")]
    assert compiled == [], ran
    # only the cheap re-check of the checkpoint's new file times, whose fingerprints are unchanged
    assert all(t.split()[1].split(":")[0] in ("checkpoint", "map") for t in ran), ran
