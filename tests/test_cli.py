"""The commands of the README, as a user types them (dodo.py, a real doit process)."""
import pytest

from .conftest import run_cli

pytestmark = pytest.mark.sim


def test_build_verify_and_doits_own_commands(tmp_path):
    common = ["model=tiny-qwen3", f"build_dir={tmp_path}", f"dist_dir={tmp_path / 'dist'}"]
    built = run_cli(["build", *common])
    assert built.returncode == 0, built.stdout + built.stderr
    assert "[verify] PASS" in built.stderr and "16 tokens identical" in built.stderr
    for stage in ("export", "transform", "deploy"):  # progress: which piece, of how many, time
        assert f"[{stage} 3/9] block_0 done in" in built.stderr
    report = tmp_path / "tiny-qwen3" / "seq32" / "verify" / "report.md"
    assert "**Result: PASS**" in report.read_text()
    assert (tmp_path / "dist" / "tiny-qwen3_int8_seq32_1dev_dyn.bmodel").stat().st_size > 1_000_000

    noop = run_cli(["build", *common])
    assert noop.returncode == 0 and "\n.  " not in "\n" + noop.stdout, noop.stdout

    verify = run_cli(["verify", *common])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "-- verify:tiny-qwen3/seq32\n" in verify.stdout  # the ONNX checks were done by build
    assert ".  verify:tiny-qwen3/seq32/int8_1dev_bm1684x_dyn" in verify.stdout  # the simulator's are new
    assert "[verify int8 on the simulator] PASS" in verify.stderr

    listing = run_cli(["list", "--all", *common])
    assert "export:tiny-qwen3/seq32/block_cache_1" in listing.stdout

    info = run_cli(["info", "export:tiny-qwen3/seq32/lm_head", *common])
    assert info.returncode == 0 and "lm_head.onnx" in info.stdout

    forget = run_cli(["forget", "verify:tiny-qwen3/seq32", *common])
    assert forget.returncode == 0
    again = run_cli(["verify", *common])
    assert again.returncode == 0 and ".  verify:tiny-qwen3/seq32\n" in again.stdout

    clean = run_cli(["clean", "export", *common])
    assert clean.returncode == 0
    assert not (tmp_path / "tiny-qwen3" / "seq32" / "onnx" / "lm_head.onnx").exists()
