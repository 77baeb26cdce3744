"""Full-width Qwen shapes: qwen-7b's and qwen-14b's true dimensions with a few layers, built to an
int4 bmodel and verified on the simulator, one stage at a time. Records each stage's wall time
and the peak resident memory of its processes (the toolchain worker included), the time of each
piece, and from them the estimated full build time of the real models on this machine.

    .venv/bin/python benchmarks/full_width.py [--models shape-qwen-7b shape-qwen-14b] [--layers 2]
        [--mode int4] [--seq 64] [--build-dir DIR] [--keep]
Prints a Markdown table and writes it to benchmarks/results/full_width.md.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

STAGES = ["patch", "export", "build", "verify"]  # build = ONNX verify + transform + deploy + combine
DOIT = Path(sys.executable).parent / "doit"


def run_stage(stage: str, variables: list[str], log: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of the largest process it waited for, stderr) of one doit run."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(p.stdout + p.stderr)\n"
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, str(DOIT), stage, *variables], cwd=ROOT,
                         capture_output=True, text=True)
    log.write_text(out.stderr, encoding="utf-8")
    seconds, maxrss_kib, code = out.stdout.split()[-3:]
    if int(code):
        raise SystemExit(f"doit {stage} failed; its output is in {log}:\n{out.stderr[-3000:]}")
    return float(seconds), int(maxrss_kib) / 1024, out.stderr


def piece_seconds(stderr: str, stage: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(rf"\[{stage} \d+/\d+\] (\S+) done in ([\d.]+) s", stderr)}


def estimate(per_piece: dict[str, float], layers: int, full_layers: int) -> float:
    """Seconds for the full depth: the embedding and head pieces once, the mean layer's pieces
    (block_i + block_cache_i) for every layer."""
    fixed = sum(v for k, v in per_piece.items() if not k.startswith("block"))
    per_layer = sum(v for k, v in per_piece.items() if k.startswith("block")) / layers
    return fixed + per_layer * full_layers


def measure(model: str, args, build_dir: Path) -> dict:
    from pipeline.model_config import load_model_config

    config = load_model_config(model)
    variables = [f"model={model}", f"layers={args.layers}", f"mode={args.mode}", f"seq={args.seq}",
                 f"build_dir={build_dir}", f"dist_dir={build_dir / 'dist'}"]
    logs = build_dir / "benchmark-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"model": model, "shape_of": config.shape_of, "full_layers": config.architecture.num_layers,
              "stages": {}, "pieces": {}}
    for stage in STAGES:
        print(f"[{model}] doit {stage} ...", file=sys.stderr, flush=True)
        seconds, peak, stderr = run_stage(stage, variables, logs / f"{model}-{stage}.log")
        result["stages"][stage] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
        for kind in ("export", "transform", "deploy"):
            result["pieces"].setdefault(kind, {}).update(piece_seconds(stderr, kind))
        print(f"[{model}] doit {stage}: {seconds:.1f} s, peak RSS {peak:.0f} MiB", file=sys.stderr, flush=True)
    name = config.with_layers(args.layers).name
    seq_dir = build_dir / name / f"seq{args.seq}"
    sim = json.loads(next((seq_dir / "verify").glob(f"{args.mode}_*/report.json")).read_text())
    result["simulator"] = {"min_cosine": min(o["cosine"] for outs in sim["pieces"].values() for o in outs.values()),
                           "decode": sim["decode"]}
    result["onnx_bytes"] = {p.name: p.stat().st_size for p in (seq_dir / "onnx").iterdir() if p.is_file()}
    result["estimated_full_seconds"] = {
        kind: round(estimate(result["pieces"][kind], args.layers, result["full_layers"]))
        for kind in ("export", "transform", "deploy")}
    return result


def table(results: list[dict], args) -> str:
    head = (f"{args.layers} layers of each model at its full width, mode {args.mode}, seq {args.seq}; "
            f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Peak RSS: the largest "
            "process of the stage (doit, or the toolchain worker that compiles).")
    lines = [head, "", "| model | stage | wall time (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    for r in results:
        lines += [f"| {r['model']} | {stage} | {s['seconds']} | {s['peak_rss_mib']} |" for stage, s in r["stages"].items()]
    lines += ["", "Time of each piece (s):", "", "| model | piece | export | transform | deploy |", "|---|---|---|---|---|"]
    for r in results:
        for piece in r["pieces"]["export"]:
            lines.append(f"| {r['model']} | {piece} | " + " | ".join(
                f"{r['pieces'][k].get(piece, float('nan')):.1f}" for k in ("export", "transform", "deploy")) + " |")
    lines += ["", "Estimated full build (every layer) on this machine, from the pieces above:", "",
              "| real model | layers | export (min) | transform (min) | deploy (min) | total (h) |", "|---|---|---|---|---|---|"]
    for r in results:
        e = r["estimated_full_seconds"]
        lines.append(f"| {r['shape_of']} | {r['full_layers']} | {e['export'] / 60:.0f} | {e['transform'] / 60:.0f} | "
                     f"{e['deploy'] / 60:.0f} | {sum(e.values()) / 3600:.1f} |")
    lines += ["", "Simulator verification of the int4 build:", ""]
    for r in results:
        d = r["simulator"]["decode"]
        decode = (f"greedy choice as the ONNX pipeline at {d['agree']}/{len(d['onnx'])} steps" if d.get("run")
                  else f"decode not run: {d.get('reason')}")
        biggest = max(r["onnx_bytes"].items(), key=lambda kv: kv[1])
        lines.append(f"- {r['model']}: lowest cosine of any piece output {r['simulator']['min_cosine']:.5f}; {decode}; "
                     f"largest ONNX file {biggest[0]} {biggest[1] / 2**30:.2f} GiB")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shape-qwen-7b", "shape-qwen-14b"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", default="int4")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the build folder (tens of GB)")
    args = parser.parse_args()
    build_dir = (args.build_dir or Path(tempfile.mkdtemp(prefix="full-width-"))).resolve()
    results = []
    try:
        for model in args.models:
            results.append(measure(model, args, build_dir))
            (build_dir / "benchmark-results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    finally:
        if not args.keep and args.build_dir is None:
            shutil.rmtree(build_dir, ignore_errors=True)
    publish(table(results, args), "full_width.md")


if __name__ == "__main__":
    main()
