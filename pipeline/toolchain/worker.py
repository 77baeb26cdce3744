"""The build's long-lived process inside the TPU-MLIR toolchain (Python 3.10), started by
process.py: it runs the toolchain's Python tools in-process, so torch and tpu_mlir are imported once
instead of once per piece (a model_transform.py start-up costs ~5 s; a transform in this process
~0.1 s for a small piece), and it runs bmodel nets with pyruntime_bm for the build's checks (on the
cmodel simulator here) with the models kept loaded.

Protocol: one JSON request per line on stdin, one JSON answer per line on the original stdout.
While a request runs, fds 1 and 2 point at the request's log file (tools and the tpuc-opt
subprocesses they start write there). Standalone: stdlib, numpy, tpu_mlir and runtime/native_output.py.
"""
import json
import os
import runpy
import sys
import threading
import time
import traceback

import numpy as np
import tpu_mlir  # noqa: F401  (sets TPUC_ROOT, PATH, LD_LIBRARY_PATH for child processes)

# the project's root, last: this script runs as __main__ from pipeline/toolchain/
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from runtime.native_output import output_to  # noqa: E402  (standard library only, as this Python needs)

TOOLS = {}
MODELS = {}


def run_tool(request):
    """A console tool (model_transform / model_deploy) as `python tool.py argv...` would run it."""
    if request["tool"] not in TOOLS:
        module = __import__(f"tpu_mlir.python.tools.{request['tool']}", fromlist=["_"])
        TOOLS[request["tool"]] = module.__file__
    cwd = os.getcwd()
    os.chdir(request["cwd"])
    code = 0
    with output_to(request["log"]):
        sys.argv = [f"{request['tool']}.py", *request["argv"]]
        try:
            runpy.run_path(TOOLS[request["tool"]], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:  # the tool's own error: to its log, as its own process would
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(cwd)
    return {"code": code}


def load_model(path, devid=0):
    if (path, devid) not in MODELS:
        import ctypes

        from tpu_mlir.python.tools.model_runner import (bind_cmodel_so, get_chip_from_model, link_bmlib_so,
                                                        link_cmodel_so)
        from filelock import FileLock

        chip = get_chip_from_model(path)
        with FileLock("/tmp/cmodel_so.lock"):  # the simulator's library links are shared
            link_cmodel_so(chip)
            link_bmlib_so(chip)
            # by absolute path: LD_LIBRARY_PATH set after start-up is not seen by the loader
            ctypes.CDLL(os.path.join(os.environ["TPUC_ROOT"], "lib", "libcmodel.so"), mode=ctypes.RTLD_GLOBAL)
            import pyruntime_bm
            bind_cmodel_so(chip)
        # one loaded at a time: the simulated device's memory then holds only this bmodel's (with
        # several loaded, a sample head after Qwen3.5's nets read a misaligned address and aborted)
        MODELS.clear()
        MODELS[(path, devid)] = pyruntime_bm.Model(path, devid, "")
    return MODELS[(path, devid)]


def run_net(request):
    """One forward of a net on the simulator; inputs and outputs as float32/int32 npz files. A
    dynamic net runs at the inputs' shapes (up to its largest), as model_runner.py runs it."""
    from tpu_mlir.python.utils.lowering import bf16_to_fp32, lowering

    net = load_model(request["bmodel"], request.get("devid", 0)).Net(request["net"])
    inputs = np.load(request["inputs"])
    shapes = []
    for tensor in net.inputs:
        value = inputs[tensor.name]
        tensor.data.reshape(-1)[:value.size] = lowering(value, pdtype=tensor.dtype, pshape=value.shape,
                                                        pzero_point=tensor.qzero_point,
                                                        pscale=tensor.qscale).flatten()
        shapes.append(list(value.shape))
    start = time.perf_counter()
    out_shapes = net.forward_dynamic(shapes)
    seconds = time.perf_counter() - start
    outputs, dtypes = {}, {}
    for k, (tensor, shape) in enumerate(zip(net.outputs, out_shapes)):
        dtypes[tensor.name] = str(tensor.dtype)
        if tensor.dtype == "bf16":
            value = bf16_to_fp32(tensor.data)
        elif tensor.dtype in ("f16", "u16"):
            value = tensor.data.astype(np.float32)
        else:
            value = np.array(tensor.data)
        outputs[f"output_{k}"] = value.reshape(-1)[:int(np.prod(shape))].reshape(shape)
    np.savez(request["outputs"], **outputs)
    return {"code": 0, "seconds": seconds, "names": [t.name for t in net.outputs], "dtypes": dtypes,
            "input_dtypes": {t.name: str(t.dtype) for t in net.inputs}}


def net_info(request):
    """Every net of a bmodel with its inputs and outputs (name, shape, dtype)."""
    model = load_model(request["bmodel"], request.get("devid", 0))
    nets = {}
    for name in model.networks:
        net = model.Net(name)
        nets[name] = {kind: [{"name": t.name, "shape": list(t.data.shape), "dtype": str(t.dtype)}
                             for t in getattr(net, kind)] for kind in ("inputs", "outputs")}
    return {"code": 0, "nets": nets}


def exit_with_parent(parent: int) -> None:
    """A build killed by SIGKILL (an OOM kill, a CI time-out) cannot stop this worker, which would
    go on with the piece it was given for minutes. It notices being orphaned and exits."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main():
    exit_with_parent(os.getppid())
    answers = os.fdopen(os.dup(1), "w")
    # requests on a copy of stdin: a tool's `exit()` (model_deploy.py --not_gen_bmodel) closes sys.stdin
    requests, sys.stdin = os.fdopen(os.dup(0), "r"), open(os.devnull)
    log = os.environ.get("QWEN_TPU_WORKER_LOG", os.devnull)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # stray prints between requests must not corrupt the answers
    os.dup2(fd, 2)
    handlers = {"tool": run_tool, "run_net": run_net, "net_info": net_info,
                "ping": lambda r: {"code": 0, "pid": os.getpid()}}
    for line in requests:
        request = json.loads(line)
        try:
            answer = handlers[request["op"]](request)
        except Exception as err:
            traceback.print_exc()
            answer = {"code": 1, "error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
