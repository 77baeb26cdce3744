"""This project's build against tpu-mlir's own `llm_convert.py`, side by side in one run, on the
same generated checkpoint: a full build, a rebuild with nothing changed, another mode.

    .venv/bin/python benchmarks/vs_llm_convert.py [--model bench-qwen2-medium] [--layers 4] [--seq 256]
        [--mode int4] [--other-mode int8] [--jobs N ...] [--baseline GIT-COMMIT]
Ours is `doit build` as a user runs it (the default: jobs = the cores, within the memory; each
--jobs value gets a full build of its own), which also verifies the ONNX pieces against torch;
llm_convert.py builds the bmodel only (GNU parallel runs its deploys). Prints a Markdown table and
writes it to benchmarks/results/vs_llm_convert.md.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

DOIT = Path(sys.executable).parent / "doit"
LLM_CONVERT_MODES = {"int4": "w4bf16", "int8": "w8bf16", "bf16": "bf16"}


def timed(argv: list[str], **kwargs) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout + out.stderr


def ours(build_dir: Path, variables: list[str], *extra: str, code: Path = ROOT) -> tuple[float, int]:
    """`doit build` with the project's code at `code` (a checkout of another commit: --baseline)."""
    env = {**os.environ, "PYTHONPATH": str(code)} if code != ROOT else None
    seconds, output = timed([str(DOIT), "build", *variables, *extra, f"build_dir={build_dir}",
                             f"dist_dir={build_dir / 'dist'}"], cwd=code, env=env)
    return seconds, len(re.findall(r"^\.  ", output, re.M))


def checkout(rev: str, where: Path) -> Path:
    """The project at commit `rev`, in a folder of its own (a git worktree, removed afterwards)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def llm_convert(checkpoint: Path, seq: int, mode: str, out: Path, *extra: str) -> float:
    from pipeline.toolchain.install import ensure_toolchain

    toolchain = ensure_toolchain()
    return timed([str(toolchain.bin / "llm_convert.py"), "-m", str(checkpoint), "-s", str(seq), "-q",
                  LLM_CONVERT_MODES[mode], "-c", "bm1684x", "-o", str(out), *extra], cwd=out.parent,
                 env=toolchain.env())[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-qwen2-medium")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mode", default="int4")
    parser.add_argument("--other-mode", default="int8")
    parser.add_argument("--jobs", nargs="*", default=[], help="also a full build with each of these jobs=")
    parser.add_argument("--baseline", help="also a full build by this project at this git commit")
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        raise SystemExit("llm_convert.py needs GNU parallel (apt-get install parallel)")
    variables = [f"model={args.model}", f"layers={args.layers}", f"seq={args.seq}", f"mode={args.mode}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-llm-convert-") as tmp:
        build = Path(tmp) / "ours"
        timed([str(DOIT), "checkpoint", *variables, f"build_dir={build}", f"dist_dir={build / 'dist'}"], cwd=ROOT)
        checkpoint = next(build.glob("*/checkpoint"))  # generating it is part of neither build
        theirs = Path(tmp) / "llm_convert"
        theirs.mkdir()
        full, ran = ours(build, variables)
        rows.append(("full build", f"{full:.1f} s ({ran} tasks, ONNX verification included)",
                     f"{llm_convert(checkpoint, args.seq, args.mode, theirs / 'out'):.1f} s"))
        noop, ran = ours(build, variables)
        rows.append(("nothing changed", f"{noop:.2f} s ({ran} tasks)",
                     f"{llm_convert(checkpoint, args.seq, args.mode, theirs / 'out', '--again'):.1f} s (`--again`)"))
        other, ran = ours(build, variables, f"mode={args.other_mode}")
        rows.append((f"another mode ({args.mode} -> {args.other_mode})", f"{other:.1f} s ({ran} tasks)",
                     f"{llm_convert(checkpoint, args.seq, args.other_mode, theirs / 'other'):.1f} s"))
        if args.baseline:
            fresh = Path(tmp) / "baseline"
            code = checkout(args.baseline, Path(tmp) / "baseline-code")
            try:
                timed([str(DOIT), "checkpoint", *variables, f"build_dir={fresh}", f"dist_dir={fresh / 'dist'}"],
                      cwd=ROOT)
                seconds, ran = ours(fresh, variables, code=code)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
            rows.append((f"full build, this project at {args.baseline}", f"{seconds:.1f} s ({ran} tasks)", ""))
        for jobs in args.jobs:
            fresh = Path(tmp) / f"jobs{jobs}"  # the same checkpoint, generated again (not timed)
            timed([str(DOIT), "checkpoint", *variables, f"build_dir={fresh}", f"dist_dir={fresh / 'dist'}"], cwd=ROOT)
            seconds, ran = ours(fresh, variables, f"jobs={jobs}")
            rows.append((f"full build, `jobs={jobs}`", f"{seconds:.1f} s ({ran} tasks)", ""))
    lines = [f"`{args.model}` with {args.layers} layers, seq {args.seq}, {args.mode}; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}; one run, the two side by side on one generated checkpoint.", "",
             "| | this project (`doit build`) | llm_convert.py |", "|---|---|---|"]
    lines += [f"| {what} | {a} | {b} |" for what, a, b in rows]
    publish("\n".join(lines) + "\n", "vs_llm_convert.md" if args.layers == 4 else f"vs_llm_convert_{args.layers}l.md")


if __name__ == "__main__":
    main()
