"""A 4-turn chat on the BM1684X simulator (its time follows the work done): each turn's first-token
time with the cache kept from the turn before (history nets, `history=1`) against a fresh prefill
of the whole conversation, on one bmodel; and the same on onnxruntime (CPU) over the same pieces.

    .venv/bin/python benchmarks/chat_turns.py [--model bench-qwen2-medium] [--layers 2] [--seq 512]
        [--mode int4] [--chunk 128] [--dynamic 1] [--first N] [--turn 60] [--answer 8] [--build-dir DIR]
        [--out chat_turns.md]
The first turn adds `--first` user tokens (default `--turn`), each next one `--turn`; each is
answered with `--answer` tokens (greedy). Prints a Markdown table and writes it to
benchmarks/results/<out>.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import build_bmodel, model_options, publish  # noqa: E402


def first_token(engine, sampler, ids: list[int], fresh: bool) -> tuple[float, int]:
    """Seconds from the prompt to its first token, and the prompt tokens prefilled."""
    if fresh:
        engine.forget()
    start = time.perf_counter()
    engine.prefill(ids)
    engine.next_token(sampler, ids)
    return time.perf_counter() - start, len(ids) - engine.reused


def warm(engine) -> None:
    """Every net loaded once (block_i, block_kv_i, the decode nets, the heads) before timing."""
    engine.greedy([10, 11], 2)
    engine.prefill([10, 11, 12, 13])  # continues the cache: block_kv_i
    engine.forget()


def conversation(engine, sampler, turns: int, turn_tokens: int, answer: int, first: int | None = None) -> list[dict]:
    """The turns, each timed twice: with the cache the turn before left, then everything again
    (whose state the answer then continues from: the cache holds the same tokens either way)."""
    rows, ids = [], []
    for turn in range(1, turns + 1):
        user = first if turn == 1 and first else turn_tokens
        ids = ids + [10 + (turn * 37 + k) % 400 for k in range(user)]  # within any vocabulary
        kept_seconds, prefilled = first_token(engine, sampler, ids, fresh=False)
        fresh_seconds, _ = first_token(engine, sampler, ids, fresh=True)
        rows.append({"turn": turn, "prompt": len(ids), "prefilled": prefilled, "kept": kept_seconds,
                     "fresh": fresh_seconds})
        ids = ids + _answer(engine, sampler, ids, answer)
    return rows


def _answer(engine, sampler, ids: list[int], answer: int) -> list[int]:
    """The rest of the answer after the first token (already prefilled): greedy decode."""
    out = [engine.next_token(sampler, ids)]
    while len(out) < answer:
        engine.decode(out[-1])
        out.append(engine.next_token(sampler, ids + out))
    return out


def table(title: str, rows: list[dict]) -> list[str]:
    lines = [f"**{title}**", "", "| turn | prompt tokens | prefilled (kept cache) | first token, cache kept (s) | "
             "first token, all again (s) | all again / kept |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['turn']} | {r['prompt']} | {r['prefilled']} | {r['kept']:.3f} | {r['fresh']:.3f} | "
              f"{r['fresh'] / r['kept']:.1f}x |" for r in rows]
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(parser)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--dynamic", type=int, default=1)
    parser.add_argument("--turn", type=int, default=60, help="user tokens a turn")
    parser.add_argument("--first", type=int, help="user tokens of the first turn (a system prompt, a document; "
                        "default: --turn)")
    parser.add_argument("--out", default="chat_turns.md", help="the results file in benchmarks/results/")
    parser.add_argument("--answer", type=int, default=8, help="answer tokens a turn")
    args = parser.parse_args()
    args.build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="chat-turns-bench-"))
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import Engine
    from runtime.onnx_backend import OnnxBackend
    from runtime.sampling import Sampler, SamplingParams

    variables = {"model": args.model, "layers": str(args.layers), "seq": str(args.seq), "mode": args.mode,
                 "dynamic": str(args.dynamic), "history": "1", "chunk": str(args.chunk),
                 "build_dir": str(args.build_dir), "dist_dir": str(args.build_dir / "dist")}
    start = time.perf_counter()
    bmodel, _ = build_bmodel(variables)
    build_seconds = time.perf_counter() - start
    sampler = Sampler(SamplingParams())
    onnx_dir = next(args.build_dir.glob(f"{args.model}*/seq{args.seq}/onnx"))
    onnx_engine = Engine(OnnxBackend(onnx_dir, chunk=args.chunk))
    warm(onnx_engine)
    onnx_rows = conversation(onnx_engine, sampler, 4, args.turn, args.answer, args.first)
    with IsolatedBmodelBackend(bmodel) as backend:
        engine = Engine(backend)
        warm(engine)
        sim_rows = conversation(engine, sampler, 4, args.turn, args.answer, args.first)
    lines = [f"{args.model}, {args.layers} layers, mode {args.mode}, seq {args.seq}, history nets of {args.chunk} "
             f"tokens a run, {'dynamic' if args.dynamic else 'static'} prefill; the first turn "
             f"{args.first or args.turn} user tokens, each next one {args.turn}, each answered with {args.answer} "
             f"tokens (greedy); {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
             f"build (doit combine; 0 s where it was built already) {build_seconds:.0f} s, "
             f"bmodel {bmodel.stat().st_size / 2**20:.1f} MiB.", "",
             *table("BM1684X simulator", sim_rows), *table("onnxruntime (CPU, fp32)", onnx_rows)]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
