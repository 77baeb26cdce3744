"""The build's way to run a bmodel: tpu-mlir's pyruntime_bm inside the toolchain's process
(worker.py), inputs and outputs through npz files; the runtime runs bmodels with the BM runtime's C
API instead (runtime/bmodel_backend.py)."""
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from runtime.nets import describe_nets, token_as_logits
from runtime.toolchain import ToolchainError, find_toolchain

from .process import ToolchainProcess


class PyruntimeBackend:
    """A bmodel run net by net with pyruntime_bm in a toolchain process (one-piece bmodels too):
    `run(net, feeds)`, walked by the engine's HostWalk. The build's simulator checks use it."""

    def __init__(self, bmodel: Path, devid: int = 0, process: ToolchainProcess | None = None,
                 log: Path | None = None, whole_model: bool = True):
        self.bmodel, self.devid = Path(bmodel).resolve(), devid
        if not self.bmodel.is_file():
            raise FileNotFoundError(f"{bmodel} does not exist")
        self.scratch = Path(tempfile.mkdtemp(prefix="bmodel-"))
        weakref.finalize(self, shutil.rmtree, self.scratch, True)  # the nets' inputs and outputs, per run
        self.owns_process = process is None
        self.process = process or ToolchainProcess(find_toolchain(), log or self.scratch / "toolchain.log")
        self.nets = self._request(op="net_info")["nets"]
        self.info = describe_nets(self.nets, self.bmodel) if whole_model else None  # one-piece bmodels: the build
        self.seconds = 0.0

    def _request(self, **request) -> dict:
        answer = self.process.request(bmodel=str(self.bmodel), devid=self.devid, **request)
        if answer["code"] != 0:
            raise ToolchainError(f"{self.bmodel}: {request['op']} {request.get('net', '')} failed: "
                                 f"{answer.get('error')} (log: {self.process.log})")
        return answer

    def close(self) -> None:
        """Stops its own toolchain process: on the simulator, a process that loaded a bmodel keeps
        both cores busy until it exits (see isolated_backend.py). A shared one is its owner's to close."""
        if self.owns_process:
            self.process.close()

    def run(self, net: str, feeds: dict) -> list[np.ndarray]:
        inputs, outputs = self.scratch / "in.npz", self.scratch / "out.npz"
        np.savez(inputs, **feeds)
        answer = self._request(op="run_net", net=net, inputs=str(inputs), outputs=str(outputs))
        self.seconds += answer["seconds"]
        with np.load(outputs) as out:
            values = [out[f"output_{k}"] for k in range(len(answer["names"]))]
        if net == "lm_head" and self.info is not None and self.info.head == "token":
            return [token_as_logits(values[0])]
        return values
