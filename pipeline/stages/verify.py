"""Verify stage: every ONNX piece in onnxruntime against its torch module on real activations,
then a whole greedy decode through the ONNX pieces against transformers' `generate()`.

Real activations: a real prompt, tokenized by the checkpoint's tokenizer, passed through the
torch pieces in order; each piece's ONNX gets exactly the inputs its torch module got.
"""
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from runtime.engine import Engine, HostWalk, penalty_window
from runtime.nets import Dims, ModelInfo, io_spec
from runtime.onnx_backend import OnnxBackend
from runtime.tokenizer import load_tokenizer

from ..errors import PipelineError
from ..families import get_family
from ..fsutil import read_json, write_json, write_text
from ..model.checkpoint import Checkpoint
from ..progress import say

PROMPT = "Give me a short introduction to large language models."
SYSTEM = "You are a helpful assistant."
NEW_TOKENS = 16
ANSWER_TOKENS = 24        # the longest answer compared, for models with verify_prompts
MIN_COSINE = 0.99999      # fp32 against fp32: anything less is a broken export
MAX_ABS_RELATIVE = 1e-3   # max abs error, relative to the largest reference value (at least 1)
# the sample head's check: every part of its rule at work (a penalty, a temperature, top-k and top-p cuts)
SAMPLE_CHECK = {"penalty": np.array([1.3], np.float32), "temperature": np.array([0.8], np.float32),
                "top_k": np.array([40], np.int32), "top_p": np.array([0.9], np.float32)}


def chatml(prompt: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def compare(ref: np.ndarray, got: np.ndarray, min_cosine: float = MIN_COSINE,
            max_abs_relative: float = MAX_ABS_RELATIVE) -> dict:
    """`got` (the candidate) against `ref` (the reference). NaN or inf on either side fails, with
    their counts instead of a cosine and a max abs error, which they would make meaningless."""
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    nonfinite = {"reference": int(ref.size - np.isfinite(ref).sum()),
                 "candidate": int(got.size - np.isfinite(got).sum())}
    if any(nonfinite.values()):
        return {"cosine": None, "max_abs": None, "ref_max": None, "size": ref.size, "nonfinite": nonfinite, "ok": False}
    cosine, max_abs = cosine_similarity(ref, got), float(np.max(np.abs(ref - got), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    return {"cosine": cosine, "max_abs": max_abs, "ref_max": scale,
            "ok": cosine >= min_cosine and max_abs <= max_abs_relative * scale}


def compare_exact(ref: np.ndarray, got: np.ndarray) -> dict:
    """Token ids: the same ids, or a failure (a near id is no nearer to right)."""
    same = ref.shape == got.shape and bool(np.array_equal(ref, got))
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)), initial=0.0)) if ref.shape == got.shape \
        else float("inf")
    return {"cosine": 1.0 if same else 0.0, "max_abs": diff, "ref_max": float(np.max(np.abs(ref), initial=0)),
            "ok": same}


def cosine_similarity(ref: np.ndarray, got: np.ndarray) -> float:
    """Two all-zero outputs (a zeroed projection gives them) are identical: cosine 1, not 0."""
    norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
    if norms == 0.0:
        return 1.0 if not ref.any() and not got.any() else 0.0
    return float(ref @ got / norms)


def nonfinite_words(r: dict, labels: dict) -> str:
    """Where the NaN and inf values of a failed comparison are, e.g. 'NaN or inf: none in the
    reference (torch), 12 of 2048 values in the candidate (onnxruntime)'."""
    return "NaN or inf: " + ", ".join(
        f"{r['nonfinite'][side]} of {r['size']} values in the {side} ({labels[side]})" if r["nonfinite"][side]
        else f"none in the {side} ({labels[side]})" for side in ("reference", "candidate"))


class _Pieces:
    """torch pieces built one at a time from the checkpoint (only their own tensors)."""

    def __init__(self, config: dict, source: Path, mapping: dict):
        import torch

        from ..model.torch_pieces import build_piece

        ckpt = Checkpoint(source)
        self._build = lambda kind, layer: build_piece(
            kind, layer, config, lambda n: ckpt.mapped(mapping, n).to(torch.float32))

    def run(self, kind: str, layer: int | None, feeds: dict) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self._build(kind, layer)(*(torch.from_numpy(v) for v in feeds.values()))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def new_tokens_for(seq: int) -> int:
    """Greedy steps of the decode checks: NEW_TOKENS, or half the window at a short seq, so that
    the prompt keeps the other half."""
    return min(NEW_TOKENS, seq // 2)


def prompt_ids(source: Path, seq: int, new_tokens: int) -> list[int]:
    try:
        tokenizer = load_tokenizer(source)
    except FileNotFoundError as err:
        raise PipelineError(f"cannot verify on a real prompt: {err}") from None
    ids = tokenizer.encode(chatml(PROMPT))
    return ids[-(seq - new_tokens):]  # keep the end of the prompt if seq is short


class _Compared:
    """A backend for the engine's host walk that runs each net on two sides: `reference(piece,
    feeds)` gives the outputs that go on to the next net, `candidate(piece, feeds)` is judged
    against them (once per piece file; token ids must be equal). A decode stage is told from the
    whole-cache net by the length of the history it is given."""

    def __init__(self, dims: Dims, reference, candidate, judge, progress):
        self.info = ModelInfo.from_manifest(dims.runtime_info())
        self.dims, self.pieces = dims, {(p.name, p.stage): p for p in dims.pieces()}
        self.reference, self.candidate, self.judge, self.progress = reference, candidate, judge, progress
        self.results = {}

    def piece(self, net: str, feeds: dict):
        stage = feeds["history_k"].shape[1] if "history_k" in feeds and net.startswith("block_cache_") else 0
        return self.pieces[net, 0 if stage == self.dims.seq else stage]

    def run(self, net: str, feeds: dict) -> list[np.ndarray]:
        start, piece = time.perf_counter(), self.piece(net, feeds)
        ref = self.reference(piece, feeds)
        if piece.file not in self.results:
            got = self.candidate(piece, feeds)
            self.results[piece.file] = {
                name: compare_exact(r, g) if np.issubdtype(np.asarray(r).dtype, np.integer) else self.judge(piece.kind, r, g)
                for name, r, g in zip(io_spec(piece.kind, self.dims.of(piece))[1], ref, got, strict=True)}
            self.progress(piece.file, time.perf_counter() - start)
        return ref


def walk_pieces(dims: Dims, ids: list[int], reference, candidate, judge, progress) -> dict:
    """Run every piece on the activations of `ids` (prefill), of the heads on its logits, and of
    its next token (decode): the engine's walk, each net judged on the way (see _Compared). With
    history nets (dims.chunk), a next turn follows: a whole chunk of new tokens (the prompt's own,
    again) prefilled against the cache of the prompt and its answer's first token. Then the token
    again through every decode stage, the longest first, at the last position it holds of the
    cache filled so far (so each step reads only slots no earlier step wrote)."""
    compared = _Compared(dims, reference, candidate, judge, progress)
    walk = HostWalk(compared)  # its plan sees no history nets: the prompt goes through block_i
    walk.prefill(ids)
    logits = walk.logits()[None]
    compared.run("greedy_head", {"logits": logits})
    compared.run("sample_head", {"logits": logits, "input_ids": penalty_window(ids, dims.seq), **SAMPLE_CHECK})
    token = int(np.argmax(logits))
    walk.decode(token, len(ids))
    filled = len(ids) + 1
    if dims.chunk:
        walk.info = replace(walk.info, history=dims.chunk)
        conversation = next_turn(ids, token, dims)
        walk.prefill(conversation, filled)
        filled = len(conversation)
    for stage in (dims.seq, *reversed(dims.stages)):
        walk.info = replace(walk.info, stages=(stage, dims.seq))
        walk.decode(token, min(stage, filled))
    return compared.results


def next_turn(ids: list[int], token: int, dims: Dims) -> list[int]:
    """The conversation after `ids` and `token`, with next_turn_tokens new tokens."""
    room = next_turn_tokens(len(ids), dims)
    return ids + [token] + (ids * (room // len(ids) + 1))[:room]


def next_turn_tokens(prompt: int, dims: Dims) -> int:
    """The new tokens of next_turn: a whole chunk, or as many as the window leaves room for."""
    return min(dims.chunk, dims.seq - prompt - 2)


def check_pieces(config: dict, source: Path, mapping: dict, onnx_dir: Path, ids: list[int], progress,
                 chunk: int = 0, stages: tuple[int, ...] = ()) -> dict:
    """Each ONNX piece in onnxruntime against its torch module, fed the torch pipeline's activations.
    The files as exported (what the TPU compiler gets), not the runtime's exact-length rewrite."""
    torch_pieces, onnx = _Pieces(config, source, mapping), OnnxBackend(onnx_dir, chunk=chunk, exact=False)

    def candidate(piece, feeds):
        outputs = onnx.run(piece.name, feeds)
        onnx.close()  # one session at a time: memory follows the largest piece
        return outputs

    return walk_pieces(Dims.from_config(config, chunk, stages), ids,
                       lambda piece, feeds: torch_pieces.run(piece.kind, piece.layer, feeds), candidate,
                       lambda kind, ref, got: compare(ref, got), progress)


def reference_model(config: dict, source: Path, mapping: dict, family: str):
    """transformers' own model of the checkpoint: what the verification compares against."""
    return get_family(family).reference_model(config, source, mapping)


def reference_generate(config: dict, source: Path, mapping: dict, family: str, ids: list[int], new_tokens: int):
    """Greedy tokens of transformers' generate(), and the logits after the prompt."""
    import torch

    model = reference_model(config, source, mapping, family)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=new_tokens, max_new_tokens=new_tokens)
        first_logits = model(torch.tensor([ids])).logits[0, -1].numpy()
    return out[0, len(ids):].tolist(), first_logits


def model_bytes_fp32(source: Path) -> int:
    ckpt = Checkpoint(source)
    return sum(4 * int(np.prod(info["shape"])) for _, info in ckpt.tensor_index.values())


def decode_check(config, source, mapping, family, onnx_dir, ids, new_tokens, chunk: int = 0,
                 stages: tuple[int, ...] = ()) -> dict:
    import psutil

    need = int(model_bytes_fp32(source) * 2.5)  # transformers' model + every onnxruntime session
    available = psutil.virtual_memory().available
    if need > available:
        return {"run": False, "reason": f"needs about {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
    start = time.perf_counter()
    ref_tokens, ref_logits = reference_generate(config, source, mapping, family, ids, new_tokens)
    engine = Engine(OnnxBackend(onnx_dir, chunk=chunk, stages=stages))  # the prompt may go in chunks
    onnx_tokens = engine.greedy(ids, new_tokens)
    engine.prefill(ids)
    onnx_logits = engine.logits()
    return {"run": True, "reference": ref_tokens, "onnx": onnx_tokens, "match": ref_tokens == onnx_tokens,
            "first_logits_max_abs": compare(ref_logits, onnx_logits)["max_abs"],  # None: NaN or inf
            "seconds": round(time.perf_counter() - start, 2)}


def answer_prompts(source: Path, prompts: list[str], seq: int) -> list[dict]:
    """Each question in the model's own chat format (its template, as users get it in the CLI)."""
    from runtime.chat_format import Message
    from runtime.chat_format import prompt_ids as chat_prompt_ids

    tokenizer = load_tokenizer(source)
    out = []
    for question in prompts:
        ids = chat_prompt_ids(tokenizer, [Message("user", question)])
        if len(ids) + ANSWER_TOKENS > seq:
            raise PipelineError(f"verify prompt {question!r} takes {len(ids)} tokens; with {ANSWER_TOKENS} for the "
                                f"answer that exceeds seq {seq}: build with a larger seq=")
        out.append({"prompt": question, "ids": ids})
    return out


def answers_check(config, source, mapping, family, onnx_dir, questions: list[dict], chunk: int = 0,
                  stages: tuple[int, ...] = ()) -> list[dict]:
    """Each question answered greedily by transformers' generate() and by the ONNX pieces."""
    import torch

    from runtime.generate import stop_ids

    tokenizer = load_tokenizer(source)
    stops = stop_ids(tokenizer)
    model = reference_model(config, source, mapping, family)
    engine = Engine(OnnxBackend(onnx_dir, chunk=chunk, stages=stages))  # a question may reuse the cached start
    results = []
    for q in questions:
        with torch.no_grad():
            out = model.generate(torch.tensor([q["ids"]]), attention_mask=torch.ones(1, len(q["ids"]), dtype=torch.long),
                                 do_sample=False, eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0],
                                 max_new_tokens=ANSWER_TOKENS)
        reference = out[0, len(q["ids"]):].tolist()
        onnx = engine.greedy(q["ids"], ANSWER_TOKENS, stops)
        results.append({**q, "reference": reference, "onnx": onnx, "match": reference == onnx,
                        "answer": tokenizer.decode(reference, skip_special=True)})
    return results


LABELS = {"reference": "torch", "candidate": "onnxruntime"}  # what compare() saw on each side, here


def piece_failures(pieces: dict, labels: dict = LABELS) -> list[str]:
    """Every output of every piece that failed its comparison, in words."""
    return [f"{net}.{out}: " + (nonfinite_words(r, labels) if "nonfinite" in r else
                                f"cosine {r['cosine']:.6f}, max abs {r['max_abs']:.3g} (ref max {r['ref_max']:.3g})")
            + (f"; against the weights the bmodel holds: {_quantization_words(r['quantization'])}"
               if "quantization" in r else "")
            for net, outs in pieces.items() for out, r in outs.items() if not r["ok"]]


def _quantization_words(q: dict) -> str:
    """verify_sim.explain_misses' second comparison, in words."""
    if "unavailable" in q:
        return f"not compared: {q['unavailable']}"
    if q["cosine"] is None:
        return "NaN or inf"
    return (f"cosine {q['cosine']:.6f}, max abs {q['max_abs']:.3g} (ref max {q['ref_max']:.3g}); "
            f"those weights against fp32: cosine {q['weights_cosine']:.6f}")


def pieces_table(pieces: dict, digits: int) -> list[str]:
    """Markdown rows: one per output of every piece."""
    lines = ["| piece | output | cosine | max abs error | reference max | ok |", "|---|---|---|---|---|---|"]
    for net, outs in pieces.items():
        for out, r in outs.items():
            if "nonfinite" in r:
                n = r["nonfinite"]
                lines.append(f"| {net} | {out} | - | - | - | **NO**: NaN or inf in {n['reference']} reference and "
                             f"{n['candidate']} candidate values of {r['size']} |")
                continue
            verdict = "yes" if r["ok"] else "**NO**"
            if "quantization" in r:  # below the mode's thresholds: the weights as quantized, compared
                q = r["quantization"]
                verdict += ("" if "unavailable" in q else ": the quantization's loss" if r["ok"] else
                            ": the build's error") + f" (against the weights the bmodel holds: {_quantization_words(q)})"
            lines.append(f"| {net} | {out} | {r['cosine']:.{digits}f} | {r['max_abs']:.2e} | {r['ref_max']:.3g} | "
                         f"{verdict} |")
    return lines


def summarize(report: dict) -> list[str]:
    """The failures of a report, in words (empty when everything passed)."""
    failures = piece_failures(report["pieces"])
    decode = report["decode"]
    if decode.get("run") and not decode["match"]:
        failures.append(f"greedy tokens differ: onnx {decode['onnx']} vs transformers {decode['reference']}")
    failures += [f"answer to {a['prompt']!r} differs: onnx {a['onnx']} vs transformers {a['reference']}"
                 for a in report.get("answers", []) if not a["match"]]
    return failures


def markdown(report: dict) -> str:
    lines = [f"# Verification of {report['model']} (seq {report['seq']})", "",
             f"Prompt: {len(report['prompt_ids'])} tokens of a ChatML prompt; thresholds: cosine >= {MIN_COSINE}, "
             f"max abs <= {MAX_ABS_RELATIVE} x max(1, |reference|).", "", *pieces_table(report["pieces"], 7)]
    d = report["decode"]
    lines += ["", "## Greedy decode: onnxruntime pieces vs transformers generate()", ""]
    if d.get("run"):
        lines += [f"- tokens ({len(d['reference'])}): {'identical' if d['match'] else '**differ**'}",
                  f"- transformers: {d['reference']}", f"- onnx pieces:  {d['onnx']}",
                  "- first-token logits, max abs difference: " + (
                      f"{d['first_logits_max_abs']:.2e}" if d["first_logits_max_abs"] is not None else "NaN or inf")]
    else:
        lines.append(f"- not run: {d['reason']}")
    if report.get("answers"):
        lines += ["", "## Answers: onnxruntime pieces vs transformers generate() (greedy, the model's chat format)", "",
                  "| question | transformers' answer | tokens | onnx pieces |", "|---|---|---|---|"]
        lines += [f"| {a['prompt']} | {a['answer']!r} | {len(a['reference'])} | "
                  f"{'identical' if a['match'] else '**differs**'} |" for a in report["answers"]]
    failures = summarize(report)
    lines += ["", f"**Result: {'PASS' if not failures else 'FAIL'}**"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def run(build, paths, pieces, tools: dict) -> None:
    """The verify stage: every ONNX piece against torch, the greedy decode against transformers, and
    the model's questions where it has some; a report, and a failure naming what failed."""
    config, mapping = read_json(paths.export_config), read_json(paths.tensor_map)
    source = Path(read_json(paths.source)["folder"])
    done = []

    def progress(net, seconds):
        done.append(net)
        say(f"[verify {len(done)}/{len(pieces)}] {net} {seconds:.1f} s")

    new_tokens = new_tokens_for(config["seq_length"])
    ids = prompt_ids(source, config["seq_length"], new_tokens)
    report = {"model": build.model.name, "seq": build.seq, "prompt_ids": ids, "tools": tools,
              "pieces": check_pieces(config, source, mapping, paths.onnx, ids, progress, build.history_chunk,
                                     build.stages)}
    say("[verify] greedy decode: onnx pieces vs transformers generate() ...")
    report["decode"] = decode_check(config, source, mapping, build.model.family, paths.onnx, ids, new_tokens,
                                    build.history_chunk, build.stages)
    if build.model.verify_prompts and report["decode"]["run"]:
        say(f"[verify] answers to {len(build.model.verify_prompts)} questions: onnx pieces vs transformers ...")
        questions = answer_prompts(source, build.model.verify_prompts, config["seq_length"])
        report["answers"] = answers_check(config, source, mapping, build.model.family, paths.onnx, questions,
                                          build.history_chunk, build.stages)
    write_json(paths.report, report)
    write_text(paths.report.with_suffix(".md"), markdown(report))
    failures = summarize(report)
    if failures:
        raise PipelineError(f"verification failed ({paths.report.with_suffix('.md')}):\n  " + "\n  ".join(failures))
    decode = report["decode"]
    say(f"[verify] PASS: {len(pieces)} pieces; greedy decode "
        + (f"{len(decode['onnx'])} tokens identical" if decode["run"] else f"not run ({decode['reason']})")
        + f"; report {paths.report.with_suffix('.md')}")
