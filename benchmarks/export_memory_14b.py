"""Memory at 14B scale: generate a checkpoint with all of qwen-14b's shapes (40 layers, random bf16
weights on disk, about 28 GB), patch it, and export every piece, measuring each piece's wall
time and peak resident memory (sampled every 20 ms while it is exported).

The exported ONNX of the whole model would take about 106 GB (fp32, a block and a block_cache per
layer), more than this machine's disk, so each piece's ONNX is deleted once measured. The
checkpoint is deleted at the end unless --keep.

    .venv/bin/python benchmarks/export_memory_14b.py [--model shape-qwen-14b] [--seq 512] [--build-dir DIR]
Checks free disk space first and says what it needs. Prints a Markdown table and writes it to
benchmarks/results/export_memory_14b.md.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

GiB = 2**30


def needs(model: str) -> tuple[int, int]:
    """(checkpoint bytes in bf16, largest piece's fp32 bytes), from the model's dimensions."""
    from pipeline.model.config import load_model_config

    a = load_model_config(model).architecture
    h, f, v = a.hidden_size, a.intermediate_size, a.vocab_size
    q = a.num_heads * a.head_dim
    kv = a.num_kv_heads * a.head_dim
    layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * f + 2 * h
    params = 2 * v * h + a.num_layers * layer + h
    return 2 * params, 4 * max(v * h, layer)


def check_disk(build_dir: Path, model: str) -> None:
    checkpoint, piece = needs(model)
    need = checkpoint + 2 * piece + GiB  # the checkpoint, one piece (and its temp copy), room
    free = shutil.disk_usage(build_dir).free
    print(f"[disk] needs {need / GiB:.1f} GiB in {build_dir} (checkpoint {checkpoint / GiB:.1f} GiB, largest piece "
          f"{piece / GiB:.1f} GiB fp32, twice while written); {free / GiB:.1f} GiB free", file=sys.stderr, flush=True)
    if free < need:
        raise SystemExit(f"not enough disk: {need / GiB:.1f} GiB needed in {build_dir}, {free / GiB:.1f} GiB free; "
                         "pass --build-dir on a larger disk")


def timed_doit(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a doit run in a fresh child."""
    wrapper = ("import resource, subprocess, sys, time\n"
               "t = time.perf_counter(); code = subprocess.run(sys.argv[1:]).returncode\n"
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")
    out = subprocess.run([sys.executable, "-c", wrapper, str(Path(sys.executable).parent / "doit"), *args],
                         cwd=ROOT, capture_output=True, text=True)
    if not out.stdout.split() or int(out.stdout.split()[-1]):
        raise SystemExit(f"doit {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    seconds, maxrss, _ = out.stdout.split()[-3:]
    return float(seconds), int(maxrss) / 1024


class PeakSampler:
    """The highest RSS of this process while a `with` block runs."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.done.wait(0.02)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def export_all(model_dir: Path, seq: int, out_dir: Path) -> list[dict]:
    """Every piece exported in this process, one after the other, as `doit export` does; each
    one's ONNX deleted once measured."""
    from pipeline.fsutil import read_json
    from pipeline.stages.export import export_piece
    from runtime.nets import model_pieces

    config = read_json(model_dir / f"seq{seq}" / "config.json")
    mapping = read_json(model_dir / "canonical" / "tensor_map.json")
    source = Path(read_json(model_dir / "source.json")["folder"])
    pieces = model_pieces(config["num_hidden_layers"])
    rows = []
    for k, piece in enumerate(pieces, 1):
        out = out_dir / f"{piece.name}.onnx"
        start = time.perf_counter()
        with PeakSampler() as sampler:
            export_piece(piece, config, source, mapping, out, out_dir / "logs" / f"{piece.name}.log")
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out_dir.glob(f"{piece.name}.onnx*"))
        for p in out_dir.glob(f"{piece.name}.onnx*"):
            p.unlink()
        rows.append({"piece": piece.name, "seconds": round(seconds, 1), "peak_rss_mib": round(sampler.peak / 2**20),
                     "onnx_mib": round(size / 2**20)})
        print(f"[export {k}/{len(pieces)}] {piece.name}: {seconds:.1f} s, peak RSS {sampler.peak / 2**20:.0f} MiB, "
              f"ONNX {size / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def table(model: str, seq: int, stages: dict, rows: list[dict], checkpoint_bytes: int) -> str:
    layers = [r for r in rows if r["piece"].startswith("block")]
    peak = max(rows, key=lambda r: r["peak_rss_mib"])
    total = sum(r["seconds"] for r in rows)
    lines = [f"`{model}` (all layers, seq {seq}): checkpoint {checkpoint_bytes / GiB:.1f} GiB of bf16 safetensors; "
             f"{platform.machine()}, {os.cpu_count()} cores, "
             f"{round(__import__('psutil').virtual_memory().total / GiB)} GiB RAM, {time.strftime('%Y-%m-%d')}.", "",
             "| stage | wall time (s) | peak RSS (MiB) |", "|---|---|---|"]
    lines += [f"| {name} | {s['seconds']:.0f} | {s['peak_rss_mib']:.0f} |" for name, s in stages.items()]
    lines += [f"| export, {len(rows)} pieces | {total:.0f} | {peak['peak_rss_mib']} ({peak['piece']}) |", "",
              f"Per piece: embedding and lm_head, and the mean of the {len(layers)} block pieces:", "",
              "| piece | export (s) | peak RSS (MiB) | ONNX (MiB) |", "|---|---|---|---|"]
    for r in rows:
        if not r["piece"].startswith("block"):
            lines.append(f"| {r['piece']} | {r['seconds']} | {r['peak_rss_mib']} | {r['onnx_mib']} |")
    mean = {k: sum(r[k] for r in layers) / len(layers) for k in ("seconds", "peak_rss_mib", "onnx_mib")}
    high = max(r["peak_rss_mib"] for r in layers)
    lines.append(f"| block_i / block_cache_i (mean; highest peak {high}) | {mean['seconds']:.1f} | "
                 f"{mean['peak_rss_mib']:.0f} | {mean['onnx_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shape-qwen-14b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--build-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = parser.parse_args()
    build_dir = (args.build_dir or Path(tempfile.mkdtemp(prefix="export-14b-"))).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    check_disk(build_dir, args.model)
    variables = [f"model={args.model}", f"seq={args.seq}", f"build_dir={build_dir}"]
    try:
        stages = {}
        for stage, what in (("checkpoint", "generate the checkpoint"), ("map", "map onto the canonical layout (fingerprint every layer)")):
            print(f"[{stage}] {what} ...", file=sys.stderr, flush=True)
            seconds, peak = timed_doit(stage, *variables)
            stages[what] = {"seconds": seconds, "peak_rss_mib": peak}
            print(f"[{stage}] {seconds:.0f} s, peak RSS {peak:.0f} MiB", file=sys.stderr, flush=True)
        rows = export_all(build_dir / args.model, args.seq, build_dir / "onnx-scratch")
        checkpoint = build_dir / args.model / "checkpoint"
        size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        (build_dir / "export-14b.json").write_text(json.dumps({"stages": stages, "pieces": rows}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(build_dir / args.model / "checkpoint", ignore_errors=True)
    publish(table(args.model, args.seq, stages, rows, size), "export_memory_14b.md")


if __name__ == "__main__":
    main()
