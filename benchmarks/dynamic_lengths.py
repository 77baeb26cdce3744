"""A dynamic build's first prefill net at every prompt length, on the simulator, against
onnxruntime: which lengths give NaN rows, and the cosine of the others. With --llm-convert, the
`block_0` of an `llm_convert.py --dynamic` build of the same checkpoint at the same lengths
(its net takes no mask: it builds its causal mask inside), side by side; with --also, any other
`block_0.bmodel` of ours (e.g. the build's MLIR deployed with other model_deploy.py options).

    .venv/bin/python benchmarks/dynamic_lengths.py [--model smollm2-135m] [--seq 128] [--mode bf16]
        [--lengths 90-128] [--build-dir DIR] [--llm-convert OUT/<name>_dynamic] [--also LABEL=BMODEL]
Needs the build (`doit build ... dynamic=1`; the ONNX pieces and the dynamic deploy). Prints a
Markdown table and writes it to benchmarks/results/dynamic_lengths_<model>.md.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402

RIGHT = 0.999  # a cosine below it is a wrong output (a right bf16 block_0 gives 0.99999)


def lengths(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def run_lengths(bmodel: Path, onnx, hidden: np.ndarray, ns: list[int], with_mask: bool) -> dict[int, tuple]:
    """Per length n: (NaN rows of the hidden output, its cosine against onnxruntime, the simulator's
    seconds for it)."""
    from pipeline.stages.verify import cosine_similarity
    from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
    from runtime.engine import prefill_mask

    found = {}
    with IsolatedBmodelBackend(bmodel, whole_model=False) as backend:
        for n in ns:
            feeds = {"input_states": hidden[:, :n], "position_ids": np.arange(n, dtype=np.int32)[None]}
            mask = {"attention_mask": prefill_mask(n, n)}
            reference = onnx.run("block_0", {**feeds, **mask})[0]
            before = backend.seconds
            got = backend.run("block_0", {**feeds, **(mask if with_mask else {})})[0]
            bad = int(np.isnan(got).any(axis=-1).sum())
            cosine = cosine_similarity(reference.astype(np.float64).ravel(), got.astype(np.float64).ravel())
            found[n] = (bad, cosine, backend.seconds - before)
            print(f"{bmodel.name} at {n}: {bad} NaN rows, cosine {cosine:.6f}", flush=True)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mode", default="bf16")
    parser.add_argument("--lengths", default="1-128", help="a length or a range, e.g. 90-128")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build")
    parser.add_argument("--llm-convert", type=Path, help="an llm_convert.py --dynamic output folder (its block_0/)")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=BMODEL",
                        help="another block_0 bmodel with our inputs, in a column of its own")
    args = parser.parse_args()

    from pipeline.graph.build_config import parse_build_config
    from pipeline.graph.tasks import Paths
    from runtime.engine import pad_ids
    from runtime.onnx_backend import OnnxBackend

    build = parse_build_config({"model": args.model, "seq": str(args.seq), "mode": args.mode, "dynamic": "1",
                                "build_dir": str(args.build_dir), "dist_dir": str(args.build_dir / "dist")})
    paths = Paths(build)
    onnx = OnnxBackend(paths.onnx)
    text = paths.seq / "quality" / "text.json"  # a real text where doit quality left one, else token ids 1..seq
    ids = json.loads(text.read_text())["windows"][0][:args.seq] if text.exists() else list(range(1, args.seq + 1))
    (hidden,) = onnx.run("embedding", {"input_ids": pad_ids(ids, args.seq)})
    ns = lengths(args.lengths)
    columns = {f"ours ({build.variant})": run_lengths(paths.deploy / "block_0.bmodel", onnx, hidden,
                                                      ns, with_mask=True)}
    for also in args.also:
        label, _, bmodel = also.partition("=")
        columns[label] = run_lengths(Path(bmodel), onnx, hidden, ns, with_mask=True)
    if args.llm_convert:
        columns["llm_convert.py --dynamic"] = run_lengths(args.llm_convert / "block_0" / "block_0.bmodel", onnx,
                                                          hidden, ns, with_mask=False)
    lines = [f"# A dynamic block_0 at each prompt length: {args.model}, seq {args.seq}, {args.mode}", "",
             f"{datetime.date.today()}; the simulator against onnxruntime, on the embedded "
             f"{'scoring text' if text.exists() else 'token ids 1..seq'}. A cell: NaN rows of the hidden "
             f"output, or the cosine when there are none (in bold below {RIGHT}: wrong).", "",
             "| length | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for n in ns:
        cells = [f"**{bad} NaN rows**" if bad else f"**{cosine:.6f}**" if cosine < RIGHT else f"{cosine:.6f}"
                 for bad, cosine, _ in (c[n] for c in columns.values())]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for name, found in columns.items():
        bad = [n for n in ns if found[n][0] or not found[n][1] >= RIGHT]
        seconds = sum(found[n][2] for n in ns)
        lines.append(f"\n{name}: wrong at {len(bad)} of {len(ns)} lengths" + (f" ({bad})" if bad else "")
                     + f"; the simulator ran them in {seconds:.1f} s")
    publish("\n".join(lines) + "\n", f"dynamic_lengths_{args.model}.md")


if __name__ == "__main__":
    main()
