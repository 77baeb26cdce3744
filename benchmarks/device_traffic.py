"""What crosses between the host and the device per generated token and per prefill, before (the
copy path: every net's inputs in from host arrays, outputs out) and after (the state kept on the
device: runtime/device_walk.py), on the BM1684X simulator, greedy and sampling; with simulator time
per token and, from the bytes, an estimate of tokens/s on a BM1684X.

    .venv/bin/python benchmarks/device_traffic.py [--models tiny-qwen2 shape-qwen-7b] [--seqs 512 2048]
        [--mode int4] [--layers 2] [--prompt 16] [--tokens 4] [--choices greedy sampling] [--dynamic]
        [--build-dir DIR] [--keep] [--project qwen-7b ...] [--out device_traffic.md]
Prints Markdown tables and writes them to benchmarks/results/<--out>.

The simulator's copies are host memcpy, so its time does not show what a board pays for the
bytes: the bytes do. The full-width models are built with --layers layers; the copy path's
per-layer part is scaled to the real model's layer count from the nets' shapes (each layer's
block_cache inputs and outputs). `--project` adds the figures of whole models at `--project-seqs`
from their configs (per_token_bytes), a formula first checked, in the same run, against every
measured row.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

DOIT = Path(sys.executable).parent / "doit"
REAL_LAYERS = {"shape-qwen-7b": 32, "shape-qwen-14b": 40}
# Bandwidths for the estimate, assumptions with their basis (no board here to measure them):
# PCIe card (SC7 series, PCIe 3.0 x16): 15.75 GB/s per direction is the link's raw rate (PCI-SIG:
# 8 GT/s x 16 lanes, 128b/130b coding); 12 GB/s (about 75% of it) is taken for bulk DMA. SoC (SE7):
# host and device share one LPDDR4X memory and bm_memcpy_s2d is a DMA copy within it, taken at
# 4 GB/s (a conservative share of the memory's bandwidth while the TPU also reads weights from it).
BANDWIDTH = {"PCIe card": 12e9, "SoC": 4e9}
# sophon-demo sample/Qwen, SE7-32, one chip (FACTS.md section 8): decode tokens/s, with the state on the device
PUBLISHED = {("qwen-7b", "int4", 512): 9.84, ("qwen-7b", "int4", 2048): 7.25,
             ("qwen2.5-7b", "int4", 512): 10.26, ("qwen2.5-7b", "int4", 2048): 9.75}


def build(build_dir: Path, model: str, seq: int, mode: str, layers: int | None, dynamic: bool):
    """`doit combine` of the variant; its BuildConfig (where the bmodel and the seq's files are)."""
    from pipeline.graph.build_config import parse_build_config

    variables = {"model": model, "seq": str(seq), "mode": mode, "build_dir": str(build_dir),
                 "dist_dir": str(build_dir / "dist"), "dynamic": str(int(dynamic)),
                 **({"layers": str(layers)} if layers else {})}
    print(f"building {model} seq {seq} ({time.strftime('%H:%M:%S')})", file=sys.stderr)
    subprocess.run([str(DOIT), "combine", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, check=True,
                   capture_output=True)
    return parse_build_config(variables)


def measure(bmodel: Path, resident: bool, prompt: list[int], tokens: int, sampling: bool) -> dict:
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import Engine
    from runtime.sampling import Sampler, SamplingParams

    params = SamplingParams(0.8, 40, 0.9, 1.1, seed=0) if sampling else SamplingParams()
    sampler = Sampler(params)
    with IsolatedBmodelBackend(bmodel, resident=resident) as backend:
        engine, layers = Engine(backend), backend.info.num_layers
        start = time.perf_counter()
        engine.prefill(prompt)
        out = [engine.next_token(sampler, prompt)]
        prefill_seconds, start = time.perf_counter() - start, time.perf_counter()
        for _ in range(tokens):
            engine.decode(out[-1])
            out.append(engine.next_token(sampler, prompt + out))
        seconds = (time.perf_counter() - start) / tokens
        nets = backend.nets
    return {"prefill": engine.prefill_traffic, "token": engine.decode_traffic.per(engine.decoded),
            "prefill_seconds": prefill_seconds, "token_seconds": seconds, "layers": layers,
            "layer_bytes": _copy_path_layer_bytes(nets)}


def _copy_path_layer_bytes(nets: dict) -> tuple[int, int]:
    """(in, out) bytes of one block_cache net's inputs and outputs: what the copy path moves per layer."""
    import numpy as np

    from runtime.bmrt import DTYPES

    spec = nets["block_cache_0"]
    sizes = [[int(np.prod(t["shape"])) * np.dtype(DTYPES[d][1]).itemsize for t, d in zip(spec[side], spec["_dtypes"][k])]
             for k, side in enumerate(("inputs", "outputs"))]
    return sum(sizes[0]), sum(sizes[1])


def size(n: float) -> str:
    from runtime.traffic import size as text

    return text(n)


def scaled(result: dict, real_layers: int) -> dict:
    """Per-token figures at the real depth: the copy path's per-layer bytes and launches times the
    layers added; the device path's bytes do not depend on depth, its launches do."""
    extra = real_layers - result["layers"]
    token = dict(result["token"])
    token["launches"] += extra
    if result["copy"]:
        layer_in, layer_out = result["layer_bytes"]
        token["h2d"] += extra * layer_in
        token["d2h"] += extra * layer_out
        token["syncs"] += extra
    return token


def per_token_bytes(layers: int, hidden: int, kv_heads: int, head_dim: int, vocab: int, seq: int,
                    copy: bool, sampling: bool) -> tuple[int, int]:
    """(host->device, device->host) bytes of one decode step, from the net interface's shapes
    (bf16 activations and K/V, int32 ids, float32 logits; the heads of our bmodels)."""
    a, kv = 2, kv_heads * head_dim * 2
    if copy:  # the token; per layer the hidden state, position, mask, both caches; the head's input
        h2d = 4 + layers * (hidden * a + 4 + (seq + 1) * a + 2 * seq * kv) + hidden * a
        d2h = hidden * a + layers * (hidden * a + 2 * kv) + vocab * 4  # every output; the logits
        return h2d, d2h
    return 4 + 4 + 4 + (seq + 1) * a, (51 * 8 if sampling else 4)  # token (x2), position, mask; the choice


def _dims(model: str, layers: int | None) -> dict:
    from pipeline.model.config import load_model_config

    arch = load_model_config(model).architecture
    return {"layers": layers or arch.num_layers, "hidden": arch.hidden_size, "kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim or arch.hidden_size // arch.num_heads, "vocab": arch.vocab_size}


def estimate(token: dict, published: float | None, bandwidth: float) -> str:
    """Tokens/s on a board: the published time per token (its runtime keeps the state on the
    device) plus the time the bytes take at `bandwidth`."""
    if not published:
        return "-"
    seconds = 1 / published + (token["h2d"] + token["d2h"]) / bandwidth
    return f"{1 / seconds:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen2", "tiny-qwen2:4", "shape-qwen-7b"],
                        help="model names, or name:layers")
    parser.add_argument("--seqs", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--mode", default="int4")
    parser.add_argument("--layers", type=int, default=2, help="layers of the full-width models")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--choices", nargs="+", default=["greedy", "sampling"], choices=["greedy", "sampling"])
    parser.add_argument("--build-dir", type=Path)
    parser.add_argument("--dynamic", action="store_true",
                        help="build dynamic=1: the prefill at the prompt's length (decode, and its bytes, are the same); "
                             "a full-width prefill over a whole window of 2048 takes the simulator hours")
    parser.add_argument("--keep", action="store_true",
                        help="keep each seq's intermediate files (a full-width seq's take about 25 GB)")
    parser.add_argument("--out", default="device_traffic.md", help="file name under benchmarks/results")
    parser.add_argument("--project", nargs="*", default=["qwen-7b", "qwen2.5-7b"],
                        help="whole models whose per-token bytes are computed from their configs")
    parser.add_argument("--project-seqs", nargs="+", type=int, default=[512, 2048])
    args = parser.parse_args()
    build_root = args.build_dir or Path(tempfile.mkdtemp(prefix="traffic-bench-"))
    prompt = list(range(10, 10 + args.prompt))
    rows = []
    for spec in args.models:  # a name, or name:layers
        model, _, depth = spec.partition(":")
        layers = int(depth) if depth else args.layers if model in REAL_LAYERS else None
        for seq in args.seqs:
            built = build(build_root, model, seq, args.mode, layers, args.dynamic)
            bmodel = built.dist_dir / f"{built.dist_name}.bmodel"
            for copy in (False, True):  # the device path first: it is the one users run
                for choice in args.choices:
                    result = measure(bmodel, not copy, prompt, args.tokens, choice == "sampling")
                    result.update(model=model, seq=seq, copy=copy, sampling=choice == "sampling")
                    rows.append(result)
                    print(model, seq, "copy" if copy else "device", choice, result["token"],
                          f"{result['token_seconds']:.1f} s/token ({time.strftime('%H:%M:%S')})", file=sys.stderr)
                    publish(report(rows, args), args.out)  # after every row: a long run that stops keeps what it measured
            if not args.keep:  # the bmodel stays in dist/; the ONNX and MLIR of this seq go
                shutil.rmtree(built.seq_dir, ignore_errors=True)


def report(rows: list[dict], args) -> str:
    # the formula against every measured row, before it is used for the whole models
    for r in rows:
        dims = _dims(r["model"], r["layers"])
        r["formula"] = per_token_bytes(**dims, seq=r["seq"], copy=r["copy"], sampling=r["sampling"]) == \
            (r["token"]["h2d"], r["token"]["d2h"])
    dynamic = ", dynamic=1 (the prefill at the prompt's length)" if args.dynamic else ""
    lines = [f"Mode {args.mode}, a {args.prompt}-token prompt then {args.tokens} generated tokens, on the BM1684X "
             f"simulator; {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Full-width models built with "
             f"{args.layers} layers{dynamic}. Greedy: the greedy head (or the logits, on the copy path); sampling: "
             "temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1 (the sample head on the device path).",
             "", "Per generated token, as measured (the built depth):", "",
             "| model | seq | path | choice | h2d | d2h | d2d | launches | syncs | simulator s/token | "
             "= per_token_bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["token"]
        lines.append(f"| {r['model']} ({r['layers']} layers) | {r['seq']} | {'copy' if r['copy'] else 'device'} | "
                     f"{'sampling' if r['sampling'] else 'greedy'} | {size(t['h2d'])} | {size(t['d2h'])} | "
                     f"{size(t['d2d'])} | {t['launches']:.0f} | {t['syncs']:.0f} | {r['token_seconds']:.3f} | "
                     f"{'yes' if r['formula'] else '**no**'} |")
    lines += ["", "Per prefill, as measured:", "", "| model | seq | path | choice | h2d | d2h | d2d | launches | syncs | "
              "simulator s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["prefill"]
        lines.append(f"| {r['model']} ({r['layers']} layers) | {r['seq']} | {'copy' if r['copy'] else 'device'} | "
                     f"{'sampling' if r['sampling'] else 'greedy'} | {size(p.h2d)} | {size(p.d2h)} | {size(p.d2d)} | "
                     f"{p.launches} | {p.syncs} | {r['prefill_seconds']:.1f} |")
    full = [r for r in rows if r["model"] in REAL_LAYERS and not r["sampling"]]
    if full:
        lines += speed_table("Greedy, per generated token at the real depth (the copy path's per-layer bytes scaled "
                             "from the nets' shapes)", [
                                 (r["model"], r["seq"], r["copy"], REAL_LAYERS[r["model"]],
                                  scaled(r, REAL_LAYERS[r["model"]]),
                                  PUBLISHED.get((r["model"].removeprefix("shape-"), args.mode, r["seq"])))
                                 for r in full])
    if args.project and all(r["formula"] for r in rows):
        lines += projection(args)
    elif args.project:
        lines += ["", "No projection: per_token_bytes does not match every measured row."]
    return "\n".join(lines) + "\n"


def projection(args) -> list[str]:
    """Whole models, greedy, per generated token from per_token_bytes (checked above)."""
    entries = []
    for model in args.project:
        dims = _dims(model, None)
        for seq in args.project_seqs:
            for copy in (True, False):
                h2d, d2h = per_token_bytes(**dims, seq=seq, copy=copy, sampling=False)
                entries.append((model, seq, copy, dims["layers"], {"h2d": h2d, "d2h": d2h},
                                PUBLISHED.get((model, args.mode, seq))))
    return speed_table("Whole models, greedy, per generated token from `per_token_bytes` (the formula that matched "
                       "every measured row above)", entries)


def speed_table(what: str, entries: list[tuple]) -> list[str]:
    """(model, seq, copy path?, layers, per-token bytes, published tokens/s) rows, with the decode
    speed they leave a BM1684X where a published figure exists."""
    lines = ["", f"{what}, and the decode speed this leaves a BM1684X: the published figure (sophon-demo, SE7-32; "
             "its runtime keeps the state on the device) plus the time of the bytes at "
             + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in BANDWIDTH.items()) + ":", "",
             "| model | seq | path | layers | h2d | d2h | published tokens/s | "
             + " | ".join(f"est. tokens/s, {k}" for k in BANDWIDTH) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(BANDWIDTH)]
    for model, seq, copy, layers, token, published in entries:
        lines.append(f"| {model} | {seq} | {'copy' if copy else 'device'} | {layers} | {size(token['h2d'])} | "
                     f"{size(token['d2h'])} | {published or '-'} | "
                     + " | ".join(estimate(token, published, bw) for bw in BANDWIDTH.values()) + " |")
    return lines


if __name__ == "__main__":
    main()
