"""Whose loss is a quantized mode's: the quantization's or the build's? The whole model, decoded three
ways along the fp32 pipeline's greedy path (teacher forcing, as `doit verify` does on the simulator):
  fp32       the ONNX pieces (onnxruntime)
  weights    the same pieces with every block's weights as the bmodel holds them (TPU-MLIR's
             quantized weights, dequantized: pipeline/stages/quantized_weights.py)
  simulator  the combined bmodel on the BM1684X cmodel, built and checked by `doit verify`
Where `weights` already differs from fp32, the quantization costs it; where the simulator differs
from `weights` at a step its top-2 margin does not make a near-tie, the build does.

    .venv/bin/python benchmarks/quantization_cost.py [--model tiny-qwen3.5] [--modes bf16 int8 int4] [--build-dir DIR]
Prints a Markdown table and writes it to benchmarks/results/quantization_cost.md.
"""
import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

TIE_MARGIN = 0.1  # as pipeline/stages/verify_sim.py


def verified(variables: dict[str, str]):
    """`doit verify` as a user runs it; the build's tasks and its simulator report."""
    from pipeline.graph.build_config import parse_build_config
    from pipeline.graph.tasks import DeployTasks, ExportTasks, Paths, TransformTasks

    doit = Path(sys.executable).parent / "doit"
    subprocess.run([str(doit), "verify", *(f"{k}={v}" for k, v in variables.items())], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    build = parse_build_config(variables)
    paths = Paths(build)
    export = ExportTasks(build, paths)
    report = json.loads((paths.seq / "verify" / build.target / "report.json").read_text())
    return export, DeployTasks(build, paths, TransformTasks(build, paths, export)), report


def quantized_pipeline(export, deploy, mode: str, out: Path) -> Path:
    """A copy of the ONNX folder whose block pieces hold the bmodel's weights."""
    import onnx

    from pipeline.stages.compile import weights_quantized

    shutil.copytree(export.paths.onnx, out)
    for piece in export.pieces:
        if weights_quantized(piece, mode):
            model, _ = deploy.dequantized_net(piece)
            onnx.save(model, str(out / f"{piece.file}.onnx"))
    return out


def greedy(logits: list) -> list[int]:
    return [int(np.argmax(lg)) for lg in logits]


def lowest_cosine(a: list, b: list) -> float:
    from pipeline.stages.verify import compare

    return min(compare(x, y)["cosine"] for x, y in zip(a, b))


def measure(variables: dict[str, str], mode: str, scratch: Path) -> dict:
    from pipeline.stages.verify_sim import margins_of
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import Engine
    from runtime.onnx_backend import OnnxBackend

    export, deploy, report = verified({**variables, "mode": mode})
    ids, path = report["prompt_ids"], report["decode"]["onnx"]  # fp32's greedy path, which all three follow
    fp32 = Engine(OnnxBackend(export.paths.onnx)).logits_along(ids, len(path), path)
    weights = Engine(OnnxBackend(quantized_pipeline(export, deploy, mode, scratch / mode))).logits_along(
        ids, len(path), path)
    with IsolatedBmodelBackend(ROOT / export.paths.dist) as backend:
        simulator = Engine(backend).logits_along(ids, len(path), path)
    margins = margins_of(weights)
    chosen = {name: greedy(logits) for name, logits in (("fp32", fp32), ("weights", weights), ("simulator", simulator))}
    same = {pair: sum(a == b for a, b in zip(chosen[pair[0]], chosen[pair[1]]))
            for pair in (("weights", "fp32"), ("simulator", "fp32"), ("simulator", "weights"))}
    return {"mode": mode, "steps": len(path), "same": same,
            "cosine": {"weights_fp32": lowest_cosine(fp32, weights), "simulator_fp32": lowest_cosine(fp32, simulator),
                       "simulator_weights": lowest_cosine(weights, simulator)},
            "decisive": [f"step {k} (margin {m:.2f})" for k, (a, b, m) in
                         enumerate(zip(chosen["simulator"], chosen["weights"], margins)) if a != b and m >= TIE_MARGIN],
            "explained": report.get("quantization_explained", 0)}


def table(model: str, rows: list[dict]) -> str:
    lines = [f"# Quantization cost of {model}: the whole model, teacher-forced along fp32's greedy path", "",
             f"{datetime.date.today()}, {rows[0]['steps']} steps; `weights`: the ONNX pieces with the bmodel's "
             "quantized weights (dequantized), in fp32; `simulator`: the combined bmodel on the BM1684X cmodel. "
             "Same greedy choice at how many steps, and the lowest cosine of a step's logits.", "",
             "| mode | weights = fp32 | simulator = fp32 | simulator = weights | simulator != weights at a margin "
             f">= {TIE_MARGIN} | piece outputs below the mode's thresholds, matching the quantized weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['same'][pair]}/{r['steps']} (cosine {r['cosine'][key]:.5f})" for pair, key in
                 ((("weights", "fp32"), "weights_fp32"), (("simulator", "fp32"), "simulator_fp32"),
                  (("simulator", "weights"), "simulator_weights"))]
        lines.append(f"| {r['mode']} | {' | '.join(cells)} | {', '.join(r['decisive']) or 'none'} | {r['explained']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen3.5")
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"])  # bf16: the control
    parser.add_argument("--build-dir", type=Path, help="where to build (default: a new temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_dir = args.build_dir or Path(tmp) / "build"
        variables = {"model": args.model, "build_dir": str(build_dir), "dist_dir": str(build_dir / "dist")}
        rows = [measure(variables, mode, Path(tmp) / "pipelines") for mode in args.modes]
    publish(table(args.model, rows), "quantization_cost.md")


if __name__ == "__main__":
    main()
