"""First-token time on onnxruntime (CPU, fp32): the prefill pieces run at the prompt's length
(OnnxBackend's default: the static pieces rewritten in memory, runtime/onnx_exact.py) against their
exported length (padded, as a static bmodel runs), on the same pieces.

    .venv/bin/python benchmarks/onnx_prefill.py [--model bench-qwen2-medium] [--layers 2] [--seq 512]
        [--prompts 16 64 256] [--repeat 5] [--build-dir DIR]
Prompts of the given lengths and of SEQ-1 tokens; each timed --repeat times (the median). Prints
a Markdown table and writes it to benchmarks/results/onnx_prefill.md.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import export_onnx, model_options, publish  # noqa: E402


def first_token_seconds(engine, ids: list[int], repeat: int) -> float:
    """The median seconds from a fresh prompt to its first token's logits."""
    times = []
    for _ in range(repeat):
        engine.forget()
        start = time.perf_counter()
        engine.prefill(ids)
        engine.logits()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser)
    parser.add_argument("--prompts", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    args.build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="onnx-prefill-bench-"))
    from runtime.engine import Engine
    from runtime.onnx_backend import OnnxBackend

    onnx_dir = export_onnx({"model": args.model, "layers": str(args.layers), "seq": str(args.seq),
                            "build_dir": str(args.build_dir)})
    engines = {exact: Engine(OnnxBackend(onnx_dir, chunk=0, exact=exact)) for exact in (False, True)}
    for engine in engines.values():
        engine.prefill([10, 11])  # every session made once (the exact one rewrites its pieces then)
    prompts = sorted({*args.prompts, args.seq - 1})
    lines = [f"{args.model}, {args.layers} layers, seq {args.seq}, onnxruntime (CPU, fp32, 1 thread); first token "
             f"(the prefill and the logits), median of {args.repeat}; {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| prompt tokens | padded to the window (ms) | at the prompt's length (ms) | ratio |", "|---|---|---|---|"]
    for n in prompts:
        ids = [10 + k % 200 for k in range(n)]
        padded, exact = (first_token_seconds(engines[e], ids, args.repeat) * 1000 for e in (False, True))
        lines.append(f"| {n} | {padded:.1f} | {exact:.1f} | {padded / exact:.1f}x |")
    publish("\n".join(lines) + "\n", "onnx_prefill.md")


if __name__ == "__main__":
    main()
