"""The same full build on a local Dask cluster of 1 and of 2 worker processes (`cluster=`), and
without a cluster, one after the other on one generated checkpoint: what the workers give on this
machine, and each worker's peak memory against its MEMORY resource.

    .venv/bin/python benchmarks/cluster_scaling.py [--model bench-qwen2-medium] [--layers 4] [--seq 256]
        [--mode int4] [--workers 1 2] [--worker-memory-gib 8]
Prints a Markdown table and writes it to benchmarks/results/cluster_scaling.md.
"""
import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import model_options, publish  # noqa: E402
from benchmarks.vs_llm_convert import DOIT, ROOT, timed, tree_rss  # noqa: E402


def peak_per_worker(cluster, stop: threading.Event, peaks: dict) -> None:
    """Each worker process's peak resident memory (its toolchain process included), every 0.5 s."""
    while not stop.is_set():
        for name, worker in cluster.workers.items():
            pid = getattr(worker, "pid", None)  # a nanny's worker process
            if pid:
                peaks[name] = max(peaks.get(name, 0), tree_rss(pid))
        stop.wait(0.5)


def on_cluster(workers: int, worker_memory: int, build: Path, variables: list[str]) -> tuple[float, dict, int]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      resources={"MEMORY": worker_memory}, dashboard_address=None) as cluster:
        stop, peaks = threading.Event(), {}
        watcher = threading.Thread(target=peak_per_worker, args=(cluster, stop, peaks), daemon=True)
        watcher.start()
        try:
            seconds, output, _ = timed([str(DOIT), "build", *variables, f"cluster={cluster.scheduler_address}",
                                        f"build_dir={build}", f"dist_dir={build / 'dist'}"], cwd=ROOT)
        finally:
            stop.set()
            watcher.join()
    return seconds, peaks, len(re.findall(r"\[cluster\] \S+ \S+: done on", output))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser, layers=4, seq=256, build_dir=False)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker-memory-gib", type=float, default=8.0)
    args = parser.parse_args()
    variables = [f"model={args.model}", f"layers={args.layers}", f"seq={args.seq}", f"mode={args.mode}"]
    memory = int(args.worker_memory_gib * 2**30)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cluster-scaling-") as tmp:
        def fresh(name: str) -> Path:  # the same checkpoint, generated in each build folder (not timed)
            build = Path(tmp) / name
            timed([str(DOIT), "checkpoint", *variables, f"build_dir={build}", f"dist_dir={build / 'dist'}"], cwd=ROOT)
            return build

        for workers in args.workers:
            seconds, peaks, done = on_cluster(workers, memory, fresh(f"workers{workers}"), variables)
            rows.append((f"cluster of {workers} worker process{'es' if workers > 1 else ''}", f"{seconds:.1f}",
                         f"{done}", ", ".join(f"{p / 2**30:.1f}" for p in sorted(peaks.values(), reverse=True))))
        build = fresh("local")
        seconds, _, peak = timed([str(DOIT), "build", *variables, f"build_dir={build}", f"dist_dir={build / 'dist'}"],
                                 cwd=ROOT)
        rows.append(("no cluster (`doit build`: processes within the memory)", f"{seconds:.1f}", "", f"{peak:.1f} (all)"))
    lines = [f"`{args.model}` with {args.layers} layers, seq {args.seq}, {args.mode}; each worker 1 thread and "
             f"MEMORY {args.worker_memory_gib:g} GiB; {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; one run.",
             "", "| build | wall time (s) | actions run on the workers | peak resident memory per worker (GiB) |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    publish("\n".join(lines) + "\n", "cluster_scaling.md")


if __name__ == "__main__":
    main()
