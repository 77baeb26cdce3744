"""Accuracy figures of the simulator verification, per model and mode (the README's table).

Builds and verifies each tiny model in each mode (`doit verify`), then reads the reports.
    .venv/bin/python benchmarks/verification_figures.py [--models ...] [--modes ...]
Prints a Markdown table and writes it to benchmarks/results/verification.md.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-qwen-v1", "tiny-qwen2", "tiny-qwen3"])
    parser.add_argument("--modes", nargs="+", default=["f16", "bf16", "int8", "int4"])
    args = parser.parse_args()
    from pipeline.graph.build_config import parse_build_config

    rows = []
    with tempfile.TemporaryDirectory(prefix="verify-figures-") as tmp:
        for model in args.models:
            for mode in args.modes:
                variables = [f"model={model}", f"mode={mode}", f"build_dir={tmp}", f"dist_dir={tmp}/dist"]
                out = subprocess.run([str(Path(sys.executable).parent / "doit"), "verify", *variables], cwd=ROOT,
                                     capture_output=True, text=True)
                build = parse_build_config(dict(v.split("=", 1) for v in variables))
                report = json.loads((build.seq_dir / "verify" / build.variant / "report.json").read_text())
                values = [r for outs in report["pieces"].values() for r in outs.values()]
                blocks = [r for net, outs in report["pieces"].items() if net.startswith("block")
                          for r in outs.values()]
                d = report["decode"]
                rows.append((model, mode, min(r["cosine"] or 0.0 for r in blocks),
                             max(r["max_abs"] / r["ref_max"] for r in values),
                             report["pieces"]["lm_head"]["logits"]["cosine"], d["agree"], len(d["onnx"]),
                             sum(m >= 0.1 for m in d["margins"]), len(d["decisive_disagreements"]),
                             d["free_running_prefix"], "PASS" if out.returncode == 0 else "FAIL"))
                print(f"{model} {mode}: {rows[-1][-1]}", file=sys.stderr)
    lines = [f"Tiny random models, seq 32, BM1684X cmodel simulator vs onnxruntime; {time.strftime('%Y-%m-%d')}.",
             "", "| model | mode | worst block cosine | worst max abs / max(1,|ref|) | lm_head cosine | "
             "greedy choices as fp32 (teacher-forced) | decisive steps (margin >= 0.1) | disagreements there | "
             "free-running identical prefix | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {mode} | {c:.6f} | {a:.3f} | {lc:.6f} | {ag}/{n} | {dec} | {dis} | {pre} | {res} |"
              for m, mode, c, a, lc, ag, n, dec, dis, pre, res in rows]
    publish("\n".join(lines) + "\n", "verification.md")


if __name__ == "__main__":
    main()
