"""The runtime's bmodel backend on the simulator: our bmodels and tpu-mlir's llm_convert ones."""
import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from pipeline.stages.compile import IO_CONFIG, combine, deploy, deploy_args
from pipeline.stages.verify_sim import TIE_MARGIN, margins_of, teacher_forced
from pipeline.toolchain.install import ensure_toolchain
from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend
from runtime.device_walk import SlowCacheWarning
from runtime.engine import Engine, HostWalk
from runtime.nets import model_pieces
from runtime.onnx_backend import OnnxBackend
from runtime.sampling import Sampler, SamplingParams
from runtime.toolchain import ToolchainError

from .conftest import ROOT, run_doit

pytestmark = pytest.mark.sim
MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def built(sim_builds):
    build_dir = sim_builds
    result = run_doit(build_dir, ["build"], model=MODEL, mode="bf16", dynamic="0")  # static: its exact bytes below
    assert result.code == 0, result.output
    seq_dir = build_dir / MODEL / "seq32"
    ids = json.loads((seq_dir / "verify" / "report.json").read_text())["prompt_ids"]
    return build_dir, seq_dir / "onnx", build_dir / "dist" / f"{MODEL}_bf16_seq32_1dev.bmodel", ids


SEQ, LAYERS, KV_HEADS, HEAD_DIM, VOCAB, HIDDEN = 32, 2, 2, 16, 512, 64
BF16 = 2
STEP_IN = 4 + 4 + 4  # per decode step: the token (to the embedding, and to the penalty window), the position


def test_bf16_bmodel_decodes_like_the_onnx_pipeline_with_the_state_on_the_device(built):
    _, onnx, bmodel, ids = built
    reference = Engine(OnnxBackend(onnx)).greedy(ids, 16)
    # BmodelBackend (the BM runtime's C API) in a child process: in this one, the simulator's threads
    # would spin on both cores for the rest of the tests
    with IsolatedBmodelBackend(bmodel, resident=False) as backend:  # the copy path: host arrays in and out
        old = Engine(backend)
        assert old.greedy(ids, 16) == reference
    with IsolatedBmodelBackend(bmodel) as backend:
        assert {k: getattr(backend.info, k) for k in ("seq", "num_layers", "kv_heads", "head_dim", "head", "greedy_head",
                                             "sample_head")} == \
            {"seq": SEQ, "num_layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "head": "logits",
             "greedy_head": True, "sample_head": 51}  # read from the file's nets
        new = Engine(backend)
        assert new.greedy(ids, 16) == reference
    steps, kv_token = new.decoded, KV_HEADS * HEAD_DIM * BF16  # one token's K of one layer
    assert steps == old.decoded == 15
    # per decode step: the token, the position and the mask in (bf16); the greedy head's token out
    assert new.decode_traffic.h2d == steps * (STEP_IN + (SEQ + 1) * BF16)
    assert new.decode_traffic.d2h == steps * 4
    # embedding, the layers, lm_head and greedy_head; one wait, for the token
    assert new.decode_traffic.syncs == steps and new.decode_traffic.launches == steps * (LAYERS + 3)
    assert new.decode_traffic.d2d == 0  # K/V written in place, nets chained without a copy
    # the prefill sends the prompt, positions, mask and penalty window once; only the token comes back
    assert new.prefill_traffic.h2d == SEQ * 4 + SEQ * 4 + SEQ * SEQ * BF16 + SEQ * 4
    assert new.prefill_traffic.d2h == 4 and new.prefill_traffic.syncs == 1
    # the copy path moved every layer's whole cache in, the new K/V and the logits out, every step
    assert old.decode_traffic.h2d >= steps * LAYERS * 2 * SEQ * kv_token
    assert old.decode_traffic.d2h >= steps * (VOCAB * 4 + LAYERS * 2 * kv_token)
    assert old.decode_traffic.syncs == steps * (LAYERS + 2)


def test_a_dynamic_prefill_runs_at_the_prompts_length_and_gives_the_static_bmodels_logits(built):
    """dynamic=1 compiles block_i dynamic (llm_convert's --dynamic): the prefill runs at the prompt's
    length, and its logits are the static bmodel's, bit for bit, at every length."""
    build_dir, _, static, ids = built
    result = run_doit(build_dir, ["verify"], model=MODEL, mode="bf16", dynamic="1", sim_tokens="4")
    assert result.code == 0, result.output
    dynamic = build_dir / "dist" / f"{MODEL}_bf16_seq32_1dev_dyn.bmodel"
    assert "dynamic: the prefill runs at the prompt's length" in dynamic.with_suffix(".md").read_text()
    assert [line for line in result.output.splitlines() if "[export" in line or "[transform" in line] == []  # shared
    # the simulator check runs the first prefill piece at one token, half the prompt and the prompt
    # too, and in the window's upper half, where layer groups once gave NaN rows: 17, 25 and 31 of
    # 32 (the other layers are the same program: each runs at the full length)
    pieces = json.loads((build_dir / MODEL / "seq32" / "verify" / "bf16_1dev_bm1684x_dyn" / "report.json").read_text())[
        "pieces"]
    lengths = {1, len(ids) // 2, len(ids)} | {SEQ // 2 + 1, 3 * SEQ // 4 + 1, SEQ - 1}
    assert {p for p in pieces if " at length " in p} == {f"block_0 at length {m}" for m in lengths}
    assert {f"block_{i}" for i in range(LAYERS)} <= set(pieces)
    assert all(r["ok"] for outputs in pieces.values() for r in outputs.values())
    logits, sent = {}, {}
    for bmodel, resident in ((static, True), (dynamic, True), (dynamic, False)):  # False: the copy path
        with IsolatedBmodelBackend(bmodel, resident=resident) as backend:
            engine = Engine(backend)
            logits[bmodel, resident] = [engine.logits_along(list(range(40, 40 + n)), 3) for n in (1, 9, 28)]
            sent[bmodel, resident] = (backend.info.dynamic, engine.prefill_traffic.h2d)
    for run in ((dynamic, True), (dynamic, False)):
        for a, b in zip(logits[static, True], logits[run]):
            assert all(np.array_equal(x, y) for x, y in zip(a, b)), run
    n = 28  # positions and mask for the prompt's rows only
    assert sent[static, True] == (False, SEQ * 4 + SEQ * 4 + SEQ * SEQ * BF16 + SEQ * 4)
    assert sent[dynamic, True] == (True, SEQ * 4 + n * 4 + n * n * BF16 + SEQ * 4)
    # the copy path sends each layer its inputs, for the prompt's rows only
    assert sent[dynamic, False] == (True, SEQ * 4 + LAYERS * (n * HIDDEN * BF16 + n * 4 + n * n * BF16))


def test_a_conversation_of_three_turns_on_the_device_answers_as_the_onnx_pipeline(built):
    """Each turn prefills the conversation so far (question, answer, next question) and decodes:
    positions and cache slots must start over right, turn after turn, on one engine."""
    _, onnx, bmodel, ids = built
    reference, turns = Engine(OnnxBackend(onnx)), []
    with IsolatedBmodelBackend(bmodel) as backend:
        engine, conversation = Engine(backend), ids[:6]
        for turn in range(3):
            answer = engine.greedy(conversation, 5)
            assert answer == reference.greedy(conversation, 5), f"turn {turn + 1}"
            turns.append(len(conversation))
            conversation = conversation + answer + ids[6 + 2 * turn: 8 + 2 * turn]
    assert turns == [6, 13, 20]


def test_history_nets_make_a_chat_prefill_each_turn_once_on_the_device(built):
    """history=1 adds block_kv_i (llm_convert's --use_history_kv) and nothing else is exported or
    deployed again; four turns on the simulator then answer as a fresh prefill of the whole
    conversation, a turn of 10 new tokens in two chunks and the last turn filling the window."""
    from runtime.tokenizer import load_tokenizer

    from .turns import four_turns

    build_dir, _, _, _ = built
    result = run_doit(build_dir, ["verify"], model=MODEL, mode="bf16", dynamic="0", history="1", chunk="8",
                      sim_tokens="4")
    assert result.code == 0, result.output
    new = [t.split("/")[-1] for t in result.ran if t.split(":")[0] in ("export", "transform", "deploy")]
    kv, stages = {f"block_kv_{i}_c8" for i in range(LAYERS)}, {f"block_cache_{i}_kv{k}" for i in range(LAYERS) for k in (8, 16)}
    assert sorted(p for p in new if p in kv) == sorted([*kv] * 3) and set(new) <= kv | stages, new  # (stages: chunk=8's)
    report = json.loads((build_dir / MODEL / "seq32" / "verify" / "bf16_1dev_bm1684x_hist_c8" / "report.json").read_text())
    assert kv | stages <= set(report["pieces"])
    bmodel = build_dir / "dist" / f"{MODEL}_bf16_seq32_1dev_hist_c8.bmodel"
    assert "history" in bmodel.with_suffix(".md").read_text()
    tokenizer = load_tokenizer(build_dir / "dist" / f"{MODEL}-tokenizer")
    with IsolatedBmodelBackend(bmodel) as one, IsolatedBmodelBackend(bmodel) as other:
        kept = Engine(one)
        assert (kept.walk.info.history, kept.walk.info.history_dynamic) == (8, False)
        turns = four_turns(kept, Engine(other), tokenizer, [[40 + k for k in range(5)], list(range(60, 69)), [70, 71],
                                                            [72, 73]], 4)
        assert [len(t.tokens) for t in turns] == [4, 4, 4, 3] and kept.length == SEQ  # the window filled
        # the 2nd turn sent its 10 tokens in 2 runs of 8 rows: ids, positions and masks for them only
        assert turns[1].cached_tokens == 8
        assert turns[1].prefill_traffic.h2d == 2 * (SEQ * 4 + 8 * 4 + 8 * (SEQ + 8) * BF16) + SEQ * 4
        assert turns[1].prefill_traffic.d2d == LAYERS * 2 * 10 * KV_HEADS * HEAD_DIM * BF16  # the new K/V only


def test_decode_stages_on_the_device_read_the_one_cache_and_answer_as_the_whole_cache(built):
    """chunk=8 adds block_cache_i stages over the first 8 and 16 cache slots, deployed onto the io_alone
    addresses of the whole-cache net (nothing else is made again): each step on the device runs the
    shortest that holds the cache, sends a mask of that length, and answers as the bmodel without stages."""
    build_dir, _, whole, ids = built
    result = run_doit(build_dir, ["verify"], model=MODEL, mode="bf16", dynamic="0", chunk="8", sim_tokens="4")
    assert result.code == 0, result.output
    stages = {f"block_cache_{i}_kv{k}" for i in range(LAYERS) for k in (8, 16)}
    assert {t.split("/")[-1] for t in result.ran if t.split(":")[0] in ("export", "transform", "deploy")} <= stages
    report = json.loads((build_dir / MODEL / "seq32" / "verify" / "bf16_1dev_bm1684x_c8" / "report.json").read_text())
    assert stages <= set(report["pieces"]) and all(r["ok"] for out in report["pieces"].values() for r in out.values())
    staged = build_dir / "dist" / f"{MODEL}_bf16_seq32_1dev_c8.bmodel"
    assert "decode stages over the first 8, 16 cache slots" in staged.with_suffix(".md").read_text()
    prompt, logits, tokens = ids[:5], {}, None
    for bmodel in (whole, staged):
        with IsolatedBmodelBackend(bmodel) as backend:
            engine = Engine(backend)
            logits[bmodel] = engine.logits_along(prompt, 24, tokens)
            tokens = tokens or [int(np.argmax(lg)) for lg in logits[bmodel]]
            sent = (backend.info.stages, engine.decode_traffic.h2d)
    assert sent[0] == (8, 16, 32)
    positions = range(len(prompt), len(prompt) + 23)
    assert sent[1] == sum(STEP_IN + ((8 if p <= 8 else 16 if p <= 16 else 32) + 1) * BF16 for p in positions)
    for a, b in zip(logits[whole], logits[staged]):
        assert np.argmax(a) == np.argmax(b) and np.allclose(a, b, atol=0.05), np.abs(a - b).max()


SAMPLINGS = [(1.3, 0.8, 20, 0.9), (1.0, 1.0, 49, 1.0), (2.0, 0.5, 5, 0.5), (1.1, 1.5, 1, 1.0)]


def test_the_sample_head_on_the_simulator_gives_the_host_samplers_distribution(built):
    """(penalty, temperature, top_k, top_p) on the device's candidates, against runtime/sampling.py
    on the same logits and tokens; then a sampled answer whose steps send and read back a few bytes."""
    _, _, bmodel, ids = built
    with IsolatedBmodelBackend(bmodel) as backend:
        engine = Engine(backend)
        answer = engine.greedy(ids, 4)
        seen = ids + answer[:-1]  # the prompt and the tokens fed back so far
        logits = engine.logits()
        for penalty, temperature, top_k, top_p in SAMPLINGS:
            probs, candidates = engine.walk.candidates(penalty, temperature, top_k, top_p)
            device = np.zeros(VOCAB)
            device[candidates] = probs
            host = Sampler(SamplingParams(temperature, top_k, top_p, penalty)).distribution(logits, seen)
            assert probs[-1] == 0  # the candidate past the top-k is cut: nothing lies beyond
            assert set(np.flatnonzero(device)) == set(np.flatnonzero(host)), (penalty, temperature, top_k, top_p)
            assert np.abs(device - host).max() < 1e-5
        # greedy after a repetition penalty: the head's top candidate is the host's argmax
        probs, candidates = engine.walk.candidates(1.3, 1.0, 1, 1.0)
        assert probs[1] == 0 and candidates[0] == Sampler(SamplingParams(repetition_penalty=1.3))(logits, seen)
        sampler = Sampler(SamplingParams(repetition_penalty=1.3))
        engine.prefill(ids)
        tokens = [engine.next_token(sampler, ids)]
        engine.decode(tokens[-1])
        tokens.append(engine.next_token(sampler, ids + tokens))
        assert engine.decode_traffic.per(engine.decoded)["d2h"] == 51 * (4 + 4)  # candidates, not the logits
        assert tokens == [Sampler(SamplingParams(repetition_penalty=1.3))(logits_, ids + tokens[:k]) for k, logits_ in
                          enumerate(Engine(backend, HostWalk(backend)).logits_along(ids, 2, fed=tokens))]
        sampler = Sampler(SamplingParams(0.8, 40, 0.9, 1.2, seed=3))
        engine.prefill(ids)
        tokens = [engine.next_token(sampler, ids)]
        for _ in range(7):
            engine.decode(tokens[-1])
            tokens.append(engine.next_token(sampler, ids + tokens))
    assert len(set(tokens)) > 1
    assert engine.prefill_traffic.h2d == SEQ * 4 + SEQ * 4 + SEQ * SEQ * BF16 + SEQ * 4 + 4 * 4  # + the parameters
    each = engine.decode_traffic.per(engine.decoded)
    assert each["h2d"] == STEP_IN + (SEQ + 1) * BF16  # the parameters are not sent again
    assert each["d2h"] == 51 * (4 + 4)  # the candidates (top-k up to 50, and one to see a tie), not the logits


def test_chat_cli_runs_a_bmodel(built, tmp_path):
    _, _, bmodel, _ = built
    log = tmp_path / "bmrt.log"
    out = subprocess.run([sys.executable, "-m", "runtime.chat", "--model", str(bmodel), "--prompt", "Hello", "--system", "",
                          "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QWEN_TPU_RUNTIME_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    assert "[5 tokens, length; prefilled" in out.stderr  # its tokenizer was found beside it
    # the simulator's own prints (at start, at every launch, at exit) go to the runtime's log, not
    # into the answer: stdout is the answer's text, stderr the stats line alone
    assert "cmodel" in log.read_text() and "do_allreduce" in log.read_text()
    assert "cmodel" not in out.stdout + out.stderr and "do_allreduce" not in out.stdout + out.stderr
    assert out.stderr.startswith("[5 tokens") and out.stderr.count("\n") == 1, out.stderr
    # what crossed per generated token: the step's inputs in, the greedy head's token out
    assert f"h2d {STEP_IN + (SEQ + 1) * BF16} B/token, d2h 4 B/token, d2d 0 B/token, {LAYERS + 3} launches and " \
        "1 sync/token" in out.stderr, out.stderr


def test_the_server_reports_what_crossed_to_the_device(built):
    _, _, bmodel, _ = built
    from .test_serve import _serve

    with _serve(bmodel) as base:
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).json()
        traffic = httpx.get(f"{base}/health", timeout=10).json()["device_traffic"]
    assert answer["usage"]["completion_tokens"] >= 1
    steps = traffic["decode_steps"]
    assert steps == answer["usage"]["completion_tokens"] - 1 or steps == answer["usage"]["completion_tokens"]
    assert traffic["decode"]["h2d"] == steps * (STEP_IN + (SEQ + 1) * BF16) and traffic["decode"]["d2h"] == steps * 4
    assert traffic["prefill"]["syncs"] == 1 and traffic["prefill"]["d2h"] == 4


@pytest.mark.parametrize("options", [[], ["--do_sample"], ["--dynamic"], ["--use_history_kv"]],
                         ids=["default", "do_sample", "dynamic", "history"])
def test_llm_convert_bmodel_runs_in_our_runtime(built, tmp_path, options):
    """A bmodel made by tpu-mlir's own llm_convert.py: by default its lm_head returns the token, not
    logits; with --do_sample it returns logits, and greedy_head / sample_head choose; with --dynamic
    its block_i run at the prompt's length, with the causal mask inside (no mask input); with
    --use_history_kv (which turns --dynamic on) block_i takes seq/4 tokens and block_kv_i, without a mask
    input, attends to the cache wrongly on the simulator: our runtime does not use them, runs prompts
    that block_i holds, and refuses longer ones, saying why; its decode stages it uses (the decode
    below crosses them)."""
    build_dir, onnx, _, ids = built
    if shutil.which("parallel") is None:
        pytest.fail("llm_convert.py needs GNU parallel (apt-get install parallel; .ci/run installs it)")
    toolchain = ensure_toolchain()
    checkpoint = build_dir / MODEL / "checkpoint"
    out = subprocess.run([str(toolchain.bin / "llm_convert.py"), "-m", str(checkpoint), "-s", "32", "-q", "bf16",
                          "-c", "bm1684x", "-o", str(tmp_path / "out"), *options], cwd=tmp_path, env=toolchain.env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    bmodel = next((tmp_path / "out").glob("*.bmodel"))
    backend = IsolatedBmodelBackend(bmodel)
    sampling = "--do_sample" in options
    assert backend.info.seq == 32 and backend.info.num_layers == 2
    history = "--use_history_kv" in options
    assert backend.info.dynamic == ("--dynamic" in options or history)
    assert len(backend.nets["block_0"]["inputs"]) == (2 if backend.info.dynamic else 3)
    assert (backend.info.history, backend.info.prefill_rows) == ((0, 8) if history else (0, 32))
    assert ("block_kv_0" in backend.nets) == history and bool(backend.info.history_unusable) == history
    # its decode stages (the chunk, seq/4 with --use_history_kv, sets them) share the cache: they are used
    assert backend.info.stages == ((8, 16, 32) if history else (32,))
    if history:  # the prompts block_i holds
        with backend, pytest.raises(ToolchainError, match="take no attention mask"):
            Engine(backend).prefill(ids[:9])
        backend, ids = IsolatedBmodelBackend(bmodel), ids[:8]
    assert (backend.info.head, backend.info.greedy_head, backend.info.sample_head) == \
        (("logits", True, 50) if sampling else ("token", False, 0))
    # teacher-forced along the ONNX pipeline's greedy path: the same choice wherever it is not a near-tie
    reference = Engine(OnnxBackend(onnx)).logits_along(ids, 16)
    tokens = [int(np.argmax(lg)) for lg in reference]
    margins = margins_of(reference)
    with backend:
        engine = Engine(backend)
        chosen = [int(np.argmax(lg)) for lg in engine.logits_along(ids, 16, tokens)]
        greedy = engine.greedy(ids, 4)  # the token chosen on the device, by lm_head or greedy_head
        assert engine.decode_traffic.d2h == engine.decoded * 4
        if sampling:  # their sample head (its top-p keeps at least 5): candidates, not logits, come back
            sampler = Sampler(SamplingParams(0.8, 20, 0.9, 1.1, seed=1))
            engine.prefill(ids)
            drawn = [engine.next_token(sampler, ids)]
            engine.decode(drawn[-1])
            drawn.append(engine.next_token(sampler, ids + drawn))
            assert all(0 <= t < VOCAB for t in drawn) and engine.decode_traffic.d2h == 50 * 8
    decisive = [k for k, m in enumerate(margins) if m >= TIE_MARGIN]
    assert len(decisive) >= 8 and all(chosen[k] == tokens[k] for k in decisive), (chosen, tokens, margins)
    agreed = next((k for k in range(4) if k not in decisive), 4)  # free-running: the same up to a near-tie
    assert greedy[:agreed] == tokens[:agreed], (greedy, tokens, margins)


def test_a_bmodel_whose_cache_nets_are_not_io_alone_runs_through_copies_with_a_warning(built, tmp_path):
    """Cache nets compiled without --addr_mode io_alone do not keep their inputs between launches:
    the cache then lives in memory of the runtime's own, copied into each net on the device."""
    build_dir, onnx, _, ids = built
    seq_dir, pieces = build_dir / MODEL / "seq32", model_pieces(LAYERS)
    parts = []
    for piece in pieces:
        part = seq_dir / "deploy" / "bf16_1dev_bm1684x" / f"{piece.name}.bmodel"
        if piece.kind == "block_cache":
            args = deploy_args(piece, "bf16", 1, "bm1684x", 64)  # without io_alone (nor its addresses saved)
            args = [a for a in args if a not in ("--addr_mode", "io_alone", "--save_io_alone_config", IO_CONFIG)]
            part = tmp_path / f"{piece.name}.bmodel"
            deploy(piece, seq_dir / "transform" / piece.name, args, part, tmp_path / f"{piece.name}.log", tmp_path)
        parts.append(part)
    bmodel = tmp_path / "no-io-alone.bmodel"
    combine(parts, bmodel, [p.name for p in pieces], tmp_path / "combine.log")
    with pytest.warns(SlowCacheWarning, match="not compiled with --addr_mode io_alone") as warned, \
            IsolatedBmodelBackend(bmodel) as backend:
        engine = Engine(backend)
        assert engine.greedy(ids, 8) == Engine(OnnxBackend(onnx)).greedy(ids, 8)
    assert len(warned) == 1
    kv_layer = SEQ * KV_HEADS * HEAD_DIM * BF16  # one layer's K (or V) cache
    assert engine.decode_traffic.d2d == engine.decoded * LAYERS * 2 * kv_layer  # copied on the device ...
    assert engine.decode_traffic.h2d == engine.decoded * (STEP_IN + (SEQ + 1) * BF16)  # ... never from the host


PROBE = """
import sys
from pathlib import Path
from runtime.bmodel_backend import BmodelBackend
from runtime.native_output import output_to
from runtime.toolchain import ToolchainError

backend = BmodelBackend(Path(sys.argv[1]))
walk = backend.walk()
first = sorted(m.address for m, _ in walk.own)
walk.close()
again = sorted(m.address for m, _ in type(walk)(backend.runtime, backend.info).own)
print("reused" if again == first else f"not reused: {first} then {again}")
try:
    with output_to(backend.runtime.log):
        backend.runtime.launch("block_0", [], [])
except ToolchainError as err:
    print(err)
backend.close()
print("left allocated:", len(backend.runtime._allocated))
"""


def test_device_memory_is_given_back_and_a_failed_launch_names_the_net_and_the_log(built, tmp_path):
    _, _, bmodel, _ = built
    log = tmp_path / "bmrt.log"
    out = subprocess.run([sys.executable, "-c", PROBE, str(bmodel)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "QWEN_TPU_RUNTIME_LOG": str(log)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "reused"  # a closed walk's buffers are free: the next one gets the same memory
    assert lines[1] == ("the BM runtime failed to launch block_0: [BMRT][launch:1164] WRONG:Shapes of the input "
                        f"tensors are not supported (its log: {log})")
    assert lines[2] == "left allocated: 0"


def test_the_copy_paths_bytes_grow_with_seq_and_layers_and_the_devices_do_not(built):
    """The same model at seq 64 and 3 layers: the copy path moves every layer's whole cache in,
    every token; on the device the step's input grows with the mask alone (2 bytes per cache slot)."""
    build_dir, onnx, small, ids = built
    result = run_doit(build_dir, ["build"], model=MODEL, mode="bf16", seq=64, layers=3, dynamic="0")
    assert result.code == 0, result.output
    large = build_dir / "dist" / f"{MODEL}-3l_bf16_seq64_1dev.bmodel"
    per_token = {}
    for bmodel, seq, layers in ((small, SEQ, LAYERS), (large, 64, 3)):
        for resident in (False, True):
            with IsolatedBmodelBackend(bmodel, resident=resident) as backend:
                engine = Engine(backend)
                engine.greedy(ids, 6)
            per_token[seq, resident] = engine.decode_traffic.per(engine.decoded)
        assert per_token[seq, True]["h2d"] == STEP_IN + (seq + 1) * BF16
        # the copy path: the token, then per layer the hidden state, position, mask and the whole
        # K and V caches, then the hidden state into the head
        kv_cache = seq * KV_HEADS * HEAD_DIM * BF16
        per_layer = HIDDEN * BF16 + 4 + (seq + 1) * BF16 + 2 * kv_cache
        assert per_token[seq, False]["h2d"] == 4 + layers * per_layer + HIDDEN * BF16
    assert per_token[64, False]["h2d"] > 2.5 * per_token[SEQ, False]["h2d"]
    assert per_token[64, True]["d2h"] == per_token[SEQ, True]["d2h"]  # the head's answer, whatever the size


def test_one_prefill_gives_the_logits_of_every_position_as_prefills_of_each_prefix(built):
    """Engine.prompt_logits (teacher forcing in one prefill: pipeline/stages/quality.py scores a text with
    it): the logits at position p are those a prefill of the first p + 1 tokens ends with."""
    _, onnx, bmodel, ids = built
    first = 3
    with IsolatedBmodelBackend(bmodel) as backend:
        engine = Engine(backend)
        rows = engine.prompt_logits(ids, first)
        assert rows.shape == (len(ids) - first, VOCAB)
        for p in (first, len(ids) // 2, len(ids) - 1):
            engine.prefill(ids[:p + 1])
            assert np.array_equal(rows[p - first], engine.logits()), p
        engine.prefill(ids)  # the cache holds the prompt: prompt_logits prefills it all again anyway
        assert np.array_equal(engine.prompt_logits(ids, first), rows) and engine.reused == 0
        # doit verify's answers, teacher-forced in one prefill: each step's logits as the decode
        # steps give them, fed the same tokens (the prefill and decode nets round alike in bf16)
        reference = Engine(OnnxBackend(onnx)).greedy(ids[:first], 8)
        by_prefill = teacher_forced(engine, ids[:first], reference)
        by_decode = engine.logits_along(ids[:first], 8, reference)
        assert len(by_prefill) == 8 and np.array_equal(by_prefill[0], by_decode[0])  # the same last prompt row
        for a, b in zip(by_prefill, by_decode):
            assert np.argmax(a) == np.argmax(b) and np.corrcoef(a, b)[0, 1] > 0.999
        # ... and the decode check continues from the question the answer's prefill left in the cache
        teacher_forced(engine, ids[:first], reference)
        engine.rewind(first)
        for k, token in enumerate(reference[:3]):
            engine.decode(token)
            after = engine.logits()
            assert np.argmax(after) == np.argmax(by_decode[k + 1]) and np.corrcoef(after, by_decode[k + 1])[0, 1] > 0.999
    onnx_engine = Engine(OnnxBackend(onnx))
    on_onnx = onnx_engine.prompt_logits(ids, first)
    for p in (first, len(ids) - 1):
        onnx_engine.prefill(ids[:p + 1])
        np.testing.assert_allclose(on_onnx[p - first], onnx_engine.logits(), rtol=1e-5, atol=1e-5)
    assert np.corrcoef(on_onnx.ravel(), rows.ravel())[0, 1] > 0.99  # bf16 on the simulator against fp32


def test_a_simulator_child_dies_with_its_parent_even_in_the_middle_of_a_request(built):
    """Killed (doit, a benchmark), the parent leaves no simulator spinning on the cores. A child in
    a long request does not read the pipe's EOF: one stopped (SIGSTOP) reads nothing at all, and
    still goes, by its parent-death signal."""
    import psutil

    bmodel = built[2]
    parent = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
        "from pipeline.toolchain.isolated_backend import IsolatedBmodelBackend; "
        f"b = IsolatedBmodelBackend({str(bmodel)!r}); print(b._process.pid, flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        child.suspend()
        parent.kill()
        parent.wait()
        parent.stdout.close()
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone or child.status() == psutil.STATUS_ZOMBIE, "the simulator outlived its parent"
    finally:
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            child.kill()
            child.resume()
