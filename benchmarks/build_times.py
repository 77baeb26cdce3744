"""Build times of the whole chain: full build, no-op rebuild, mode switch, parallel build, and the
cost of a transform in the long-lived toolchain process against a fresh model_transform.py.

    .venv/bin/python benchmarks/build_times.py [--model bench-qwen2-medium --layers 4]
Prints a Markdown table and writes it to benchmarks/results/build_times.md.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402
DOIT = Path(sys.executable).parent / "doit"


def doit(build_dir: Path, *args: str) -> tuple[float, int, str]:
    """(seconds, tasks run, stderr) of one doit command."""
    start = time.perf_counter()
    out = subprocess.run([str(DOIT), *args, f"build_dir={build_dir}", f"dist_dir={build_dir / 'dist'}"],
                         cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, len(re.findall(r"^\.  ", out.stdout, re.M)), out.stderr


def stage_seconds(stderr: str, stage: str) -> list[float]:
    return [float(s) for s in re.findall(rf"\[{stage} \d+/\d+\] \S+ done in ([\d.]+) s", stderr)]


def fresh_transform_seconds(build_dir: Path, model_dir: str) -> float:
    """model_transform.py as its own process (what the worker saves), on the first block."""
    from pipeline.toolchain.install import ensure_toolchain

    toolchain = ensure_toolchain()
    onnx = build_dir / model_dir / "onnx" / "block_0.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([str(toolchain.bin / "model_transform.py"), "--model_name", "block_0", "--model_def",
                        str(onnx), "--mlir", "block_0.mlir"], cwd=tmp, env=toolchain.env(), check=True,
                       capture_output=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-qwen2-medium")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    model = [f"model={args.model}", f"layers={args.layers}"]
    name = f"{args.model}-{args.layers}l"
    rows = []
    with tempfile.TemporaryDirectory(prefix="build-bench-") as tmp:
        serial, parallel = Path(tmp) / "serial", Path(tmp) / "parallel"
        doit(serial, "checkpoint", *model)  # generating the random checkpoint is not part of a build
        doit(parallel, "checkpoint", *model)
        seconds, ran, err = doit(serial, "build", *model, "jobs=1")
        transforms, deploys = stage_seconds(err, "transform"), stage_seconds(err, "deploy")
        rows.append(("full build, serial (`doit build jobs=1`)", seconds, ran))
        rows.append(("no-op rebuild", *doit(serial, "build", *model, "jobs=1")[:2]))
        rows.append(("mode switch int8 -> int4 (deploy + combine only)",
                     *doit(serial, "build", *model, "mode=int4", "jobs=1")[:2]))
        rows.append(("device switch 1 -> 2", *doit(serial, "build", *model, "devices=2", "jobs=1")[:2]))
        rows.append((f"full build, the default (`doit build`: {os.cpu_count()} processes within the memory)",
                     *doit(parallel, "build", *model)[:2]))
        fresh = fresh_transform_seconds(serial, f"{name}/seq256")
    lines = [f"`{args.model}` with {args.layers} layers (seq 256), int8 unless said; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}. The checkpoint is generated beforehand.", "",
             "| what | wall time (s) | tasks run |", "|---|---|---|"]
    lines += [f"| {what} | {s:.1f} | {n} |" for what, s, n in rows]
    lines += ["", f"Transform in the long-lived toolchain process: first piece {transforms[0]:.1f} s (starts the "
              f"process: imports torch and tpu_mlir), then {sum(transforms[1:]) / max(1, len(transforms) - 1):.2f} s "
              f"a piece on average; model_transform.py as its own process: {fresh:.1f} s for block_0. "
              f"Deploy: {sum(deploys) / max(1, len(deploys)):.2f} s a piece on average."]
    publish("\n".join(lines) + "\n", "build_times.md")


if __name__ == "__main__":
    main()
