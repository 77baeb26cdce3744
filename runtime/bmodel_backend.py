"""The bmodel backend: the BM runtime's C API in this process (runtime/bmrt.py), libsophon on a
device, the cmodel simulator here. (The build's checks also run bmodels with pyruntime_bm inside the
toolchain's process: pipeline/toolchain/pyruntime_backend.py.)

Like Sophgo's own demo, it reads everything from the file's nets: SEQ from block_0's input, the
layer count from the block_i nets, K/V heads and head size from the first attention layer's
block_cache history (Qwen3.5's first layers are linear attention: their states' shapes too), the
dtypes from each tensor. So they also run bmodels made by tpu-mlir's llm_convert.py. Where the
lm_head returns the chosen token instead of logits (llm_convert's), decoding is greedy."""
import time
from pathlib import Path

import numpy as np

from .native_output import output_to
from .nets import describe_nets, token_as_logits


class BmodelBackend:
    """A bmodel through the BM runtime's C API, in this process. Its engine walk keeps the K/V
    cache and the activations on the device (runtime/device_walk.py); `resident=False` walks it
    from host arrays instead, every net's inputs copied in and outputs out (the old way, kept to
    measure against and for one-piece bmodels)."""

    def __init__(self, bmodel: Path, devids: list[int] = (0,), whole_model: bool = True, resident: bool = True):
        from .bmrt import Runtime

        self.bmodel = Path(bmodel).resolve()
        if not self.bmodel.is_file():
            raise FileNotFoundError(f"{bmodel} does not exist")
        self.runtime = Runtime(self.bmodel, list(devids))
        self.nets = self.runtime.nets
        self.info = describe_nets(self.nets, self.bmodel) if whole_model else None  # one-piece bmodels: the build
        self.resident, self.seconds, self._walk = resident, 0.0, None

    @property
    def traffic(self):
        return self.runtime.traffic

    def walk(self):
        from .device_walk import DeviceWalk
        from .engine import HostWalk

        if not self.resident:
            return HostWalk(self)
        if self._walk is None:  # one per loaded bmodel: the cache is the nets' own memory
            with output_to(self.runtime.log):
                self._walk = DeviceWalk(self.runtime, self.info)
        return self._walk

    def run(self, net: str, feeds: dict) -> list[np.ndarray]:
        names = [t["name"] for t in self.nets[net]["inputs"]]
        start = time.perf_counter()
        values = self.runtime.run(net, [feeds[n] for n in names])
        self.seconds += time.perf_counter() - start
        if net == "lm_head" and self.info is not None and self.info.head == "token":
            return [token_as_logits(values[0])]
        return values

    def close(self) -> None:
        """Frees the device memory and handles. On the simulator its threads keep spinning until the
        process exits: long-lived processes use isolated_backend.py instead."""
        if self._walk is not None:
            self._walk.close()
            self._walk = None
        self.runtime.close()
