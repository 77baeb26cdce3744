"""Full-width Qwen shapes: qwen-7b's and qwen-14b's true dimensions with a few layers, built to an
int4 bmodel and verified on the simulator, one stage at a time. Records each stage's wall time
and the peak resident memory of its processes (the toolchain worker included), the time of each
piece, and from them the estimated full build time of the real models on this machine.

    .venv/bin/python benchmarks/full_width.py [--models shape-qwen-7b shape-qwen-14b] [--layers 2]
        [--mode int4] [--seq 32] [--sim-tokens 2] [--stages patch export build verify] [--build-dir DIR] [--keep]
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
from benchmarks.common import RESULTS_DIR, ROOT, publish  # noqa: E402

STAGES = ["map", "export", "build", "verify"]  # build = ONNX verify + transform + deploy + combine
DOIT = Path(sys.executable).parent / "doit"


# doit prints ".  <task id>" as each task starts; a piece's task id ends with the piece's name
TASK_START = re.compile(r"^\.  (\S+)$")
PIECE_TASK = re.compile(r"^(export|transform|deploy):\S*/(\S+)$")


def run_stage(stage: str, variables: list[str], log: Path) -> tuple[float, float, dict, str, int]:
    """(seconds, peak RSS in MiB of the whole process tree, peak RSS per piece, output, exit code) of
    one doit run. The tree (doit, and the toolchain worker it starts, with the compiler processes
    that one starts) is sampled every 0.2 s; each sample counts for the task doit started last
    (".  transform:<model>/seq32/block_0"), so a piece's figure is the tree's peak while it ran, and
    other tasks (the ONNX verification, combine) count for no piece."""
    import psutil

    start, peak, pieces, current, pending = time.perf_counter(), 0, {}, None, ""
    with open(log, "w", encoding="utf-8") as out, open(log, encoding="utf-8") as follow:
        # --continue: a piece that fails (e.g. killed for memory) does not hide the others' figures
        proc = subprocess.Popen([str(DOIT), "--continue", stage, *variables], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            text = pending + follow.read()  # a line doit is still writing waits for its end
            *lines, pending = text.split("\n")
            for line in lines:
                if started := TASK_START.match(line):
                    piece = PIECE_TASK.match(started[1])
                    current = f"{piece[1]}:{piece[2]}" if piece else None
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
            except psutil.Error:
                rss = 0
            peak = max(peak, rss)
            if current:
                pieces[current] = max(pieces.get(current, 0), rss)
            time.sleep(0.2)
    mib = {k: round(v / 2**20) for k, v in pieces.items()}
    return time.perf_counter() - start, peak / 2**20, mib, log.read_text(encoding="utf-8"), proc.returncode


def failures(text: str) -> dict[str, str]:
    """task id -> the first line of its error, for every task doit reports as failed."""
    found = {}
    for m in re.finditer(r"TaskFailed - taskid:(\S+)\n(.*)", text):
        found[m[1]] = "killed for memory (SIGKILL)" if "SIGKILL" in m[2] or "exit -9" in m[2] else m[2][:200]
    return found


def piece_seconds(stderr: str, stage: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(rf"\[{stage} \d+/\d+\] (\S+) done in ([\d.]+) s", stderr)}


def layers_estimate(per_piece: dict[str, float], layers: int, full_layers: int) -> float:
    """Seconds of the blocks at full depth: the mean layer's pieces (block_i + block_cache_i) for every layer."""
    return sum(v for k, v in per_piece.items() if k.startswith("block")) / layers * full_layers


def estimate(per_piece: dict[str, float], layers: int, full_layers: int) -> float:
    """Seconds for the full depth: the embedding and head pieces once, and the blocks."""
    fixed = sum(v for k, v in per_piece.items() if not k.startswith("block"))
    return fixed + layers_estimate(per_piece, layers, full_layers)


def measure(model: str, args, build_dir: Path) -> dict:
    from pipeline.model.config import load_model_config

    config = load_model_config(model)
    variables = [f"model={model}", f"layers={args.layers}", f"mode={args.mode}", f"seq={args.seq}",
                 f"sim_tokens={args.sim_tokens}",
                 f"build_dir={build_dir}", f"dist_dir={build_dir / 'dist'}"]
    logs = build_dir / "benchmark-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"model": model, "shape_of": config.shape_of, "full_layers": config.architecture.num_layers,
              "stages": {}, "pieces": {}, "piece_peak_rss_mib": {}, "failed": {}}
    for stage in args.stages:
        if result["failed"]:
            break  # the simulator check needs every piece
        print(f"[{model}] doit {stage} ...", file=sys.stderr, flush=True)
        seconds, peak, piece_peaks, text, code = run_stage(stage, variables, logs / f"{model}-{stage}.log")
        # other work on the machine slows every figure: the 5-minute load average says how much
        result["stages"][stage] = {"seconds": round(seconds, 1), "peak_rss_mib": round(peak),
                                   "load_5min": round(os.getloadavg()[1], 1)}
        result["piece_peak_rss_mib"].update(piece_peaks)
        for kind in ("export", "transform", "deploy"):
            result["pieces"].setdefault(kind, {}).update(piece_seconds(text, kind))
        result["failed"].update(failures(text))
        if code and not result["failed"]:
            raise SystemExit(f"doit {stage} failed; its output is in {logs / f'{model}-{stage}.log'}:\n{text[-3000:]}")
        print(f"[{model}] doit {stage}: {seconds:.1f} s, peak RSS {peak:.0f} MiB"
              + (f"; failed: {result['failed']}" if result["failed"] else ""), file=sys.stderr, flush=True)
    name = config.with_layers(args.layers).name
    seq_dir = build_dir / name / f"seq{args.seq}"
    result["simulator"] = None
    if not result["failed"] and "verify" in args.stages:
        sim = json.loads(next((seq_dir / "verify").glob(f"{args.mode}_*/report.json")).read_text())
        result["simulator"] = {"decode": sim["decode"], "min_cosine": min(
            o["cosine"] or 0.0 for outs in sim["pieces"].values() for o in outs.values())}  # None: NaN or inf
    result["onnx_bytes"] = {p.name: p.stat().st_size for p in (seq_dir / "onnx").iterdir() if p.is_file()}
    result["estimated_full_seconds"] = {  # None where a piece did not get through that stage
        kind: round(estimate(result["pieces"][kind], args.layers, result["full_layers"]))
        if len(result["pieces"][kind]) == 2 * args.layers + 3 else None for kind in ("export", "transform", "deploy")}
    result["estimated_layers_seconds"] = {
        kind: round(layers_estimate(result["pieces"][kind], args.layers, result["full_layers"]))
        for kind in ("export", "transform", "deploy")}
    return result


def psutil_total_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def table(results: list[dict], args) -> str:
    built = ", ".join(f"{r['model']} {r['settings']['layers']}" for r in results)
    head = (f"Each model at its full width with a few layers ({built}), mode {args.mode}, seq {args.seq}; "
            f"{platform.machine()}, {os.cpu_count()} cores, {round(psutil_total_gib())} GiB, "
            f"{time.strftime('%Y-%m-%d')}. Peak RSS: all the processes of the stage together (doit, and the "
            "toolchain worker that compiles and simulates, with its compiler subprocesses).")
    lines = [head, "", f"| model | stage | wall time (s) | peak RSS (MiB) | load average at its end ({os.cpu_count()} cores) |",
             "|---|---|---|---|---|"]
    for r in results:
        lines += [f"| {r['model']} | {stage} | {s['seconds']} | {s['peak_rss_mib']} | {s.get('load_5min', '?')} |"
                  for stage, s in r["stages"].items()]
    kinds = ("export", "transform", "deploy")
    lines += ["", "Each piece: time (s) / peak RSS of the process tree while it ran (GiB):", "",
              "| model | piece | export | transform | deploy |", "|---|---|---|---|---|"]
    for r in results:
        for piece in r["pieces"]["export"]:
            cells = []
            for k in kinds:
                peak = r["piece_peak_rss_mib"].get(f"{k}:{piece}")
                cells.append((f"{r['pieces'][k][piece]:.1f}" if piece in r["pieces"][k] else "failed")
                             + (f" / {peak / 1024:.1f}" if peak is not None else ""))
            lines.append(f"| {r['model']} | {piece} | " + " | ".join(cells) + " |")
    lines += ["", "Estimated build of the full model on this machine (serial, one process), from the pieces "
              "above: the embedding, embedding_cache and lm_head once, the mean layer's block_i and "
              "block_cache_i for every layer:", "",
              "| real model | layers | export (min) | transform (min) | deploy (min) | total (h) |", "|---|---|---|---|---|---|"]
    for r in results:
        e = r["estimated_full_seconds"]
        if None in e.values():
            e, note = r["estimated_layers_seconds"], " (blocks only: a piece failed)"
        else:
            note = ""
        lines.append(f"| {r['shape_of']}{note} | {r['full_layers']} | {e['export'] / 60:.0f} | {e['transform'] / 60:.0f} | "
                     f"{e['deploy'] / 60:.0f} | {sum(e.values()) / 3600:.1f} |")
    lines += ["", "Failed pieces and the simulator verification:", ""]
    for r in results:
        biggest = max(r["onnx_bytes"].items(), key=lambda kv: kv[1])
        if r["failed"]:
            lines.append(f"- {r['model']}: " + "; ".join(f"`{t}`: {why}" for t, why in r["failed"].items())
                         + f"; not verified on the simulator. Largest ONNX file {biggest[0]} {biggest[1] / 2**30:.2f} GiB")
            continue
        if r["simulator"] is None:
            lines.append(f"- {r['model']}: not run on the simulator (stages {', '.join(r['stages'])}); "
                         f"largest ONNX file {biggest[0]} {biggest[1] / 2**30:.2f} GiB")
            continue
        d = r["simulator"]["decode"]
        decode = (f"whole-bmodel decode (prefill + {len(d['onnx']) - 1} step(s)): the ONNX pipeline's greedy "
                  f"choice at {d['agree']}/{len(d['onnx'])} steps" if d.get("run") else f"decode not run: {d.get('reason')}")
        lines.append(f"- {r['model']}: lowest cosine of any piece output {r['simulator']['min_cosine']:.5f}; {decode}; "
                     f"largest ONNX file {biggest[0]} {biggest[1] / 2**30:.2f} GiB")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shape-qwen-7b", "shape-qwen-14b"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mode", default="int4")
    # the simulator is the slow part: a Qwen-7B-wide block_i took 408 s there at seq 64; prefill
    # cost grows with seq, and each decode step runs every block_cache_i and the lm_head
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--sim-tokens", type=int, default=2, help="greedy steps of the whole-bmodel decode on the simulator")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES,
                        help="the doit stages to run, in order (leave out verify to skip the simulator)")
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each model's build (tens of GB)")
    args = parser.parse_args()
    build_dir = (args.build_dir or Path(tempfile.mkdtemp(prefix="full-width-"))).resolve()
    recorded = RESULTS_DIR / "full_width.json"  # one entry per model: a run may measure one model at a time
    results = {r["model"]: r for r in (json.loads(recorded.read_text()) if recorded.is_file() else [])}
    for model in args.models:
        try:
            results[model] = {**measure(model, args, build_dir), "settings": vars(args) | {"build_dir": None}}
        finally:
            if not args.keep:  # free the disk before the next model
                shutil.rmtree(build_dir / f"{model}-{args.layers}l", ignore_errors=True)
                shutil.rmtree(build_dir / "dist", ignore_errors=True)
        recorded.write_text(json.dumps(list(results.values()), indent=2) + "\n", encoding="utf-8")
    publish(table(list(results.values()), args), "full_width.md")


if __name__ == "__main__":
    main()
