"""The walk over an LLM bmodel's nets with the state kept on the device, the way the device wants
it (FACTS.md section 6; Sophgo's LLM-TPU runtime does the same in C++):
  - layer i's K/V cache is `block_cache_i`'s own io_alone input memory (`history_k`, `history_v`);
    block_i writes its rows in place (its K/V outputs point at it); block_kv_i (history prefill)
    reads the filled slots and its new rows are copied on the device to their slots; decode writes
    the new token's K/V in place (the outputs point at its slot). The cache stays between prompts:
    a prompt that continues it runs only its new tokens (engine.prefill_plan);
  - hidden states go from net to net in device memory; only the last prompt row goes to the head;
  - per step only the token, the position and the mask go in, written once and shared by every
    layer; one wait for the device per step, when the head's answer is read.
Decode attends over the shortest stage that holds the cache, where the bmodel has decode stages
(chunk=C): their history inputs are the same memory, read from its first slots.
A linear-attention layer (Qwen3.5) keeps its conv and recurrent states in two pairs of device
buffers: each run reads one pair and writes the other (ping-pong, nothing copied), from the
prompt's first window to the last generated token.
Per generated token that is 4 + 4 + 4 + 2*(K+1) bytes in (the token, also into the sample head's
window; the position; the bf16 mask over the stage's K slots, K = SEQ without stages) and the
head's answer out, whatever the layer count and the K/V size. Every byte is counted by the runtime (bmrt.Runtime.traffic)."""
import functools
import warnings

import numpy as np

from .bmrt import DTYPES, Runtime, from_device_type, to_device_type
from .engine import decode_mask, decode_stage, pad_ids, penalty_window, prefill_plan
from .native_output import output_to
from .nets import ModelInfo, block_cache_net, block_kv_net, block_net, token_as_logits
from .toolchain import ToolchainError


def _bytes(spec: dict, dtype: int) -> int:
    return int(np.prod(spec["shape"])) * np.dtype(DTYPES[dtype][1]).itemsize


class SlowCacheWarning(UserWarning):
    pass


def _quiet(method):
    """The simulator prints at every launch: into the runtime's log, not into the chat's text."""
    @functools.wraps(method)
    def wrapper(self, *args):
        with output_to(self.rt.log):
            return method(self, *args)
    return wrapper


class DeviceWalk:
    """prefill(ids) / decode(token, pos) over one loaded LLM bmodel; the head's answer stays on the
    device until logits() or token() reads it."""

    def __init__(self, runtime: Runtime, info: ModelInfo):
        self.rt, self.info, self.own = runtime, info, []
        self.seq, self.layers = info.seq, info.num_layers
        nets, self.linear = runtime.nets, info.linear_layers
        self.attn = attn = info.first_attention  # its nets' shapes every attention layer shares
        self.attn_cache, self.attn_block = block_cache_net(attn), block_net(attn)
        self.kv_bytes = self._size(self.attn_cache, 1, output=True)  # one token's K (or V) of one layer
        self.row_bytes = self._size(self.attn_cache, 0, output=True)  # one token's hidden state
        attention = [i for i in range(self.layers) if i not in self.linear]
        self.copied = [i for i in attention if not nets[block_cache_net(i)]["io_alone"]]
        self.cache = [self._cache(i) if i in attention else None for i in range(self.layers)]
        # per linear layer: [conv, recurrent] buffers twice, and which pair holds the state now
        self.states = {i: [[self._alloc(self._size(block_cache_net(i), k), self._device(block_cache_net(i), k))
                            for k in (1, 2)] for _ in range(2)] for i in self.linear}
        self.current = dict.fromkeys(self.linear, 0)
        if self.copied:
            warnings.warn(f"{info.bmodel}: its block_cache nets were not compiled with --addr_mode io_alone, so "
                          "their inputs do not keep the K/V cache between launches: every token copies each "
                          "layer's whole cache into its net on the device (slower; rebuild with this project to "
                          "avoid it)", SlowCacheWarning, stacklevel=3)
        hidden = self._size(self.attn_block, 0, output=True)
        self.hidden = [self._alloc(hidden, self._device(self.attn_block, 0)) for _ in range(2)]  # ping-pong
        # the prefill's positions and mask, written once per run and read by every layer; sized for
        # block_i and block_kv_i, whichever is larger
        prefill_nets = [self.attn_block] + ([block_kv_net(attn)] if info.history else [])
        self.positions = self._alloc(max(self._size(n, 1) for n in prefill_nets), self._device(self.attn_block, 1))
        masks = [n for n in prefill_nets if self._has_mask(n)]
        self.mask = self._alloc(max(self._size(n, 2) for n in masks), self._device(masks[0], 2)) if masks else None
        # block_kv's new K/V land here first, then their real rows go into the cache
        kv_net = block_kv_net(attn)
        self.kv_scratch = ([self._alloc(self._size(kv_net, k, output=True), self._device(kv_net, k, True))
                            for k in (1, 2)] if info.history else None)
        # decode's position and mask: written once per step, read by every layer
        self.step_inputs = (self._kept_input(self.attn_cache, 1), self._kept_input(self.attn_cache, 2))
        self.stepped, self.sample_params = False, None
        # the head's answer goes to memory of our own: in the neuron memory the nets share, the
        # next net (a greedy or sample head reading it) could overwrite it
        self.logits_mem = self._alloc(self._size("lm_head", 0, output=True), self._device("lm_head", 0, True))
        # the sample head's inputs (the token window, the parameters) stay on the device between steps
        self.sample_inputs = ({i: self._kept_input("sample_head", i) for i in range(1, 6)}
                              if info.sample_head else None)

    def _kept_input(self, net: str, index: int):
        """Memory for a net's input that keeps its content between launches: the net's own where
        it was compiled io_alone, else memory of our own."""
        if self.rt.nets[net]["io_alone"]:
            return self.rt.mems[net][0][index]
        return self._alloc(self._size(net, index), self._device(net, index))

    def _alloc(self, nbytes: int, device: int = 0):
        mem = self.rt.alloc(nbytes, device)
        self.own.append((mem, device))
        return mem

    def close(self) -> None:
        """Frees what this walk allocated; the nets' own memory goes with the runtime."""
        for mem, device in self.own:
            self.rt.free(mem, device)
        self.own = []

    def _size(self, net: str, index: int, output: bool = False) -> int:
        spec = self.rt.nets[net]
        return _bytes(spec["outputs" if output else "inputs"][index], spec["_dtypes"][1 if output else 0][index])

    def _device(self, net: str, index: int, output: bool = False) -> int:
        return self.rt.nets[net]["outputs" if output else "inputs"][index]["device"]

    def _cache(self, layer: int):
        """(history_k, history_v, device, bytes) of a layer: the net's own input memory where it keeps it."""
        net = block_cache_net(layer)
        size, device = self._size(net, 3), self._device(net, 3)
        if layer in self.copied:
            k, v = self._alloc(size, device), self._alloc(size, device)
        else:
            k, v = self.rt.mems[net][0][3], self.rt.mems[net][0][4]
        for mem in (k, v):  # unwritten slots are masked, but 0 x NaN would still be NaN
            self.rt.zero(mem, device)
        return k, v, device, size

    def _has_mask(self, net: str) -> bool:
        """A prefill net with an attention_mask input (llm_convert's dynamic ones build theirs inside)."""
        return any(t["name"] == "attention_mask" for t in self.rt.nets[net]["inputs"])

    def _rows(self, net: str, index: int, rows: int, output: bool = False) -> list[int]:
        """A prefill tensor's shape [1, rows, ...]: its largest, with the run's length in dim 1."""
        shape = list(self.rt.nets[net]["outputs" if output else "inputs"][index]["shape"])
        return [shape[0], rows, *shape[2:]]

    def _dtype(self, net: str, index: int) -> int:
        return self.rt.nets[net]["_dtypes"][0][index]

    @_quiet
    def prefill(self, ids: list[int], start: int = 0) -> None:
        """Tokens ids[start:], the cache holding the first `start`: runs of block_i and block_kv_i
        (engine.prefill_plan), each layer's K/V written into the cache on the device."""
        rt = self.rt
        if start == 0:  # a linear layer's state starts from zeros
            for i, pairs in self.states.items():
                for mem in pairs[self.current[i]]:
                    rt.zero(mem, self._device(block_cache_net(i), 1))
        for c in prefill_plan(self.info, start, len(ids)):
            embed_in = rt.mems["embedding"][0][0]  # (the embedding is static: it pads, and costs little)
            rt.h2d(embed_in, pad_ids(ids[c.begin:c.end], self.info.embed_rows),
                   self._device("embedding", 0), "input_ids")
            rt.launch("embedding", [rt.tensor("embedding", 0, False, embed_in)],
                      [rt.tensor("embedding", 0, True, self.hidden[0])])
            first = f"{c.net}_{self.attn}"
            rt.h2d(self.positions, c.positions(self.seq), self._device(first, 1), "position_ids")
            if self._has_mask(first):
                rt.h2d(self.mask, to_device_type(c.mask(), self._dtype(first, 2)), self._device(first, 2),
                       "attention_mask")
            for i in range(self.layers):
                if i in self.states:
                    self._linear(i, c)
                else:
                    (self._block if c.net == "block" else self._block_kv)(i, c)
        last = self.hidden[self.layers % 2]
        self.last_run = (c.begin, c.end)  # its rows' hidden states stay in `last`: prompt_logits
        self._head(rt.at(last, (c.end - c.begin - 1) * self.row_bytes, self.row_bytes))
        if self.sample_inputs:  # the repetition penalty's window: the prompt, then one token per step
            rt.h2d(self.sample_inputs[1], penalty_window(ids, self.seq), self._device("sample_head", 1), "input_ids")

    def _inputs(self, net: str, c) -> list:
        """A prefill net's hidden states, positions and (where it has one) mask, at the run's rows."""
        rt, i = self.rt, int(net.rpartition("_")[2])
        inputs = [rt.tensor(net, 0, False, self.hidden[i % 2], self._rows(net, 0, c.rows)),
                  rt.tensor(net, 1, False, self.positions, [1, c.rows])]
        if self._has_mask(net):
            inputs.append(rt.tensor(net, 2, False, self.mask, [1, 1, c.rows, c.history + c.rows]))
        return inputs

    def _block(self, i: int, c) -> None:
        """block_i from position 0: its K/V of the run's rows land in the cache itself."""
        rt, net = self.rt, block_net(i)
        k, v, _, _ = self.cache[i]
        rt.launch(net, self._inputs(net, c),
                  [rt.tensor(net, 0, True, self.hidden[(i + 1) % 2], self._rows(net, 0, c.rows, True)),
                   rt.tensor(net, 1, True, k, self._rows(net, 1, c.rows, True)),
                   rt.tensor(net, 2, True, v, self._rows(net, 2, c.rows, True))])

    def _linear(self, i: int, c) -> None:
        """A linear-attention layer over the run's tokens, from one hidden buffer to the other:
        whole windows through block_i, the rest token by token through block_cache_i; rows past
        the tokens (a static prefill's padding) are copied over as they are."""
        window, n, row = self.info.window, c.end - c.begin, self.row_bytes
        src, dst, t = self.hidden[i % 2], self.hidden[(i + 1) % 2], 0
        while t + window <= n:
            self._linear_run(i, block_net(i), self.rt.at(src, t * row, window * row), self.rt.at(dst, t * row, window * row))
            t += window
        for t in range(t, n):
            self._linear_run(i, block_cache_net(i), self.rt.at(src, t * row, row), self.rt.at(dst, t * row, row))
        if c.rows > n:
            self.rt.d2d(dst, n * row, src, n * row, (c.rows - n) * row, self._device(block_net(i), 0))

    def _linear_run(self, i: int, net: str, hidden_in, hidden_out) -> None:
        """One run of a linear layer's net: the state from the current pair of buffers into the other."""
        rt, now = self.rt, self.current[i]
        (conv, recurrent), (next_conv, next_recurrent) = self.states[i][now], self.states[i][1 - now]
        rt.launch(net, [rt.tensor(net, 0, False, hidden_in), rt.tensor(net, 1, False, conv),
                        rt.tensor(net, 2, False, recurrent)],
                  [rt.tensor(net, 0, True, hidden_out), rt.tensor(net, 1, True, next_conv),
                   rt.tensor(net, 2, True, next_recurrent)])
        self.current[i] = 1 - now

    def _block_kv(self, i: int, c) -> None:
        """block_kv_i: the run's tokens against the first `c.history` cache slots; the new K/V of
        its real rows then go into the cache at their positions (padding rows never reach it)."""
        rt, net = self.rt, block_kv_net(i)
        k, v, device, _ = self.cache[i]
        history = [1, c.history, *self.rt.nets[net]["inputs"][-1]["shape"][2:]]
        scratch_k, scratch_v = self.kv_scratch
        inputs = self._inputs(net, c)
        inputs += [rt.tensor(net, len(inputs), False, k, history), rt.tensor(net, len(inputs) + 1, False, v, history)]
        rt.launch(net, inputs,
                  [rt.tensor(net, 0, True, self.hidden[(i + 1) % 2], self._rows(net, 0, c.rows, True)),
                   rt.tensor(net, 1, True, scratch_k, self._rows(net, 1, c.rows, True)),
                   rt.tensor(net, 2, True, scratch_v, self._rows(net, 2, c.rows, True))])
        new = (c.end - c.begin) * self.kv_bytes
        rt.d2d(k, c.begin * self.kv_bytes, scratch_k, 0, new, device)
        rt.d2d(v, c.begin * self.kv_bytes, scratch_v, 0, new, device)

    @_quiet
    def decode(self, token: int, pos: int) -> None:
        """One token at `pos`, through the shortest decode stage that holds the cache (every stage
        reads the cache's first slots in the one memory)."""
        rt, first, stage = self.rt, self.attn_cache, decode_stage(self.info, pos)
        embed_in = rt.mems["embedding_cache"][0][0]
        hidden = rt.mems["block_cache_0"][0][0]  # embedding_cache writes straight into block_cache_0's input
        rt.h2d(embed_in, np.array([[token]], np.int32), self._device("embedding_cache", 0), "input_ids")
        if self.sample_inputs:
            rt.h2d(rt.at(self.sample_inputs[1], pos * 4, 4), np.array([token], np.int32),
                   self._device("sample_head", 1), "the penalty window's new token")
        rt.launch("embedding_cache", [rt.tensor("embedding_cache", 0, False, embed_in)],
                  [rt.tensor("embedding_cache", 0, True, hidden)])
        position, mask = self.step_inputs
        rt.h2d(position, np.array([[pos]], np.int32), self._device(first, 1), "position_ids")
        rt.h2d(mask, to_device_type(decode_mask(pos, stage), self._dtype(first, 2)), self._device(first, 2),
               "attention_mask")
        history = [1, stage, *rt.nets[first]["inputs"][3]["shape"][2:]]
        for i in range(self.layers):
            net = block_cache_net(i)
            inputs, outputs = rt.mems[net]
            if i in self.states:
                self._linear_run(i, net, hidden, outputs[0])
                hidden = outputs[0]
                continue
            k, v, device, size = self.cache[i]
            if i in self.copied:  # the net reads its history where the compiler put it, among shared memory
                rt.d2d(inputs[3], 0, k, 0, size, device)
                rt.d2d(inputs[4], 0, v, 0, size, device)
                k_in, v_in = inputs[3], inputs[4]
            else:
                k_in, v_in = k, v
            rt.launch(net, [rt.tensor(net, 0, False, hidden), rt.tensor(net, 1, False, position),
                            rt.tensor(net, 2, False, mask, [1, 1, 1, stage + 1]),
                            rt.tensor(net, 3, False, k_in, history), rt.tensor(net, 4, False, v_in, history)],
                      [rt.tensor(net, 0, True, outputs[0]),
                       rt.tensor(net, 1, True, rt.at(k, pos * self.kv_bytes, self.kv_bytes)),
                       rt.tensor(net, 2, True, rt.at(v, pos * self.kv_bytes, self.kv_bytes))])
            hidden = outputs[0]
        self._head(hidden)

    def rewind(self, tokens: list[int]) -> None:
        """The cache keeps `tokens` (Engine.rewind): the repetition penalty's window is theirs again,
        and no logits are read until the next step."""
        if self.sample_inputs:
            self.rt.h2d(self.sample_inputs[1], penalty_window(tokens, self.seq), self._device("sample_head", 1),
                        "input_ids")
        self.stepped = False

    def _head(self, hidden) -> None:
        rt = self.rt
        rt.launch("lm_head", [rt.tensor("lm_head", 0, False, hidden)], [rt.tensor("lm_head", 0, True, self.logits_mem)])
        self.stepped = True

    @property
    def traffic(self):
        return self.rt.traffic

    def _read_head(self) -> np.ndarray:
        if not self.stepped:
            raise ToolchainError("nothing to read: prefill first")
        rt, spec = self.rt, self.rt.nets["lm_head"]
        rt.sync()  # the step's one wait: every net of it was queued without one
        dtype = spec["_dtypes"][1][0]
        out = np.zeros(spec["outputs"][0]["shape"], DTYPES[dtype][1])
        return from_device_type(rt.d2h(self.logits_mem, out, self._device("lm_head", 0, True), "logits"), dtype)

    @_quiet
    def prompt_logits(self, first: int = 0) -> np.ndarray:
        """The logits [n - first, V] of positions first .. n-1 of the last prefill: each row of its
        last run, still on the device, through lm_head (teacher forcing in one prefill)."""
        from .engine import scored_rows

        if self.info.head == "token":
            raise ValueError(f"{self.info.bmodel}: its lm_head gives a token, not logits: it cannot be scored")
        begin, end = self.last_run
        last, logits = self.hidden[self.layers % 2], []
        for row in scored_rows(first, begin, end):
            self._head(self.rt.at(last, row * self.row_bytes, self.row_bytes))
            logits.append(self._read_head()[0])
        return np.stack(logits)

    @_quiet
    def logits(self) -> np.ndarray:
        """The last step's logits [V] (float32), or a one-hot of the token a token head chose."""

        values = self._read_head()
        return token_as_logits(values)[0] if self.info.head == "token" else values[0]

    @_quiet
    def token(self) -> int | None:
        """The greedy token chosen on the device (a token head, or a greedy head), else None."""
        if self.info.head == "token":
            return int(self._read_head().ravel()[0])
        if not self.info.greedy_head:
            return None
        rt, out = self.rt, self.rt.mems["greedy_head"][1][0]
        rt.launch("greedy_head", [rt.tensor("greedy_head", 0, False, self.logits_mem)],
                  [rt.tensor("greedy_head", 0, True, out)])
        rt.sync()
        return int(rt.d2h(out, np.zeros(1, np.int32), self._device("greedy_head", 0, True), "token")[0])

    @_quiet
    def candidates(self, penalty: float, temperature: float, top_k: int, top_p: float):
        """The sample head's candidates: (probabilities, token ids), all of its outputs (top-k keeps
        ties, so there can be more than top_k). The parameters are written when they change; the
        token window is already there."""
        rt, net, inputs = self.rt, "sample_head", self.sample_inputs
        params = (penalty, temperature, top_k, top_p)
        if params != self.sample_params:
            for index, value, dtype in ((2, penalty, np.float32), (3, temperature, np.float32), (4, top_k, np.int32),
                                        (5, top_p, np.float32)):
                rt.h2d(inputs[index], np.array([value], dtype), self._device(net, index), "sampling parameters")
            self.sample_params = params
        outputs = rt.mems[net][1]
        rt.launch(net, [rt.tensor(net, 0, False, self.logits_mem),
                        *(rt.tensor(net, i, False, inputs[i]) for i in range(1, 6))],
                  [rt.tensor(net, 0, True, outputs[0]), rt.tensor(net, 1, True, outputs[1])])
        rt.sync()
        width = rt.nets[net]["outputs"][0]["shape"][-1]
        probs = rt.d2h(outputs[0], np.zeros(width, np.float32), self._device(net, 0, True), "probabilities")
        ids = rt.d2h(outputs[1], np.zeros(width, np.int32), self._device(net, 1, True), "token ids")
        return probs, ids
