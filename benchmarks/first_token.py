"""First-token time, static prefill (the whole window) against dynamic (`dynamic=1`: the prompt's
length), on the BM1684X simulator, whose time follows the work done; and what the option costs in
build time and bmodel size. Both bmodels share the export and the transform.

    .venv/bin/python benchmarks/first_token.py [--model bench-qwen2-medium] [--layers 2] [--seq 512]
        [--mode int4] [--prompts 16 64 256] [--build-dir DIR]
Prompts of the given lengths and of SEQ-1 tokens. Prints a Markdown table and writes it to
benchmarks/results/first_token.md.
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


def build(args, dynamic: bool) -> tuple[Path, float]:
    """The combined bmodel, and the seconds its block_i deploys took (what `dynamic` changes)."""
    bmodel, output = build_bmodel({"model": args.model, "layers": str(args.layers), "seq": str(args.seq),
                                   "mode": args.mode, "dynamic": str(int(dynamic)), "build_dir": str(args.build_dir),
                                   "dist_dir": str(args.build_dir / "dist")})
    deploys = [float(m[1]) for m in re.finditer(r"\[deploy \d+/\d+\] block_\d+ done in ([\d.]+) s", output)]
    return bmodel, sum(deploys)


def first_tokens(bmodel: Path, prompts: list[int]) -> list[dict]:
    """Per prompt length: seconds from the prompt to the first token (greedy, chosen on the device),
    and the bytes the prefill sent."""
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import Engine
    from runtime.sampling import Sampler, SamplingParams

    rows = []
    with IsolatedBmodelBackend(bmodel) as backend:
        engine, sampler = Engine(backend), Sampler(SamplingParams())
        engine.greedy([10, 11], 1)  # loads every net once
        for n in prompts:
            ids = [10 + k % 200 for k in range(n)]
            start = time.perf_counter()
            engine.prefill(ids)
            engine.next_token(sampler, ids)
            rows.append({"prompt": n, "seconds": time.perf_counter() - start, "h2d": engine.prefill_traffic.h2d})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser)
    parser.add_argument("--prompts", nargs="+", type=int, default=[16, 64, 256])
    args = parser.parse_args()
    args.build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="first-token-bench-"))
    prompts = sorted({*args.prompts, args.seq - 1})
    from runtime.traffic import size

    results = {}
    for dynamic in (False, True):
        bmodel, deploy_seconds = build(args, dynamic)
        results[dynamic] = {"rows": first_tokens(bmodel, prompts), "deploy": deploy_seconds,
                            "bytes": bmodel.stat().st_size}
        print("dynamic" if dynamic else "static", results[dynamic], file=sys.stderr)
    static, dynamic = results[False], results[True]
    lines = [f"{args.model}, {args.layers} layers, mode {args.mode}, seq {args.seq}, on the BM1684X simulator (its time "
             f"follows the work done); greedy, the token chosen on the device; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| prompt tokens | first token, static (s) | first token, dynamic (s) | static / dynamic | "
             "prefill h2d, static | prefill h2d, dynamic |", "|---|---|---|---|---|---|"]
    for s, d in zip(static["rows"], dynamic["rows"]):
        lines.append(f"| {s['prompt']} | {s['seconds']:.2f} | {d['seconds']:.2f} | {s['seconds'] / d['seconds']:.1f}x | "
                     f"{size(s['h2d'])} | {size(d['h2d'])} |")
    lines += ["", "What the option costs:", "", "| | static | dynamic |", "|---|---|---|",
              f"| block_i deploys (s, {args.layers} layers) | {static['deploy']:.1f} | {dynamic['deploy']:.1f} |",
              f"| bmodel size | {size(static['bytes'])} | {size(dynamic['bytes'])} |"]
    publish("\n".join(lines) + "\n", "first_token.md")


if __name__ == "__main__":
    main()
