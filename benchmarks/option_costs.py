"""What each build option costs: the build time it adds and the bmodel's size, for `dynamic`,
`history` and `chunk` (decode stages), each built on top of the static build in one build folder,
as a user switching an option on would rebuild it.

    .venv/bin/python benchmarks/option_costs.py [--model bench-qwen2-medium] [--layers 2] [--seq 512]
        [--mode int4] [--chunk 128] [--build-dir DIR] [--out option_costs.md]
Each row is one `doit combine` after the previous rows' builds: its wall time, the seconds its
export, transform and deploy tasks report (only the pieces the option adds or changes run), and the
combined bmodel's size. Prints a Markdown table and writes it to benchmarks/results/<out>.
"""
import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_bmodel, model_options, publish  # noqa: E402

STAGES = ("export", "transform", "deploy")


def options(chunk: int) -> list[tuple[str, dict]]:
    """The builds, in order: each a row of the table."""
    return [("static (`dynamic=0`), from nothing", {"dynamic": "0"}),
            ("`dynamic=1` (the default)", {"dynamic": "1"}),
            (f"`dynamic=1 chunk={chunk}` (decode stages)", {"dynamic": "1", "chunk": str(chunk)}),
            (f"`dynamic=1 history=1 chunk={chunk}` (and history prefill)",
             {"dynamic": "1", "history": "1", "chunk": str(chunk)})]


def build(args, extra: dict) -> dict:
    """One `doit combine`: its wall time, the seconds per stage its tasks report, the pieces run."""
    start = time.perf_counter()
    bmodel, output = build_bmodel({"model": args.model, "layers": str(args.layers), "seq": str(args.seq),
                                   "mode": args.mode, "build_dir": str(args.build_dir),
                                   "dist_dir": str(args.build_dir / "dist"), **extra})
    wall = time.perf_counter() - start
    done = {stage: re.findall(rf"\[{stage} \d+/\d+\] (\S+) done in ([\d.]+) s", output) for stage in STAGES}
    return {"wall": wall, "bmodel": bmodel, "seconds": {s: sum(float(t) for _, t in done[s]) for s in STAGES},
            "pieces": {s: len(done[s]) for s in STAGES}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", default="option_costs.md", help="the results file in benchmarks/results/")
    args = parser.parse_args()
    args.build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="option-costs-bench-"))
    from runtime.traffic import size

    lines = [f"{args.model}, {args.layers} layers, mode {args.mode}, seq {args.seq}; each row built after the "
             f"rows above it in one build folder; {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.", "",
             "| build | wall time (s) | pieces run: export, transform, deploy | their seconds | bmodel |",
             "|---|---|---|---|---|"]
    for label, extra in options(args.chunk):
        run = build(args, extra)
        print(label, run, file=sys.stderr)
        pieces = ", ".join(str(run["pieces"][s]) for s in STAGES)
        seconds = " + ".join(f"{run['seconds'][s]:.1f}" for s in STAGES)
        lines.append(f"| {label} | {run['wall']:.1f} | {pieces} | {seconds} | "
                     f"{size(run['bmodel'].stat().st_size)} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
