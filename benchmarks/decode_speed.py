"""Decode speed of the runtime's onnxruntime backend against transformers' generate() (fp32, CPU)
on the same generated checkpoints: a tiny one and a larger one.

    .venv/bin/python benchmarks/decode_speed.py
Prints a Markdown table and writes it to benchmarks/results/decode_speed.md.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

MODELS = [("tiny-qwen2", None), ("bench-qwen2-medium", 4), ("bench-qwen2-medium", 12)]
SEQ, PROMPT, NEW = 256, 32, 64


def build(build_dir: Path, model: str, layers: int | None) -> Path:
    variables = [f"model={model}", f"seq={SEQ}", f"build_dir={build_dir}"] + ([f"layers={layers}"] if layers else [])
    subprocess.run([str(Path(sys.executable).parent / "doit"), "export", "map", *variables], cwd=ROOT, check=True,
                   capture_output=True)
    return build_dir / (f"{model}-{layers}l" if layers else model)


def onnx_speed(onnx: Path, prompt: list[int]) -> tuple[float, float]:
    from runtime.engine import Engine
    from runtime.onnx_backend import OnnxBackend

    engine = Engine(OnnxBackend(onnx))
    engine.greedy(prompt, 2)  # load the sessions
    start = time.perf_counter()
    engine.prefill(prompt)
    logits = engine.logits()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(NEW - 1):
        engine.decode(int(logits.argmax()))
        logits = engine.logits()
    return prefill, (NEW - 1) / (time.perf_counter() - start)


def transformers_speed(checkpoint: Path, prompt: list[int]) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=n,
                           max_new_tokens=n, attention_mask=torch.ones_like(ids))
        return time.perf_counter() - start

    run(2)  # warm up
    prefill = run(1)
    return prefill, (NEW - 1) / max(run(NEW) - prefill, 1e-9)


def main():
    rows = []
    prompt = list(range(10, 10 + PROMPT))
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        for model, layers in MODELS:
            model_dir = build(Path(tmp), model, layers)
            onnx = onnx_speed(model_dir / f"seq{SEQ}" / "onnx", prompt)
            reference = transformers_speed(model_dir / "checkpoint", prompt)
            rows.append((model + (f" ({layers} layers)" if layers else ""), *onnx, *reference))
            print(rows[-1], file=sys.stderr)
    lines = [f"Greedy decode of {NEW} tokens after a {PROMPT}-token prompt, seq {SEQ}, fp32 on the CPU "
             f"({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}. onnxruntime: the runtime's engine over the "
             "exported pieces (1 thread per session, a fixed-size KV cache). transformers: generate() with its "
             "dynamic cache.", "",
             "| model | onnxruntime prefill (s) | onnxruntime decode (tokens/s) | transformers prefill (s) | "
             "transformers decode (tokens/s) |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {op:.3f} | {od:.1f} | {tp:.3f} | {td:.1f} |" for m, op, od, tp, td in rows]
    publish("\n".join(lines) + "\n", "decode_speed.md")


if __name__ == "__main__":
    main()
