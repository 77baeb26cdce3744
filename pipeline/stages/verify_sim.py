"""Verification on the BM1684X simulator (cmodel), as part of `doit verify`:
  1. each deployed one-piece bmodel against onnxruntime on the same real activations (the ONNX
     pipeline's, on the verify prompt), with thresholds per mode;
  2. the combined bmodel decoding greedily, token by token against the ONNX pipeline.
One-device pieces run in a toolchain process (pyruntime_bm, a Python 3.10 extension). The combined
bmodel, and multi-device pieces, run through the BM runtime's C API (runtime/bmrt.py) in a child
process, the combined one with its state on the device as the chat runs it: pyruntime_bm aborts on
multi-device nets, while bmrt_launch_tensor_ex runs every device's part on the one simulated chip. Either way the simulator gets a process of its own, stopped when the check ends: a
process that loaded a bmodel on the simulator keeps both cores busy until it exits
(pipeline/toolchain/isolated_backend.py), which would slow every later stage of the build."""
import re
import time
from pathlib import Path

import numpy as np

from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
from runtime.engine import Engine
from runtime.nets import DYNAMIC_KINDS, Dims
from runtime.onnx_backend import OnnxBackend

from ..errors import PipelineError
from ..families import get_family
from ..families.base import THRESHOLDS
from ..fsutil import read_json, write_json, write_text
from ..progress import say
from ..toolchain.install import ensure_toolchain
from ..toolchain.pyruntime_backend import PyruntimeBackend
from ..toolchain.tools import Worker
from .compile import float_type, weights_quantized
from .layer_template import program_key
from .verify import compare, next_turn_tokens, piece_failures, pieces_table, walk_pieces

LABELS = {"reference": "onnxruntime", "candidate": "simulator"}  # what compare() saw on each side, here

EXACT_TOKENS_MODES = ("bf16", "f16")  # a float build must choose the same token as fp32 ...
TIE_MARGIN = 0.1  # ... wherever the fp32 top-2 logits are at least this far apart


class Simulator:
    """The bmodels of one check on the simulator, in processes of their own, all stopped by close():
    one toolchain process for every one-device bmodel; for multi-device ones, a child process per
    bmodel, one at a time (each would keep its own simulator threads spinning)."""

    def __init__(self, log_dir: Path, devices: int = 1):
        self.log_dir, self.devices = Path(log_dir), devices
        self.process: Worker | None = None
        self.isolated: IsolatedBmodelBackend | None = None

    def open(self, bmodel: Path, whole_model: bool = True):
        """A whole bmodel runs as users run it: the BM runtime's C API, the state on the device
        (runtime/device_walk.py). One-piece bmodels run in the shared toolchain process."""
        if whole_model or self.devices > 1:
            if whole_model:  # the pieces are done: a toolchain process that ran them would keep spinning
                self._close_process()
            self._close_isolated()
            self.isolated = IsolatedBmodelBackend(bmodel, whole_model=whole_model)
            return self.isolated
        if self.process is None:
            self.process = Worker(ensure_toolchain().prefix, self.log_dir.resolve() / "simulator.log")
        return PyruntimeBackend(bmodel, process=self.process, whole_model=whole_model)

    def _close_isolated(self) -> None:
        if self.isolated is not None:
            self.isolated.close()
            self.isolated = None

    def _close_process(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None

    def close(self) -> None:
        self._close_isolated()
        self._close_process()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_pieces(thresholds: tuple[float, float], dims: Dims, onnx_dir: Path, deploy_dir: Path, ids: list[int],
                 sim: Simulator, progress, dynamic: bool = False) -> tuple[dict, dict]:
    """Every deployed piece on the verify prompt's activations. In a dynamic build, the first
    prefill piece of each kind runs over the whole window and at other lengths too (`<net> at
    length <m>`, lengths_to_check); the other layers of that kind are the same program (the
    compiler sees shapes, not weight values), and run with their own weights at the prompt's
    length, as the runtime runs them. A run at fewer rows is judged on those rows.
    Returns the comparisons, and what each one ran (piece, the window's feeds, simulator outputs)."""
    onnx, at_lengths = OnnxBackend(onnx_dir, chunk=dims.chunk, stages=dims.stages, exact=False), {}  # the files
    min_cosine, max_rel = thresholds
    runs, programs_at_lengths = {}, set()

    def judge(kind, ref, got):
        return compare(first_rows(ref, got), got, min_cosine, max_rel)

    def candidate(piece, feeds):  # each piece runs once (a dynamic one once per length)
        net, backend = piece.name, sim.open(deploy_dir / f"{piece.file}.bmodel", whole_model=False)
        run_feeds = feeds  # the whole window, unless a later dynamic layer runs at the prompt's length
        if dynamic and piece.kind in DYNAMIC_KINDS:
            # the tokens the walk gave it: the prompt, or the next turn's
            length = next_turn_tokens(len(ids), dims) if piece.kind == "block_kv" else len(ids)
            if program_key(piece) in programs_at_lengths:
                run_feeds = prefill_rows(feeds, length)
            else:
                programs_at_lengths.add(program_key(piece))
                at_lengths_of(piece, feeds, length, backend)
        runs[piece.file] = (piece, feeds, backend.run(net, run_feeds))
        return runs[piece.file][2]

    def at_lengths_of(piece, feeds, length, backend):
        reference = onnx.run(piece.name, feeds)
        for rows in lengths_to_check(length, feeds["input_states"].shape[1]):
            got = backend.run(piece.name, prefill_rows(feeds, rows))
            key = f"{piece.file} at length {rows}"
            at_lengths[key] = {name: judge(piece.kind, r, g) for name, r, g in zip(
                ("hidden_states", "past_k", "past_v"), reference, got, strict=True)}
            runs[key] = (piece, feeds, got)

    pieces = walk_pieces(dims, ids, lambda piece, feeds: onnx.run(piece.name, feeds), candidate, judge, progress)
    return {**pieces, **at_lengths}, runs


def first_rows(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """The reference's rows (axis 1: the tokens) that a dynamic net run at fewer rows gave."""
    return reference[:, :got.shape[1]] if reference.shape != got.shape else reference


def lengths_to_check(length: int, window: int) -> list[int]:
    """Where a dynamic prefill net is checked: one token, half the prompt, the prompt, and lengths
    in the upper half of its window (the rows past the prompt are its padding, which the causal
    mask keeps out of the rows before), where TPU-MLIR's layer groups once gave NaN rows
    (compile.deploy_args)."""
    upper = {window // 2 + 1, 3 * window // 4 + 1, window - 1}
    return sorted(n for n in {1, max(1, length // 2), length} | upper if 1 <= n < window or n == length)


def explain_misses(mode: str, results: dict, runs: dict, onnx_dir: Path, dequantized_net) -> int:
    """In a quantized mode, each output that missed the mode's thresholds against fp32 is compared
    again: against the same net with the weights the bmodel holds (`dequantized_net(piece)`,
    pipeline/stages/quantized_weights.py), within the thresholds of the mode's float type. Matching it,
    the loss is the quantization's, not the build's: the output passes, and its entry says so
    (`quantization`: the simulator against that net, and that net against fp32). Returns how many
    outputs were explained so."""
    import onnxruntime as ort

    if dequantized_net is None:
        return 0
    float_thresholds, sessions, explained = THRESHOLDS[float_type(mode).lower()], {}, 0
    for key, outputs in results.items():
        missed = [name for name, r in outputs.items() if not r["ok"] and r.get("cosine") is not None]
        if not missed or key not in runs or not weights_quantized(runs[key][0], mode):
            continue
        piece, feeds, got = runs[key]
        say(f"[verify {mode} on the simulator] {key}: {', '.join(missed)} below the thresholds against fp32; "
            "against the weights the bmodel holds ...")
        if piece.file not in sessions:
            sessions[piece.file] = _sessions(piece, onnx_dir, dequantized_net)
        fp32, quantized = sessions[piece.file]
        if not isinstance(quantized, ort.InferenceSession):  # no such net (why, or None): the miss stays the build's
            for name in missed:
                outputs[name]["quantization"] = {"unavailable": quantized or "none of its weights is quantized"}
            continue
        feed = {i.name: feeds[i.name] for i in fp32.get_inputs()}
        named = dict(zip(outputs, zip(fp32.run(None, feed), quantized.run(None, feed), got, strict=True)))
        for name in missed:
            reference, weights, simulated = named[name]
            reference, weights = first_rows(reference, simulated), first_rows(weights, simulated)
            check = compare(weights, simulated, *float_thresholds)
            check["weights_cosine"] = compare(reference, weights)["cosine"]  # what the quantization costs
            outputs[name]["quantization"] = check
            outputs[name]["ok"] = check["ok"]
            explained += check["ok"]
    return explained


def _sessions(piece, onnx_dir: Path, dequantized_net) -> tuple:
    """onnxruntime on the piece's fp32 net and on it with the quantized weights; instead of the
    second, why there is none (the lowering failed, or its weights are not the ONNX net's), or None
    if none of its weights is quantized."""
    import onnxruntime as ort

    try:
        model, replaced = dequantized_net(piece)
    except PipelineError as err:
        say(f"[verify on the simulator] {piece.file}: no comparison with its quantized weights: {err}")
        return None, str(err)
    if not replaced:
        return None, None
    return (ort.InferenceSession(str(onnx_dir / f"{piece.file}.onnx"), providers=["CPUExecutionProvider"]),
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]))


def prefill_rows(feeds: dict, rows: int) -> dict:
    """A prefill net's inputs for its first `rows` tokens (a causal net's outputs for them do not
    depend on the later rows). A history prefill gets the cache's filled slots only, as the
    runtime gives a dynamic one (engine.prefill_plan)."""
    out = {"input_states": feeds["input_states"][:, :rows], "position_ids": feeds["position_ids"][:, :rows]}
    if "history_k" not in feeds:
        return {**out, **({"attention_mask": feeds["attention_mask"][:, :, :rows, :rows]} if "attention_mask" in feeds
                          else {})}
    seq, begin = feeds["history_k"].shape[1], int(feeds["position_ids"][0, 0])  # the first new token's position
    mask = feeds["attention_mask"][:, :, :rows]
    return {**out, "attention_mask": np.concatenate([mask[..., :begin], mask[..., seq:seq + rows]], axis=-1),
            "history_k": feeds["history_k"][:, :begin], "history_v": feeds["history_v"][:, :begin]}


def margins_of(logits: list[np.ndarray]) -> list[float]:
    """Each step's fp32 top-2 margin: how decisive the reference's choice was."""
    return [float(np.diff(np.sort(lg)[-2:])[0]) for lg in logits]


def decode_check(mode: str, simulated: Engine, ids: list[int], ref_logits: list[np.ndarray],
                 first_logits: np.ndarray | None = None) -> dict:
    """The combined bmodel decodes the ONNX pipeline's greedy path after `ids` (`ref_logits`, one
    per step; teacher forcing: both see the same tokens, so one flipped near-tie does not derail
    every later step) and each step's greedy choice is compared. A float build must agree wherever
    the reference's top-2 margin is above TIE_MARGIN; closer calls are reported, not required.
    `first_logits`: the engine's cache already holds `ids` (an answer's teacher-forced prefill gave
    these logits at its last position), so the steps continue from there, with no prefill of their own."""
    reference, margins = [int(np.argmax(lg)) for lg in ref_logits], margins_of(ref_logits)
    start, simulator_before = time.perf_counter(), simulated.backend.seconds
    if first_logits is None:
        sim_logits = simulated.logits_along(ids, len(reference), reference)
    else:
        simulated.rewind(len(ids))
        sim_logits = [first_logits]
        for token in reference[:-1]:
            simulated.decode(token)
            sim_logits.append(simulated.logits())
    chosen = [int(np.argmax(lg)) for lg in sim_logits]
    agree = [a == b for a, b in zip(chosen, reference)]
    return {"run": True, "prompt_tokens": len(ids), "onnx": reference, "simulator": chosen,
            "margins": [round(m, 4) for m in margins],
            "agree": sum(agree), "free_running_prefix": agree.index(False) if False in agree else len(agree),
            "decisive_disagreements": [k for k, (ok, m) in enumerate(zip(agree, margins))
                                       if not ok and m >= TIE_MARGIN],
            "logits_cosine_min": _lowest_cosine(ref_logits, sim_logits),
            "exact_required": mode in EXACT_TOKENS_MODES, "seconds": round(time.perf_counter() - start, 1),
            "simulator_seconds": round(simulated.backend.seconds - simulator_before, 1),
            "after": "the last answer's prefill" if first_logits is not None else "a prefill of its own"}


def _lowest_cosine(ref_logits: list[np.ndarray], sim_logits: list[np.ndarray]) -> float | None:
    """The worst step's cosine; None when a step's logits hold NaN or inf (no cosine there)."""
    cosines = [compare(r, g)["cosine"] for r, g in zip(ref_logits, sim_logits)]
    return None if None in cosines else round(min(cosines), 6)


def answers_check(mode: str, simulated: Engine, answers: list[dict], margins: list[list[float]],
                  tokenizer) -> tuple[list[dict], np.ndarray]:
    """The combined bmodel answers the model's questions, teacher-forced along transformers'
    answers (teacher_forced: every step in one prefill): up to the first different choice, that is
    what a free-running greedy answer shares with transformers' (and each later step is still
    compared). A float build must agree wherever the fp32 top-2 margin (`margins`, per answer) is
    at least TIE_MARGIN. Also returns the logits at the last question's end, whose tokens the
    engine's cache still holds."""
    results = []
    for a, answer_margins in zip(answers, margins, strict=True):
        reference, steps = a["reference"], len(a["reference"])
        start = time.perf_counter()
        logits = teacher_forced(simulated, a["ids"], reference)
        chosen = [int(np.argmax(lg)) for lg in logits]
        agree = [x == y for x, y in zip(chosen, reference)]
        shared = agree.index(False) if False in agree else steps
        results.append({"prompt": a["prompt"], "reference": reference, "simulator": chosen, "shared": shared,
                        "agree": sum(agree), "margins": [round(m, 4) for m in answer_margins],
                        "decisive_disagreements": [k for k, (ok, m) in enumerate(zip(agree, answer_margins))
                                                   if not ok and m >= TIE_MARGIN],
                        "exact_required": mode in EXACT_TOKENS_MODES, "answer": a["answer"],
                        "shared_text": tokenizer.decode(reference[:shared], skip_special=True),
                        "seconds": round(time.perf_counter() - start, 1)})
    return results, logits[0]


def teacher_forced(engine: Engine, ids: list[int], reference: list[int]) -> list[np.ndarray]:
    """The logits of each step of `reference` after `ids`, each step fed the reference's token: all
    in one prefill of ids + reference[:-1] instead of a prefill and a decode step per token, or
    step by step where the bmodel prefills in chunks (history nets keep only the last chunk's
    rows). The decode nets have a check of their own (decode_check)."""
    if engine.walk.info.history:
        return engine.logits_along(ids, len(reference), reference)
    return list(engine.prompt_logits(ids + reference[:-1], len(ids) - 1))


def same_top1(report: dict) -> dict | None:
    """The share of the teacher-forced steps (the answers', else the greedy decode's) where the
    bmodel's top token is fp32's: llama.cpp's "same top p", on the verify prompts."""
    steps = ([(a["agree"], len(a["reference"])) for a in report.get("answers", [])]
             or ([(report["decode"]["agree"], len(report["decode"]["onnx"]))] if report["decode"].get("run") else []))
    agree, total = sum(a for a, _ in steps), sum(n for _, n in steps)
    if not total:
        return None
    return {"agree": agree, "steps": total, "share": agree / total,
            "against": "transformers' answers" if report.get("answers") else "the ONNX pipeline's greedy decode"}


def summarize(report: dict) -> list[str]:
    failures = piece_failures(report["pieces"], LABELS)
    decode = report["decode"]
    if decode.get("run") and decode["logits_cosine_min"] is None:
        failures.append("the combined bmodel's greedy decode gives NaN or inf logits on the simulator")
    if decode.get("run") and decode["exact_required"] and decode["decisive_disagreements"]:
        failures.append(f"greedy choices differ at steps {decode['decisive_disagreements']} although the fp32 "
                        f"margin there is >= {TIE_MARGIN}: simulator {decode['simulator']} vs onnx {decode['onnx']}")
    failures += [f"the answer to {a['prompt']!r} differs at steps {a['decisive_disagreements']} although the fp32 "
                 f"margin there is >= {TIE_MARGIN}: simulator {a['simulator']} vs transformers {a['reference']}"
                 for a in report.get("answers", []) if a["exact_required"] and a["decisive_disagreements"]]
    return failures


def markdown(report: dict) -> str:
    min_cosine, max_rel = report["thresholds"]
    lines = [f"# Simulator verification of {report['bmodel']}", "",
             f"Mode {report['mode']}; each one-piece bmodel on the BM1684X cmodel against onnxruntime on the "
             f"same inputs. Thresholds: cosine >= {min_cosine}, max abs <= {max_rel} x max(1, |reference|).",
             *([] if not report.get("quantization_explained") else [
                 "", f"{report['quantization_explained']} output(s) below them match the same net with the weights "
                 "the bmodel holds (TPU-MLIR's quantized weights, dequantized) within the float type's thresholds: "
                 "their loss is the quantization's, not the build's (pipeline/stages/quantized_weights.py)."]),
             "", *pieces_table(report["pieces"], 6)]
    if report.get("same_top1"):
        t = report["same_top1"]
        lines += ["", f"**Same top-1 as fp32: {100 * t['share']:.1f}%** ({t['agree']}/{t['steps']} teacher-forced steps "
                  f"along {t['against']}; `doit quality` measures it, and the perplexity and KL, on a longer text)"]
    d = report["decode"]
    lines += ["", "## Greedy decode: combined bmodel on the simulator vs the ONNX pipeline", ""]
    if d.get("run"):
        near = sum(m < TIE_MARGIN for m in d["margins"])
        start = (f"the last question ({d['prompt_tokens']} tokens), its cache left by that answer's prefill"
                 if d.get("after") == "the last answer's prefill" else f"a {d.get('prompt_tokens', '?')}-token prompt")
        lines += [f"Both decode the ONNX pipeline's greedy path after {start} (teacher forcing); each step's greedy "
                  "choice is compared.", "",
                  f"- same choice at {d['agree']}/{len(d['onnx'])} steps; a free-running greedy decode shares the "
                  f"first {d['free_running_prefix']} tokens",
                  f"- steps where fp32's top-2 margin is below {TIE_MARGIN} (near-ties): {near}; disagreements "
                  f"elsewhere: {d['decisive_disagreements'] or 'none'}"
                  f"{' (none allowed for this mode)' if d['exact_required'] else ''}",
                  "- lowest cosine of a step's logits vs fp32: "
                  + (str(d["logits_cosine_min"]) if d["logits_cosine_min"] is not None else "none: NaN or inf"),
                  f"- onnx:      {d['onnx']}", f"- simulator: {d['simulator']}",
                  f"- fp32 margins: {d['margins']}",
                  f"- {d['seconds']} s ({d['simulator_seconds']} s inside the simulator)"]
    else:
        lines.append(f"- not run: {d['reason']}")
    if report.get("answers"):
        lines += ["", "## Answers: combined bmodel on the simulator vs transformers generate()", "",
                  "Teacher-forced along transformers' greedy answer, every step in one prefill (the decode steps "
                  "are checked above): the tokens shared are those a free-running greedy answer on the simulator "
                  "has in common with it.", "",
                  "| question | transformers' answer | simulator shares | same choice at | disagreements "
                  f"with fp32 margin >= {TIE_MARGIN} | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {a['prompt']} | {a['answer']!r} | {a['shared']}/{len(a['reference'])} tokens: "
                  f"{a['shared_text']!r} | {a['agree']}/{len(a['reference'])} steps | "
                  f"{a['decisive_disagreements'] or 'none'} | {a['seconds']} |" for a in report["answers"]]
    failures = summarize(report)
    lines += ["", f"**Result: {'PASS' if not failures else 'FAIL'}**"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _or_nan(cosine: float | None) -> float:
    """A comparison with NaN or inf has no cosine: a gap in the plot."""
    return float("nan") if cosine is None else cosine


def plot_layers(reports: list[dict], out: Path) -> None:
    """Cosine of each block's hidden output, per mode: where along the depth accuracy goes."""
    from matplotlib.ticker import MaxNLocator

    from ..figures import png_figure

    with png_figure(out, ncols=2, figsize=(10, 4), sharey=True) as (fig, axes):
        for ax, kind in zip(axes, ("block", "block_cache")):
            for report in reports:
                layers = sorted(int(m[1]) for n in report["pieces"] if (m := re.fullmatch(rf"{kind}_(\d+)", n)))
                cosines = [_or_nan(report["pieces"][f"{kind}_{i}"]["hidden_states"]["cosine"]) for i in layers]
                ax.plot(layers, cosines, marker="o", label=report["mode"])
            ax.set_title(f"{kind}_i hidden_states")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("cosine vs onnxruntime")
        axes[1].legend()
        fig.suptitle(f"{reports[0]['model']} seq {reports[0]['seq']}: simulator vs onnxruntime per layer")


def run(build, paths, pieces, report_path: Path, tools: dict, dequantized_net=None) -> None:
    """The simulator stage of `doit verify`: every deployed piece against onnxruntime (an output
    that misses, also against its weights as quantized: explain_misses), then the combined bmodel
    (its answers to the model's questions, or a greedy decode); a report, the per-layer plot, and a
    failure naming what failed."""
    done = []

    def progress(net, seconds):
        done.append(net)
        say(f"[verify {build.mode} on the simulator {len(done)}/{len(pieces)}] {net} {seconds:.1f} s")

    ids = read_json(paths.report)["prompt_ids"]
    thresholds = get_family(build.model.family).thresholds[build.mode]
    report = {"model": build.model.name, "seq": build.seq, "mode": build.mode, "variant": build.variant,
              "bmodel": paths.dist.name, "prompt_ids": ids, "tools": tools, "thresholds": thresholds}
    dims = Dims.from_config(read_json(paths.export_config), build.history_chunk, build.stages)
    with Simulator(paths.logs, build.devices) as sim:
        report["pieces"], runs = check_pieces(thresholds, dims, paths.onnx, paths.deploy, ids, sim, progress,
                                              build.dynamic)
        sim.close()  # the pieces' simulator process would keep both cores busy through the lowering below
        report["quantization_explained"] = explain_misses(build.mode, report["pieces"], runs, paths.onnx,
                                                          dequantized_net)
        report["decode"] = _whole_bmodel(build, paths, report, ids, sim)
    report["same_top1"] = same_top1(report)
    report["simulated"] = True
    write_json(report_path, report)
    write_text(report_path.with_suffix(".md"), markdown(report))
    reports = [read_json(p) for p in sorted(paths.seq.glob("verify/*/report.json"))]
    plot_layers([r for r in reports if r.get("simulated") and r["pieces"]], paths.layers_plot)
    failures = summarize(report)
    if failures:
        raise PipelineError(f"simulator verification failed ({report_path.with_suffix('.md')}):\n  "
                            + "\n  ".join(failures))
    decode = report["decode"]
    summary = "; ".join(
        [*(["answers share " + ", ".join(f"{a['shared']}/{len(a['reference'])}" for a in report["answers"])
            + " tokens with transformers'"] if report.get("answers") else []),
         f"greedy choices as the ONNX pipeline at {decode['agree']}/{len(decode['onnx'])} steps"
         if decode["run"] else f"whole bmodel not run: {decode['reason']}"])
    if report["same_top1"]:
        summary += f"; same top-1 as fp32 at {100 * report['same_top1']['share']:.1f}% of the steps"
    explained = report["quantization_explained"]
    summary += (f"; {explained} output(s) below the mode's thresholds, the quantization's loss (the simulator "
                f"matches the net with the bmodel's quantized weights)" if explained else "")
    say(f"[verify {build.mode} on the simulator] PASS; {summary}; report {report_path.with_suffix('.md')}")


def _whole_bmodel(build, paths, report: dict, ids: list[int], sim: Simulator) -> dict:
    """The whole bmodel, unless sim_tokens=0: its answers to the model's questions where it has
    some, and a greedy decode of sim_tokens steps. After the answers, the decode starts from the
    last question, whose tokens the last answer's prefill left in the cache (no prefill of its
    own), unless a linear-attention state cannot go back to them. The ONNX references come first:
    while a bmodel is open, its simulator process keeps both cores busy."""
    if build.sim_tokens == 0:
        return {"run": False, "reason": "sim_tokens=0: the pieces only"}
    from runtime.tokenizer import load_tokenizer

    onnx = Engine(OnnxBackend(paths.onnx, chunk=build.history_chunk, stages=build.stages))
    answers = read_json(paths.report).get("answers") or []
    margins = [margins_of(onnx.logits_along(a["ids"], len(a["reference"]), a["reference"])) for a in answers]
    continued = bool(answers) and not onnx.walk.info.linear_layers
    decode_ids = answers[-1]["ids"] if continued else ids
    steps = min(build.sim_tokens, build.seq - len(decode_ids))  # the window holds the prompt and the new tokens
    ref_logits = onnx.logits_along(decode_ids, steps)
    simulated = Engine(sim.open(paths.dist))
    first_logits = None
    if answers:
        say(f"[verify {build.mode} on the simulator] answers of {paths.dist.name} to {len(answers)} question(s) ...")
        report["answers"], last_logits = answers_check(build.mode, simulated, answers, margins,
                                                       load_tokenizer(paths.onnx))
        first_logits = last_logits if continued else None
    say(f"[verify {build.mode} on the simulator] greedy decode of {paths.dist.name}, {steps} tokens ...")
    return decode_check(build.mode, simulated, decode_ids, ref_logits, first_logits)
