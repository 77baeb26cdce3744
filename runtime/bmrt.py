"""The BM runtime's C API (libbmrt, libbmlib) through ctypes, from any Python: the same calls on a
Sophgo device (libsophon, PCIe or SoC) and on the TPU-MLIR cmodel simulator (its libcmodel.so
stands in for the chip). Where the libraries are:
  QWEN_TPU_LIBSOPHON   the folder holding libbmrt.so and libbmlib.so (a device; default
                       /opt/sophon/libsophon-current/lib when it exists)
  else                 the TPU-MLIR toolchain's lib/ with libcmodel.so: the simulator."""
import atexit
import ctypes
import os
from pathlib import Path

import numpy as np

from .toolchain_process import ToolchainError, find_toolchain

DEVICE_LIBS = Path("/opt/sophon/libsophon-current/lib")
# bm_data_type_t
DTYPES = {0: ("f32", np.float32), 1: ("f16", np.float16), 2: ("i8", np.int8), 3: ("u8", np.uint8),
          4: ("i16", np.int16), 5: ("u16", np.uint16), 6: ("i32", np.int32), 7: ("u32", np.uint32),
          8: ("bf16", np.uint16)}


class Shape(ctypes.Structure):
    _fields_ = [("num_dims", ctypes.c_int), ("dims", ctypes.c_int * 8)]


class StageInfo(ctypes.Structure):
    _fields_ = [("input_shapes", ctypes.POINTER(Shape)), ("output_shapes", ctypes.POINTER(Shape))]


class NetInfo(ctypes.Structure):  # the leading fields of bm_net_info_t (bmruntime_interface.h)
    _fields_ = [("name", ctypes.c_char_p), ("is_dynamic", ctypes.c_bool), ("input_num", ctypes.c_int),
                ("input_names", ctypes.POINTER(ctypes.c_char_p)), ("input_dtypes", ctypes.POINTER(ctypes.c_int)),
                ("input_scales", ctypes.POINTER(ctypes.c_float)), ("output_num", ctypes.c_int),
                ("output_names", ctypes.POINTER(ctypes.c_char_p)), ("output_dtypes", ctypes.POINTER(ctypes.c_int)),
                ("output_scales", ctypes.POINTER(ctypes.c_float)), ("stage_num", ctypes.c_int),
                ("stages", ctypes.POINTER(StageInfo))]


def library_dir() -> tuple[Path, bool]:
    """(folder of the runtime libraries, whether it is the simulator)."""
    if os.environ.get("QWEN_TPU_LIBSOPHON"):
        folder = Path(os.environ["QWEN_TPU_LIBSOPHON"])
        if not (folder / "libbmrt.so").exists():
            raise ToolchainError(f"QWEN_TPU_LIBSOPHON={folder} has no libbmrt.so: point it at libsophon's lib "
                                 "folder (e.g. /opt/sophon/libsophon-current/lib)")
        return folder, False
    if (DEVICE_LIBS / "libbmrt.so").exists():
        return DEVICE_LIBS, False
    libs = sorted(find_toolchain().glob("lib/python3*/*-packages/tpu_mlir/lib"))
    if not libs:
        raise ToolchainError("no BM runtime found: install libsophon (or set QWEN_TPU_LIBSOPHON), or build once "
                             "so that the TPU-MLIR toolchain (and its simulator) is there")
    return libs[0], True


class Runtime:
    """One loaded bmodel on one device: nets by name, run with host numpy arrays."""

    def __init__(self, bmodel: Path, devid: int = 0):
        folder, simulator = library_dir()
        names = (["libcmodel.so"] if simulator else []) + ["libbmlib.so", "libbmrt.so"]
        libs = [ctypes.CDLL(str(folder / n), mode=ctypes.RTLD_GLOBAL) for n in names]  # absolute paths
        self.bmlib, self.bmrt = libs[-2], libs[-1]
        self.bmrt.bmrt_create.restype = ctypes.c_void_p
        self.bmrt.bmrt_get_network_info.restype = ctypes.POINTER(NetInfo)
        self.bmrt.bmrt_get_network_info.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.bmrt.bmrt_launch_data.restype = ctypes.c_bool
        self.bmrt.bmrt_launch_data.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(Shape), ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(Shape), ctypes.c_int, ctypes.c_bool]
        self.handle = ctypes.c_void_p()
        if self.bmlib.bm_dev_request(ctypes.byref(self.handle), devid) != 0:
            raise ToolchainError(f"cannot open device {devid} ({'simulator' if simulator else folder})")
        self.p = ctypes.c_void_p(self.bmrt.bmrt_create(self.handle))
        if not self.bmrt.bmrt_load_bmodel(self.p, str(bmodel).encode()):
            raise ToolchainError(f"the BM runtime could not load {bmodel}")
        self.simulator = simulator
        atexit.register(self.close)  # the C runtime must be torn down before the interpreter's own exit
        names_pp = ctypes.POINTER(ctypes.c_char_p)()
        self.bmrt.bmrt_get_network_names(self.p, ctypes.byref(names_pp))
        count = self.bmrt.bmrt_get_network_number(self.p)
        self.nets = {names_pp[i].decode(): self._net(names_pp[i]) for i in range(count)}

    def close(self) -> None:
        if self.p:
            self.bmrt.bmrt_destroy(self.p)
            self.bmlib.bm_dev_free(self.handle)
            self.p = None

    def _net(self, name: bytes) -> dict:
        info = self.bmrt.bmrt_get_network_info(self.p, name).contents
        stage = info.stages[0]

        def tensors(count, names, dtypes, shapes):
            return [{"name": names[i].decode(), "dtype": DTYPES[dtypes[i]][0],
                     "shape": [shapes[i].dims[d] for d in range(shapes[i].num_dims)]} for i in range(count)]

        return {"inputs": tensors(info.input_num, info.input_names, info.input_dtypes, stage.input_shapes),
                "outputs": tensors(info.output_num, info.output_names, info.output_dtypes, stage.output_shapes),
                "_dtypes": ([info.input_dtypes[i] for i in range(info.input_num)],
                            [info.output_dtypes[i] for i in range(info.output_num)])}

    def run(self, net: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Inputs as float32/int32 (converted to the net's dtypes); outputs as float32/int32."""
        spec = self.nets[net]
        in_types, out_types = spec["_dtypes"]
        inputs = [_to_device_type(a, t) for a, t in zip(arrays, in_types, strict=True)]
        outputs = [np.zeros(o["shape"], DTYPES[t][1]) for o, t in zip(spec["outputs"], out_types)]
        in_shapes, out_shapes = (Shape * len(inputs))(), (Shape * len(outputs))()
        for shape, a in zip(in_shapes, inputs):
            shape.num_dims = a.ndim
            for d, n in enumerate(a.shape):
                shape.dims[d] = n
        in_ptrs = (ctypes.c_void_p * len(inputs))(*(a.ctypes.data for a in inputs))
        out_ptrs = (ctypes.c_void_p * len(outputs))(*(o.ctypes.data for o in outputs))
        if not self.bmrt.bmrt_launch_data(self.p, net.encode(), in_ptrs, in_shapes, len(inputs), out_ptrs,
                                          out_shapes, len(outputs), True):
            raise ToolchainError(f"the BM runtime failed to run {net}")
        return [_from_device_type(o, t) for o, t in zip(outputs, out_types)]


def _to_device_type(array: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == 8:  # bf16: round to nearest even, keep the upper 16 bits
        bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(array, DTYPES[dtype][1])


def _from_device_type(array: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == 8:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32) if dtype in (1, 0) else array
