"""Decode time per token with a short and a long cache, with decode stages (`chunk=C`: block_cache_i
also over the first C, 2C, 4C ... slots) against without, on the BM1684X simulator (its time follows
the work done) and on onnxruntime (CPU) over the same pieces; and what the stages cost to build
(their export, transform and deploy time) and in bmodel size.

    .venv/bin/python benchmarks/decode_stages.py [--model bench-qwen2-medium] [--layers 2] [--seq 512]
        [--mode int4] [--chunk 64] [--positions 20 100 200 400] [--steps 3] [--build-dir DIR]
        [--out decode_stages.md]
A step at position P attends over the P filled cache slots (the stage that holds them, or the whole
cache): after a real prompt, steps are timed at each position, --steps in a row (the slots between
the prompt and P hold zeros: their values do not change a step's work). Prints a Markdown table and
writes it to benchmarks/results/<out>.
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

PROMPT = [10 + k for k in range(16)]


def build(args, chunk: int) -> tuple[Path, dict]:
    """The combined bmodel, and the seconds each stage spent on the decode stages' pieces."""
    start = time.perf_counter()
    bmodel, output = build_bmodel({"model": args.model, "layers": str(args.layers), "seq": str(args.seq),
                                   "mode": args.mode, "chunk": str(chunk), "build_dir": str(args.build_dir),
                                   "dist_dir": str(args.build_dir / "dist")})
    spent = {stage: sum(float(m[1]) for m in re.finditer(
        rf"\[{stage} \d+/\d+\] block_cache_\d+_kv\d+ done in ([\d.]+) s", output))
        for stage in ("export", "transform", "deploy")}
    return bmodel, {**spent, "wall": time.perf_counter() - start}


def step_seconds(engine, positions: list[int], steps: int) -> dict[int, float]:
    """Seconds per decode step (the token chosen and read back) at each position."""
    from runtime.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams())
    engine.prefill(PROMPT)
    token = engine.next_token(sampler, PROMPT)
    for pos in positions:  # every net (each stage) loaded once before timing
        engine.walk.decode(token, pos)
        engine.next_token(sampler, PROMPT)
    out = {}
    for pos in positions:
        start = time.perf_counter()
        for k in range(steps):
            engine.walk.decode(token, pos + k)
            token = engine.next_token(sampler, PROMPT)
        out[pos] = (time.perf_counter() - start) / steps
    return out


def on_simulator(bmodel: Path, positions: list[int], steps: int) -> tuple[dict, tuple]:
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import Engine

    with IsolatedBmodelBackend(bmodel) as backend:
        return step_seconds(Engine(backend), positions, steps), backend.info.stages


def on_onnxruntime(onnx_dir: Path, stages, positions: list[int], steps: int) -> dict:
    from runtime.engine import Engine
    from runtime.onnx_backend import OnnxBackend

    return step_seconds(Engine(OnnxBackend(onnx_dir, chunk=0, stages=stages)), positions, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--positions", nargs="+", type=int, default=[20, 100, 200, 400])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="decode_stages.md", help="the results file in benchmarks/results/")
    args = parser.parse_args()
    args.build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="decode-stages-bench-"))
    positions = sorted(args.positions)
    from runtime.traffic import size

    runs = {}
    for chunk in (0, args.chunk):
        bmodel, spent = build(args, chunk)
        seconds, stages = on_simulator(bmodel, positions, args.steps)
        runs[chunk] = {"bmodel": bmodel, "spent": spent, "sim": seconds, "stages": stages}
        print(chunk, runs[chunk], file=sys.stderr)
    onnx_dir = next(args.build_dir.glob(f"{args.model}*/seq{args.seq}/onnx"))
    ort = {chunk: on_onnxruntime(onnx_dir, () if chunk == 0 else None, positions, args.steps)
           for chunk in (0, args.chunk)}
    whole, staged = runs[0], runs[args.chunk]

    def stage_at(pos):
        return min(k for k in staged["stages"] if k >= pos)

    lines = [f"{args.model}, {args.layers} layers, mode {args.mode}, seq {args.seq}, decode stages `chunk={args.chunk}` "
             f"(cache lengths {', '.join(map(str, staged['stages']))}); greedy, the token chosen on the device; "
             f"{args.steps} steps timed at each position; {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.", "",
             "| position (filled slots) | stage attended | simulator, whole cache (s/token) | simulator, stages | "
             "ratio | onnxruntime, whole cache (ms/token) | onnxruntime, stages | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for pos in positions:
        w, s = whole["sim"][pos], staged["sim"][pos]
        ow, os_ = ort[0][pos] * 1000, ort[args.chunk][pos] * 1000
        lines.append(f"| {pos} | {stage_at(pos)} of {args.seq} | {w:.3f} | {s:.3f} | {w / s:.2f}x | {ow:.2f} | "
                     f"{os_:.2f} | {ow / os_:.2f}x |")
    spent = staged["spent"]
    lines += ["", "What the stages cost:", "", "| | without | with stages |", "|---|---|---|",
              f"| stage pieces: export + transform + deploy (s, {args.layers} layers) | 0 | "
              f"{spent['export']:.1f} + {spent['transform']:.1f} + {spent['deploy']:.1f} |",
              f"| build wall time from the previous build (s) | {whole['spent']['wall']:.1f} (everything) | "
              f"{spent['wall']:.1f} (the stages, the combine) |",
              f"| bmodel size | {size(whole['bmodel'].stat().st_size)} | {size(staged['bmodel'].stat().st_size)} |"]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
