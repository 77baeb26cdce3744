"""Whether onnxruntime's I/O binding saves copies in the engine's walk: HostWalk (the onnxruntime
backend's: every net's inputs as numpy feeds, its outputs as new arrays, the new K/V copied into
the cache) against BoundWalk (below: every input and output bound to the walk's own arrays, the
new K/V written in place, as the device walk does on a TPU), side by side in one run on the same
pieces.

    .venv/bin/python benchmarks/onnx_walk.py [--model bench-qwen2-medium] [--layers 4] [--seqs 256 1024 2048]
        [--prompt 16] [--tokens 32] [--rounds 3] [--build-dir DIR]
Prints a Markdown table and writes it to benchmarks/results/onnx_walk.md. The two walks alternate,
round after round (the machine is shared: a ratio from one run says more than two absolute times),
and must give the same logits, bit for bit.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, publish  # noqa: E402
from runtime.engine import decode_mask, pad_ids, prefill_mask  # noqa: E402
from runtime.nets import block_cache_net, block_net  # noqa: E402

DOIT = Path(sys.executable).parent / "doit"


class _Net:
    """One net's session and its I/O binding to arrays of the walk (bound by address: onnxruntime
    reads the inputs and writes the outputs there, no array allocated or copied per run)."""

    def __init__(self, session, inputs: dict, outputs: dict):
        self.session, self.binding = session, session.io_binding()
        for name, array in inputs.items():
            self._bind(self.binding.bind_input, name, array)
        for name, array in outputs.items():
            self.bind_output(name, array)

    @staticmethod
    def _bind(bind, name: str, array: np.ndarray) -> None:
        assert array.flags.c_contiguous, name
        bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    def bind_input(self, name: str, array: np.ndarray) -> None:
        self._bind(self.binding.bind_input, name, array)

    def bind_output(self, name: str, array: np.ndarray) -> None:
        self._bind(self.binding.bind_output, name, array)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


class BoundWalk:
    """The experiment: a walk on onnxruntime shaped like the device walk (runtime/device_walk.py):
    layer i's K/V cache is written in place, all of it by block_i at prefill and at the token's slot
    by block_cache_i at decode; hidden states go from net to net through two buffers; the position
    and the mask are written once per step for every layer; lm_head reads the last row where it is.
    Against HostWalk, it saves each output's allocation and the copy of the new K/V into the cache
    (onnxruntime reads numpy inputs in place already)."""

    traffic = None  # no device: nothing crosses

    def __init__(self, backend):
        self.info = replace(backend.info, greedy_head=False, sample_head=0)  # the host chooses
        info, net = self.info, backend.session
        self.seq, self.layers = info.seq, info.num_layers
        cache = (1, self.seq, info.kv_heads, info.head_dim)
        self.k = [np.zeros(cache, np.float32) for _ in range(self.layers)]
        self.v = [np.zeros(cache, np.float32) for _ in range(self.layers)]
        self.ids, self.mask_prefill = np.zeros((1, self.seq), np.int32), np.zeros((1, 1, self.seq, self.seq), np.float32)
        self.token_id, self.position = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)
        self.mask_decode = np.zeros((1, 1, 1, self.seq + 1), np.float32)
        self.logits_out = np.zeros((1, info.vocab_size), np.float32)
        # bound by address: every array stays referenced by the walk as long as its bindings
        self.positions = positions = np.arange(self.seq, dtype=np.int32)[None]
        self.hidden = full, one = [[np.zeros((1, n, info.hidden_size), np.float32) for _ in range(2)]
                                   for n in (self.seq, 1)]  # ping-pong buffers, prefill and decode
        self.full_rows, self.last_row = full[self.layers % 2], one[self.layers % 2]  # the last layer's output

        self.prefill_nets = [_Net(net("embedding"), {"input_ids": self.ids}, {"hidden_states": full[0]})] + [
            _Net(net(block_net(i)),
                 {"input_states": full[i % 2], "position_ids": positions, "attention_mask": self.mask_prefill},
                 {"hidden_states": full[(i + 1) % 2], "past_k": self.k[i], "past_v": self.v[i]})
            for i in range(self.layers)]
        self.decode_nets = [_Net(net("embedding_cache"), {"input_ids": self.token_id}, {"hidden_states": one[0]})] + [
            _Net(net(block_cache_net(i)),
                 {"input_states": one[i % 2], "position_ids": self.position, "attention_mask": self.mask_decode,
                  "history_k": self.k[i], "history_v": self.v[i]},
                 {"hidden_states": one[(i + 1) % 2]})  # past_k, past_v: bound to the token's slot per step
            for i in range(self.layers)]
        self.head = _Net(net("lm_head"), {}, {"logits": self.logits_out})
        self._head_input, self._logits = None, None

    def prefill(self, ids: list[int]) -> None:
        n = len(ids)
        self.ids[:], self.mask_prefill[:] = pad_ids(ids, self.seq), prefill_mask(n, self.seq)
        for piece in self.prefill_nets:
            piece.run()
        self._next_head(self.full_rows[:, n - 1])

    def decode(self, token: int, pos: int) -> None:
        self.token_id[0, 0], self.position[0, 0], self.mask_decode[:] = token, pos, decode_mask(pos, self.seq)
        self.decode_nets[0].run()
        for i, piece in enumerate(self.decode_nets[1:]):
            piece.bind_output("past_k", self.k[i][:, pos:pos + 1])  # the slot's [1,1,kv,hd]: contiguous
            piece.bind_output("past_v", self.v[i][:, pos:pos + 1])
            piece.run()
        self._next_head(self.last_row[:, 0])

    def _next_head(self, row: np.ndarray) -> None:
        self._head_input, self._logits = row, None  # lm_head runs when asked for

    def logits(self) -> np.ndarray:
        if self._logits is None:
            self.head.bind_input("hidden_states", self._head_input)
            self.head.run()
            self._logits = self.logits_out[0].copy()  # the next step writes over logits_out
        return self._logits

    def token(self) -> int | None:
        return None


def copies_of_a_run(mib: int = 64) -> str:
    """What a plain `session.run` copies on the CPU: a net that reads one row of a large input
    (copied, it would take about a memcpy's time), and whether its output array owns its memory."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = mib * 2**20 // 4 // 1024
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e"], ["y"])], "first_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor("s", TensorProto.INT64, [1], [0]), helper.make_tensor("e", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((n, 1024), np.float32)
    runs, copies = [], []
    for _ in range(10):
        start = time.perf_counter()
        (y,) = session.run(None, {"x": x})
        runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        x.copy()
        copies.append(time.perf_counter() - start)
    return (f"a run with a {mib} MiB input takes {min(runs) * 1e3:.3f} ms, a copy of that input "
            f"{min(copies) * 1e3:.1f} ms; the run's output array {'owns' if y.flags.owndata else 'wraps'} its memory")


def export(build_dir: Path, model: str, layers: int, seq: int) -> Path:
    subprocess.run([str(DOIT), "export", f"model={model}", f"layers={layers}", f"seq={seq}",
                    f"build_dir={build_dir}"], cwd=ROOT, check=True, capture_output=True)
    return build_dir / f"{model}-{layers}l" / f"seq{seq}" / "onnx"


def timed(engine, prompt: list[int], tokens: int) -> tuple[float, float, list[np.ndarray]]:
    """(prefill s, decode s per token, every step's logits) of a teacher-forced run."""
    start = time.perf_counter()
    engine.prefill(prompt)
    logits = [engine.logits()]
    prefill, start = time.perf_counter() - start, time.perf_counter()
    for k in range(tokens):
        engine.decode(prompt[k % len(prompt)])
        logits.append(engine.logits())
    return prefill, (time.perf_counter() - start) / tokens, logits


def measure(onnx: Path, prompt: list[int], tokens: int, rounds: int) -> dict:
    from runtime.engine import Engine, HostWalk
    from runtime.onnx_backend import OnnxBackend

    backend = OnnxBackend(onnx)
    walks = {"HostWalk": Engine(backend, HostWalk(backend)), "BoundWalk": Engine(backend, BoundWalk(backend))}
    times = {name: ([], []) for name in walks}
    same = True
    for _ in range(rounds + 1):  # the first round warms the sessions up and is not counted
        runs = {name: timed(engine, prompt, tokens) for name, engine in walks.items()}
        same &= all(np.array_equal(a, b) for a, b in zip(runs["HostWalk"][2], runs["BoundWalk"][2]))
        for name, (prefill, decode, _) in runs.items():
            times[name][0].append(prefill)
            times[name][1].append(decode)
    return {"same": same, **{name: (statistics.median(p[1:]), statistics.median(d[1:])) for name, (p, d) in times.items()}}


def main():
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-qwen2-medium")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seqs", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build-dir", type=Path)
    args = parser.parse_args()
    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="onnx-walk-bench-"))
    prompt = list(range(10, 10 + args.prompt))
    lines = [f"{args.model}, {args.layers} layers, fp32 ONNX pieces on onnxruntime (1 thread per session), a "
             f"{args.prompt}-token prompt then {args.tokens} decode steps, median of {args.rounds} alternating rounds; "
             f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. onnxruntime {onnxruntime.__version__}: "
             f"{copies_of_a_run()}.", "",
             "| seq | K/V cache per layer | prefill ms HostWalk | prefill ms BoundWalk | decode ms/token HostWalk | "
             "decode ms/token BoundWalk | BoundWalk / HostWalk, decode | same logits |",
             "|---|---|---|---|---|---|---|---|"]
    for seq in args.seqs:
        onnx = export(build_dir, args.model, args.layers, seq)
        r = measure(onnx, prompt, args.tokens, args.rounds)
        (hp, hd), (op, od) = r["HostWalk"], r["BoundWalk"]
        info = json.loads((onnx / "model.json").read_text())
        cache = 2 * seq * info["kv_heads"] * info["head_dim"] * 4
        lines.append(f"| {seq} | {cache / 2**20:.1f} MiB | {hp * 1e3:.1f} | {op * 1e3:.1f} | {hd * 1e3:.2f} | "
                     f"{od * 1e3:.2f} | {od / hd:.2f} | {'yes' if r['same'] else '**no**'} |")
        print(lines[-1], file=sys.stderr)
    publish("\n".join(lines) + "\n", "onnx_walk.md")


if __name__ == "__main__":
    main()
