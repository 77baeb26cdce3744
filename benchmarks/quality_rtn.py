"""Is a mode's loss in `doit quality` TPU-MLIR's, or that of quantizing by rounding at all? The fp32
reference (transformers) scores the same windows with its decoder's matmul weights rounded to
nearest by a textbook quantizer written here: asymmetric, a scale and a zero point per output row
and group of input columns, as TPU-MLIR's W8/W4 weights are stored (pipeline/stages/quantized_weights.py;
its W8 weights too are in groups of 64 input columns, with no group size asked for).
Where these rows match the report's `<mode>-weights` rows (TPU-MLIR's own quantized weights), the
loss belongs to round-to-nearest at that width and group size, not to TPU-MLIR.

    .venv/bin/python benchmarks/quality_rtn.py [--model smollm2-135m] [--seq 128] [--build-dir DIR]
Needs the quality folder `doit quality` (benchmarks/quality.py) leaves: the windows, the reference.
Prints a Markdown table and writes it to benchmarks/results/quality_rtn_<model>.md.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

# (row, bits, group size: 0 = the whole row, whether a group may be narrower than the others)
QUANTIZERS = [("rtn int8 per row", 8, 0, False),
              ("rtn int8 g64 (as TPU-MLIR 1.30.2's W8, which groups by 64 too)", 8, 64, False),
              ("rtn int4 g64", 4, 64, False),
              ("rtn int4 g128, where it divides the width (as TPU-MLIR 1.30.2)", 4, 128, False),
              ("rtn int4 g128, every matmul (a last group narrower)", 4, 128, True)]


def round_to_nearest(weight, bits: int, group: int):
    """`weight` [out, in] rounded to `bits` per output row and group of `group` input columns."""
    import torch

    top = 2 ** bits - 1
    parts = []
    for part in torch.split(weight, group or weight.shape[1], dim=1):
        low, high = part.min(dim=1, keepdim=True).values, part.max(dim=1, keepdim=True).values
        scale = torch.clamp((high - low) / top, min=1e-12)
        zero = torch.round(-low / scale)
        parts.append((torch.clamp(torch.round(part / scale) + zero, 0, top) - zero) * scale)
    return torch.cat(parts, dim=1)


def decoder_matmuls(model) -> dict:
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}


def score(model, windows: list[list[int]], references: list[Path]) -> dict:
    import torch

    from pipeline.stages.quality import compare, summarize

    parts = []
    for window, reference in zip(windows, references):
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]])).logits[0].numpy()
        with np.load(reference) as ref:
            parts.append(compare(ref["logp"].astype(np.float64), logits, np.array(window[1:], np.int64)))
    return summarize({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build")
    args = parser.parse_args()

    from pipeline.fsutil import read_json
    from pipeline.graph.build_config import parse_build_config
    from pipeline.graph.tasks import Paths
    from pipeline.stages.verify import reference_model

    build = parse_build_config({"model": args.model, "seq": str(args.seq), "build_dir": str(args.build_dir),
                                "dist_dir": str(args.build_dir / "dist")})
    paths = Paths(build)
    quality = paths.seq / "quality"
    windows = read_json(quality / "text.json")["windows"]
    references = [quality / "reference" / f"w{k}.npz" for k in range(len(windows))]
    model = reference_model(read_json(paths.export_config), Path(read_json(paths.source)["folder"]),
                            read_json(paths.tensor_map), build.model.family)
    matmuls = decoder_matmuls(model)
    originals = {name: m.weight.detach().clone() for name, m in matmuls.items()}
    rows = {"fp32 (the reference itself)": score(model, windows, references)}
    for label, bits, group, ragged in QUANTIZERS:
        for name, m in matmuls.items():
            width = originals[name].shape[1]
            if ragged or not group or width % group == 0:
                m.weight.data = round_to_nearest(originals[name], bits, group)
        rows[label] = score(model, windows, references)
        for name, m in matmuls.items():
            m.weight.data = originals[name].clone()

    report = quality / "report.json"
    tpu = json.loads(report.read_text())["modes"] if report.exists() else {}
    lines = [f"# Round to nearest against TPU-MLIR's weights: {args.model}, seq {args.seq}", "",
             f"{datetime.date.today()}; {rows['fp32 (the reference itself)']['scored_tokens']} tokens "
             f"({len(windows)} windows), the windows and reference of `doit quality`; ± is one standard error.", "",
             "| weights | PPL ratio | mean KL | KL p99 | same top-1 |", "|---|---|---|---|---|"]
    for label, m in [*rows.items(), *((f"TPU-MLIR: `{k}`", v) for k, v in tpu.items() if k.endswith("-weights"))]:
        lines.append(f"| {label} | {m['ppl_ratio']:.4f} ± {m['ppl_ratio_se']:.4f} | {m['kl_mean']:.5f} ± "
                     f"{m['kl_mean_se']:.5f} | {m['kl_p99']:.4f} | {100 * m['same_top1']:.2f} ± "
                     f"{100 * m['same_top1_se']:.2f} % |")
    publish("\n".join(lines) + "\n", f"quality_rtn_{args.model}.md")


if __name__ == "__main__":
    main()
