"""Parallel within the memory, at full width: a default `doit build` (jobs = the cores, memory = what
is available) of a model whose pieces do not all fit in memory at once, e.g. Qwen-14B's shapes with
a few layers. Samples every 0.2 s the memory of the whole build and, per running task, that of the
process doing it (a doit process with its toolchain worker and the compiler it starts, anonymous
memory), read from the build's memory ledger; reports each task's measured peak against the peak it reserved, the
waits for memory, and the build's peak against its budget.

    .venv/bin/python benchmarks/memory_bound.py [--model shape-qwen-14b] [--layers 2] [--seq 32]
        [--mode int4] [--build-dir DIR] [--keep]
Prints a Markdown table and writes it to benchmarks/results/memory_bound_<model>.md.
"""
import argparse
import json
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
GIB = 2**30


def tree_anon(process) -> int:
    """The anonymous resident memory of a process and its descendants (/proc/<pid>/status RssAnon):
    what the out-of-memory killer weighs. Pages of files mapped in (a safetensors checkpoint read
    through mmap) count in RSS too, but the kernel can drop those whenever it needs the memory."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/status") as status:
                total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
        except (OSError, StopIteration, psutil.Error):
            pass
    return total


def sample_build(argv: list[str], ledger: Path, log: Path) -> dict:
    """Run the build; its wall time, exit code, peak of the whole tree, and per task (as the ledger
    names it) the reserved bytes and the peak of the process tree that ran it."""
    import psutil

    tasks, peak, start = {}, 0, time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_anon(root))
            try:
                entries = json.loads(ledger.read_text()) if ledger.exists() else []
            except (json.JSONDecodeError, OSError):  # replaced while read: the next sample reads it
                entries = []
            for entry in (e for e in entries if e["running"]):
                try:
                    rss = tree_anon(psutil.Process(entry["pid"]))
                except psutil.Error:
                    continue
                seen = tasks.setdefault(entry["task"], {"reserved": entry["bytes"], "peak": 0})
                seen["peak"] = max(seen["peak"], rss)
            time.sleep(0.2)
    return {"seconds": time.perf_counter() - start, "code": proc.returncode, "peak": peak, "tasks": tasks,
            "output": log.read_text(encoding="utf-8")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser, layers=2, seq=32)
    parser.add_argument("--keep", action="store_true", help="keep the build (tens of GB)")
    parser.set_defaults(model="shape-qwen-14b")
    args = parser.parse_args()
    from pipeline.graph.memory_budget import default_budget

    build = (args.build_dir or Path(tempfile.mkdtemp(prefix="memory-bound-"))).resolve()
    variables = [f"model={args.model}", f"layers={args.layers}", f"seq={args.seq}", f"mode={args.mode}",
                 f"build_dir={build}", f"dist_dir={build / 'dist'}"]
    try:
        subprocess.run([str(DOIT), "checkpoint", *variables], cwd=ROOT, check=True, capture_output=True)
        budget = default_budget()  # what the build will find (it reads the same figure as it starts)
        run = sample_build([str(DOIT), "build", *variables], build / ".locks" / "memory.json",
                           build / "memory-bound.log")
    finally:
        if not args.keep:
            shutil.rmtree(build, ignore_errors=True)
    text = run["output"]
    waits = re.findall(r"^\[memory\] (.+?) waits: needs ([\d.]+) GiB", text, re.M)
    failed = re.findall(r"TaskFailed - taskid:(\S+)", text)
    over = [t for t, s in run["tasks"].items() if s["peak"] > s["reserved"]]
    lines = [f"`{args.model}` with {args.layers} layers, seq {args.seq}, {args.mode}: a default `doit build` "
             f"(jobs = {os.cpu_count()} cores, memory = what was available); {round(_total() / GIB)} GiB machine, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| | |", "|---|---|",
             f"| build | {run['seconds']:.0f} s, exit {run['code']}{', failed: ' + ', '.join(failed) if failed else ''} |",
             f"| memory budget (available at the start, less 0.5 GiB) | {budget / GIB:.1f} GiB |",
             f"| peak of the whole build (anonymous memory of all its processes, sampled every 0.2 s) | "
             f"{run['peak'] / GIB:.1f} GiB |",
             f"| tasks that waited for memory | {len(waits)}"
             + (f": {', '.join(f'{t} ({g} GiB)' for t, g in waits)}" if waits else "") + " |",
             f"| tasks above their reservation | {len(over)} of {len(run['tasks'])}"
             + (f": {', '.join(over)}" if over else "") + " |", "",
             "Each heavy task: the peak it reserved, and the measured peak of the process tree that ran it "
             "(its doit process, with the toolchain worker and compiler that process started; anonymous "
             "memory, which is what the reservations stand for: a checkpoint's pages mapped from the "
             "page cache are left out, since the kernel drops them under pressure):", "",
             "| task | reserved (GiB) | measured peak (GiB) |", "|---|---|---|"]
    for task, seen in sorted(run["tasks"].items(), key=lambda kv: -kv[1]["peak"]):
        lines.append(f"| {task} | {seen['reserved'] / GIB:.1f} | {seen['peak'] / GIB:.1f} |")
    publish("\n".join(lines) + "\n", f"memory_bound_{args.model}.md")
    if run["code"]:
        raise SystemExit(f"the build failed; its last lines:\n{text[-3000:]}")


def _total() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    main()
