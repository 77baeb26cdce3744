"""Export wall time and peak memory against the number of layers.

Builds `bench-qwen2-medium` at several depths (layers=), then runs only the export stage in a
fresh process and reads that process's peak resident memory. If pieces are streamed, the peak
follows the largest piece and stays flat while the model grows.

    .venv/bin/python benchmarks/export_memory.py [--layers 4 12 24] [--build-dir DIR]
Prints a Markdown table and writes it to benchmarks/results/export_memory.md.
"""
import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

MODEL = "bench-qwen2-medium"


def doit(*args: str, build_dir: Path) -> tuple[float, float]:
    """Run doit in a child of a fresh wrapper: (seconds, peak RSS of that child in MiB)."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); code = subprocess.run(sys.argv[1:]).returncode\n"
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
    cmd = [sys.executable, "-c", wrapper, str(Path(sys.executable).parent / "doit"), *args, f"build_dir={build_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    seconds, maxrss_kib, code = float(out[-3]), int(out[-2]), int(out[-1])
    if code:
        raise SystemExit(f"doit {' '.join(args)} failed (exit {code})")
    return seconds, maxrss_kib / 1024


def sizes(build_dir: Path, name: str) -> tuple[float, float]:
    """(model, largest piece) in MiB of fp32 weights, from the checkpoint's headers."""
    from pipeline.model.checkpoint import Checkpoint

    ckpt = Checkpoint(Path(json.loads((build_dir / name / "source.json").read_text())["folder"]))
    per_tensor = {n: 4 * math.prod(info["shape"]) for n, (_, info) in ckpt.tensor_index.items()}
    layer = sum(v for n, v in per_tensor.items() if n.startswith("model.layers.0."))
    biggest = max(per_tensor.get("model.embed_tokens.weight", 0), per_tensor.get("lm_head.weight", 0), layer)
    return sum(per_tensor.values()) / 2**20, biggest / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 24])
    parser.add_argument("--build-dir", type=Path, default=None)
    args = parser.parse_args()
    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="export-bench-"))
    rows = []
    for layers in args.layers:
        name = f"{MODEL}-{layers}l"
        doit("map", f"model={MODEL}", f"layers={layers}", build_dir=build_dir)  # generate + fingerprint
        seconds, peak = doit("export", f"model={MODEL}", f"layers={layers}", build_dir=build_dir)
        model_mib, piece_mib = sizes(build_dir, name)
        pieces = 2 * layers + 3
        rows.append((layers, pieces, model_mib, piece_mib, seconds, seconds / pieces, peak))
        print(f"layers {layers}: {pieces} pieces, {seconds:.1f} s, peak {peak:.0f} MiB", file=sys.stderr)
    lines = [f"Export of `{MODEL}` (hidden 1024, MLP 4096, vocab 32768, seq 256) at several depths; "
             f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| layers | pieces | model fp32 (MiB) | largest piece fp32 (MiB) | export wall time (s) | per piece (s) "
             "| peak RSS of the export process (MiB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {l} | {p} | {m:.0f} | {b:.0f} | {s:.1f} | {s / p:.2f} | {r:.0f} |" for l, p, m, b, s, _, r in rows]
    publish("\n".join(lines) + "\n", "export_memory.md")


if __name__ == "__main__":
    main()
