"""tests/tiers.py: a test with no tier or two fails the collection with its name, and `pytest`
alone runs the fast tier."""
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.fast

TESTS = '''
import pytest

@pytest.mark.fast
def test_quick(): pass

@pytest.mark.sim
def test_simulated(): pass
'''


def _pytest(folder, *args) -> subprocess.CompletedProcess:
    """pytest on `folder` with the project's tier plugin, as pyproject.toml loads it."""
    (folder / "pytest.ini").write_text("[pytest]\ntestpaths = .\naddopts = -p tests.tiers\n"
                                       "markers =\n    fast\n    sim\n    real\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("markers, named", [("", "no tier"), ("@pytest.mark.fast\n@pytest.mark.real\n", "fast, real")],
                         ids=["no tier", "two tiers"])
def test_a_test_without_exactly_one_tier_fails_the_collection_by_name(tmp_path, markers, named):
    (tmp_path / "test_some.py").write_text(TESTS + f"\n{markers}def test_untiered(): pass\n")
    for args in ((), ("-m", "fast")):  # also when -m would deselect it
        out = _pytest(tmp_path, "--collect-only", *args)
        assert out.returncode != 0, out.stdout
        assert f"test_some.py::test_untiered: {named}" in out.stderr, out.stdout + out.stderr
        assert "test_quick" not in out.stderr


def test_pytest_alone_runs_the_fast_tier_and_a_named_test_runs_whatever_its_tier(tmp_path):
    (tmp_path / "test_some.py").write_text(TESTS)
    alone = _pytest(tmp_path)
    assert alone.returncode == 0 and "1 passed, 1 deselected" in alone.stdout, alone.stdout
    every = _pytest(tmp_path, "-m", "fast or sim or real")
    assert every.returncode == 0 and "2 passed" in every.stdout, every.stdout
    named = _pytest(tmp_path, "test_some.py::test_simulated")
    assert named.returncode == 0 and "1 passed" in named.stdout, named.stdout
