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
from benchmarks.common import ROOT, model_options, publish  # noqa: E402

DOIT = Path(sys.executable).parent / "doit"
LLM_CONVERT_MODES = {"int4": "w4bf16", "int8": "w8bf16", "bf16": "bf16"}


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (forked workers share pages: an upper bound)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed(argv: list[str], **kwargs) -> tuple[float, str, float]:
    """(seconds, output, peak resident GiB of its process tree, sampled every 0.5 s)."""
    start, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.5)
        out.seek(0)
        output = out.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{output[-6000:]}")
    return time.perf_counter() - start, output, peak / 2**30


def ours(build_dir: Path, variables: list[str], *extra: str, code: Path = ROOT) -> tuple[float, int, str, float]:
    """`doit build` with the project's code at `code` (a checkout of another commit: --baseline):
    (seconds, tasks run, output, peak GiB)."""
    env = {**os.environ, "PYTHONPATH": str(code)} if code != ROOT else None
    seconds, output, peak = timed([str(DOIT), "build", *variables, *extra, f"build_dir={build_dir}",
                                   f"dist_dir={build_dir / 'dist'}"], cwd=code, env=env)
    return seconds, len(re.findall(r"^\.  ", output, re.M)), output, peak


def per_piece(output: str) -> str:
    """What the first layer of a kind and the later ones (made from it) took, per stage."""
    found = re.findall(r"\[(export|transform) \d+/\d+\] (\S+) done in ([\d.]+) s, (.*?) \(log", output)
    parts = []
    for stage in ("export", "transform"):
        later = [float(t) for st, piece, t, how in found if st == stage and how.startswith("from ")]
        first = [float(t) for st, piece, t, how in found
                 if st == stage and not how.startswith("from ") and piece.startswith("block")]
        if first:
            parts.append(f"{stage}: {sum(first) / len(first):.1f} s a first layer of a kind ({len(first)}), "
                         + (f"{sum(later) / len(later):.1f} s a later layer ({len(later)})" if later else "no later layer"))
    waits = re.findall(r"^\[memory\] (.+?) waits: needs ([\d.]+) GiB", output, re.M)
    parts.append(f"{len(waits)} tasks waited for memory" + (f" ({', '.join(f'{w} {g} GiB' for w, g in waits[:6])}"
                                                           f"{' ...' if len(waits) > 6 else ''})" if waits else ""))
    return "; ".join(parts)


def checkout(rev: str, where: Path) -> Path:
    """The project at commit `rev`, in a folder of its own (a git worktree, removed afterwards)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def llm_convert(checkpoint: Path, seq: int, mode: str, out: Path, *extra: str) -> tuple[float, float]:
    """(seconds, peak GiB) of tpu-mlir's llm_convert.py."""
    from pipeline.toolchain.install import ensure_toolchain

    toolchain = ensure_toolchain()
    seconds, _, peak = timed([str(toolchain.bin / "llm_convert.py"), "-m", str(checkpoint), "-s", str(seq), "-q",
                              LLM_CONVERT_MODES[mode], "-c", "bm1684x", "-o", str(out), *extra], cwd=out.parent,
                             env=toolchain.env())
    return seconds, peak


def rebuilds(build: Path, variables: list[str], checkpoint: Path, theirs: Path, args) -> list[tuple]:
    """The rows of a rebuild with nothing changed, and of another mode, after the full build."""
    noop, ran, _, _ = ours(build, variables)
    rows = [("nothing changed", f"{noop:.2f} s ({ran} tasks)",
             f"{llm_convert(checkpoint, args.seq, args.mode, theirs / 'out', '--again')[0]:.1f} s (`--again`)")]
    other, ran, _, _ = ours(build, variables, f"mode={args.other_mode}")
    rows.append((f"another mode ({args.mode} -> {args.other_mode})", f"{other:.1f} s ({ran} tasks)",
                 f"{llm_convert(checkpoint, args.seq, args.other_mode, theirs / 'other')[0]:.1f} s"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser, layers=4, seq=256, build_dir=False)
    parser.add_argument("--other-mode", default="int8")
    parser.add_argument("--jobs", nargs="*", default=[], help="also a full build with each of these jobs=")
    parser.add_argument("--baseline", help="also a full build by this project at this git commit")
    parser.add_argument("--full-build-only", action="store_true", help="skip the no-op and the other mode")
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
        full, ran, output, peak = ours(build, variables)
        print(f"ours: full build {full:.1f} s ({ran} tasks, peak {peak:.1f} GiB); {per_piece(output)}", flush=True)
        their_full, their_peak = llm_convert(checkpoint, args.seq, args.mode, theirs / "out")
        rows.append(("full build", f"{full:.1f} s ({ran} tasks, ONNX verification included; peak {peak:.1f} GiB)",
                     f"{their_full:.1f} s (peak {their_peak:.1f} GiB)"))
        pieces = per_piece(output)
        if not args.full_build_only:
            rows += rebuilds(build, variables, checkpoint, theirs, args)
        if args.baseline:
            fresh = Path(tmp) / "baseline"
            code = checkout(args.baseline, Path(tmp) / "baseline-code")
            try:
                timed([str(DOIT), "checkpoint", *variables, f"build_dir={fresh}", f"dist_dir={fresh / 'dist'}"],
                      cwd=ROOT)
                seconds, ran, _, peak = ours(fresh, variables, code=code)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=ROOT, capture_output=True)
            rows.append((f"full build, this project at {args.baseline}", f"{seconds:.1f} s ({ran} tasks; peak "
                         f"{peak:.1f} GiB)", ""))
        for jobs in args.jobs:
            fresh = Path(tmp) / f"jobs{jobs}"  # the same checkpoint, generated again (not timed)
            timed([str(DOIT), "checkpoint", *variables, f"build_dir={fresh}", f"dist_dir={fresh / 'dist'}"], cwd=ROOT)
            seconds, ran, _, peak = ours(fresh, variables, f"jobs={jobs}")
            rows.append((f"full build, `jobs={jobs}`", f"{seconds:.1f} s ({ran} tasks; peak {peak:.1f} GiB)", ""))
    lines = [f"`{args.model}` with {args.layers} layers, seq {args.seq}, {args.mode}; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}; one run, the two side by side on one generated checkpoint.", "",
             "| | this project (`doit build`) | llm_convert.py |", "|---|---|---|"]
    lines += [f"| {what} | {a} | {b} |" for what, a, b in rows]
    lines += ["", f"Ours, per piece in the full build: {pieces}. Peak: the resident memory of each build's "
              "processes together, sampled every 0.5 s (forked processes share pages: an upper bound)."]
    name = "vs_llm_convert" + ("" if args.model == "bench-qwen2-medium" else f"_{args.model}") + \
        ("" if args.layers == 4 and args.model == "bench-qwen2-medium" else f"_{args.layers}l")
    publish("\n".join(lines) + "\n", name + ".md")


if __name__ == "__main__":
    main()
