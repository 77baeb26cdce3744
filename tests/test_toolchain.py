"""Toolchain discovery and install failures, explained (no real install needed)."""
import stat

import pytest

from pipeline.errors import PipelineError
from pipeline.toolchain import install

pytestmark = pytest.mark.fast


def _script(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_no_python310_says_how_to_provide_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no python3.10, no pyenv
    monkeypatch.setenv("QWEN_TPU_PYTHON310", str(_script(tmp_path / "python3.11", "exit 1\n")))
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    monkeypatch.setattr(install, "_FALLBACK_PYTHONS", [str(tmp_path / "nothing" / "python3.10")])
    with pytest.raises(PipelineError) as err:
        install.find_python310()
    message = str(err.value)
    assert "needs Python 3.10" in message and "QWEN_TPU_PYTHON310" in message and "pyenv install 3.10" in message


def test_failed_install_quotes_its_log_and_leaves_no_marker(tmp_path, monkeypatch):
    fake = _script(tmp_path / "python3.10", 'case "$*" in\n'
                   '  *"print(sys.version_info"*) echo "(3, 10)";;\n'
                   '  *) echo "Error: No module named venv (simulated)" >&2; exit 1;;\nesac\n')
    monkeypatch.setenv("QWEN_TPU_PYTHON310", str(fake))
    monkeypatch.setenv("QWEN_TPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QWEN_TPU_TOOLCHAIN", raising=False)
    with pytest.raises(PipelineError) as err:
        install.ensure_toolchain()
    message = str(err.value)
    assert "toolchain install failed at: create the Python 3.10 environment" in message
    assert "No module named venv (simulated)" in message and "full log:" in message
    assert not (install.managed_prefix() / install.MARKER).exists()


def test_external_toolchain_that_is_not_one(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_TPU_TOOLCHAIN", str(tmp_path))
    with pytest.raises(PipelineError, match="has no bin/model_transform.py"):
        install.ensure_toolchain()


def test_bundled_glibc_version_is_read_from_the_library():
    assert install._glibc_version(b"\x00GNU C Library (Ubuntu GLIBC 2.35-0ubuntu3.9) stable release "
                                  b"version 2.35.\x00") == (2, 35)
    assert install._glibc_version(b"no version here") is None
