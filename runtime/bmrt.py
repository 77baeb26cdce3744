"""The BM runtime's C API (libbmrt, libbmlib) through ctypes, from any Python: the same calls on a
Sophgo device (libsophon, PCIe or SoC) and on the TPU-MLIR cmodel simulator (its libcmodel.so
stands in for the chip). Where the libraries are:
  QWEN_TPU_LIBSOPHON   the folder holding libbmrt.so and libbmlib.so (a device; default
                       /opt/sophon/libsophon-current/lib when it exists)
  else                 the TPU-MLIR toolchain's lib/ with libcmodel.so: the simulator.
  QWEN_TPU_RUNTIME_LOG where the runtime libraries' own output goes (default: a file in the temp
                       folder); the simulator prints a few lines at every launch, which would
                       otherwise land in the middle of the chat's text."""
import atexit
import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np

from .native_output import flush_c_stdio, output_to, redirect_to
from .toolchain import ToolchainError, find_toolchain
from .traffic import Traffic

DEVICE_LIBS = Path("/opt/sophon/libsophon-current/lib")
# bm_data_type_t
DTYPES = {0: ("f32", np.float32), 1: ("f16", np.float16), 2: ("i8", np.int8), 3: ("u8", np.uint8),
          4: ("i16", np.int16), 5: ("u16", np.uint16), 6: ("i32", np.int32), 7: ("u32", np.uint32),
          8: ("bf16", np.uint16)}
BM_RUNTIME_SHARE_MEM = 1  # bm_runtime_flag_t: the nets share one neuron memory (io_alone I/O stays apart)


class Shape(ctypes.Structure):  # bm_shape_t
    _fields_ = [("num_dims", ctypes.c_int), ("dims", ctypes.c_int * 8)]


class DeviceMem(ctypes.Structure):  # bm_device_mem_t (bmlib_runtime.h, Linux): a 16-byte union, flags, size
    _fields_ = [("address", ctypes.c_uint64), ("reserved", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class Tensor(ctypes.Structure):  # bm_tensor_t
    _fields_ = [("dtype", ctypes.c_int), ("shape", Shape), ("device_mem", DeviceMem), ("st_mode", ctypes.c_int)]


class StageInfo(ctypes.Structure):  # bm_stage_info_t
    _fields_ = [("input_shapes", ctypes.POINTER(Shape)), ("output_shapes", ctypes.POINTER(Shape)),
                ("input_mems", ctypes.POINTER(DeviceMem)), ("output_mems", ctypes.POINTER(DeviceMem))]


class NetInfo(ctypes.Structure):  # bm_net_info_t (bmruntime_interface.h / bmdef.h)
    _fields_ = [("name", ctypes.c_char_p), ("is_dynamic", ctypes.c_bool), ("input_num", ctypes.c_int),
                ("input_names", ctypes.POINTER(ctypes.c_char_p)), ("input_dtypes", ctypes.POINTER(ctypes.c_int)),
                ("input_scales", ctypes.POINTER(ctypes.c_float)), ("output_num", ctypes.c_int),
                ("output_names", ctypes.POINTER(ctypes.c_char_p)), ("output_dtypes", ctypes.POINTER(ctypes.c_int)),
                ("output_scales", ctypes.POINTER(ctypes.c_float)), ("stage_num", ctypes.c_int),
                ("stages", ctypes.POINTER(StageInfo)), ("max_input_bytes", ctypes.POINTER(ctypes.c_size_t)),
                ("max_output_bytes", ctypes.POINTER(ctypes.c_size_t)),
                ("input_zero_point", ctypes.POINTER(ctypes.c_int)), ("output_zero_point", ctypes.POINTER(ctypes.c_int)),
                ("input_loc_devices", ctypes.POINTER(ctypes.c_int)),
                ("output_loc_devices", ctypes.POINTER(ctypes.c_int)), ("core_num", ctypes.c_int),
                ("addr_mode", ctypes.c_int32)]


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


def native_log() -> Path:
    return Path(os.environ.get("QWEN_TPU_RUNTIME_LOG") or Path(tempfile.gettempdir()) / f"qwen-tpu-bmrt-{os.getpid()}.log")


class Runtime:
    """One loaded bmodel on one or more devices: nets by name, run with host numpy arrays.

    Like Sophgo's demos, every tensor gets device memory on the device the net keeps it on
    (`input_loc_devices`; all 0 for a one-device bmodel) and runs through bmrt_launch_tensor_ex:
    bmrt_launch_data would put every input on the first device. So the simulator runs the same
    code path that a multi-device bmodel takes on hardware."""

    def __init__(self, bmodel: Path, devids: list[int] = (0,)):
        self.log = native_log()
        with output_to(self.log):
            self._open(bmodel, list(devids))

    def _open(self, bmodel: Path, devids: list[int]) -> None:
        folder, simulator = library_dir()
        names = (["libcmodel.so"] if simulator else []) + ["libbmlib.so", "libbmrt.so"]
        libs = [ctypes.CDLL(str(folder / n), mode=ctypes.RTLD_GLOBAL) for n in names]  # absolute paths
        self.bmlib, self.bmrt = libs[-2], libs[-1]
        self._declare()
        self.simulator, self.p, self.handles = simulator, None, []
        self._check_devices(devids, folder)
        for devid in devids:
            handle = ctypes.c_void_p()
            if self.bmlib.bm_dev_request(ctypes.byref(handle), devid) != 0:
                self.close()
                raise ToolchainError(f"cannot open device {devid} ({'simulator' if simulator else folder}; "
                                     f"the runtime's log: {self.log})")
            self.handles.append(handle)
        self.p = ctypes.c_void_p(self.bmrt.bmrt_create_ex((ctypes.c_void_p * len(devids))(*self.handles), len(devids)))
        atexit.register(self._close_at_exit)
        # as Sophgo's LLM runtime: without it every net gets neuron memory of its own (GBs at 32 layers)
        self.bmrt.bmrt_set_flags(self.p, BM_RUNTIME_SHARE_MEM)
        self.traffic, self._allocated = Traffic(), []
        if not self.bmrt.bmrt_load_bmodel(self.p, str(bmodel).encode()):
            raise ToolchainError(f"the BM runtime could not load {bmodel} on device(s) {devids} "
                                 f"(a bmodel built for N devices needs N ids in --devid; the runtime's log: {self.log})")
        names_pp = ctypes.POINTER(ctypes.c_char_p)()
        self.bmrt.bmrt_get_network_names(self.p, ctypes.byref(names_pp))
        count = self.bmrt.bmrt_get_network_number(self.p)
        self.nets = {names_pp[i].decode(): self._net(names_pp[i]) for i in range(count)}
        self.mems = {name: self._stage_mems(name) for name in self.nets}
        self._tensors = {}

    def _declare(self) -> None:
        bmrt, bmlib = self.bmrt, self.bmlib
        bmrt.bmrt_create_ex.restype = ctypes.c_void_p
        bmrt.bmrt_create_ex.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        bmrt.bmrt_get_network_info.restype = ctypes.POINTER(NetInfo)
        bmrt.bmrt_get_network_info.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        bmrt.bmrt_tensor_ex.restype = ctypes.c_bool
        bmrt.bmrt_tensor_ex.argtypes = [ctypes.POINTER(Tensor), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, Shape]
        bmrt.bmrt_free_device.argtypes = [ctypes.c_void_p, DeviceMem]
        bmrt.bmrt_launch_tensor_ex.restype = ctypes.c_bool
        bmrt.bmrt_launch_tensor_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(Tensor), ctypes.c_int,
                                               ctypes.POINTER(Tensor), ctypes.c_int, ctypes.c_bool, ctypes.c_bool]
        bmrt.bmrt_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        for name in ("bm_memcpy_s2d_partial", "bm_memcpy_d2s_partial"):
            getattr(bmlib, name).argtypes = [ctypes.c_void_p] + (
                [DeviceMem, ctypes.c_void_p] if name.endswith("s2d_partial") else [ctypes.c_void_p, DeviceMem]
            ) + [ctypes.c_uint32]
        bmlib.bm_memcpy_d2d_byte.argtypes = [ctypes.c_void_p, DeviceMem, ctypes.c_size_t, DeviceMem, ctypes.c_size_t,
                                             ctypes.c_size_t]
        bmlib.bm_malloc_device_byte.argtypes = [ctypes.c_void_p, ctypes.POINTER(DeviceMem), ctypes.c_uint32]
        bmlib.bm_free_device.argtypes = [ctypes.c_void_p, DeviceMem]
        bmlib.bm_memset_device_ext.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, DeviceMem]
        bmlib.bm_mem_from_device.restype = DeviceMem
        bmlib.bm_mem_from_device.argtypes = [ctypes.c_ulonglong, ctypes.c_uint32]
        bmlib.bm_thread_sync.argtypes = [ctypes.c_void_p]

    def _check_devices(self, devids: list[int], folder: Path) -> None:
        count = ctypes.c_int()
        self.bmlib.bm_dev_getcount(ctypes.byref(count))
        wrong = [d for d in devids if not 0 <= d < count.value]
        if wrong or len(set(devids)) != len(devids) or not devids:
            where = "the simulator has 1 device (id 0)" if self.simulator else f"{count.value} device(s) found"
            raise ToolchainError(f"device id(s) {devids} are not usable: {where}"
                                 + ("" if self.simulator else f" by libsophon in {folder}"))

    def close(self) -> None:
        with output_to(self.log):
            self._close()

    def _close_at_exit(self) -> None:
        """The C runtime must be torn down before the interpreter's own exit. The simulator prints
        as it shuts down, from a thread and from destructors that run after this: fds 1 and 2 stay
        on the log from here on."""
        redirect_to(self.log)
        self._close()

    def _close(self) -> None:
        if self.p:
            for tensors in getattr(self, "_tensors", {}).values():
                for tensor in [*tensors[0], *tensors[1]]:
                    self.bmrt.bmrt_free_device(self.p, tensor.device_mem)
            self._tensors = {}
            for device, mem in getattr(self, "_allocated", []):
                self.bmlib.bm_free_device(self.handles[device], mem)
            self._allocated = []
            self.bmrt.bmrt_destroy(self.p)
            self.p = None
        for handle in self.handles:
            self.bmlib.bm_dev_free(handle)
        self.handles = []

    def _net(self, name: bytes) -> dict:
        """A net's tensors (their shapes: its largest stage's), and the shapes of every stage: a
        cache net built with decode stages (chunk=C) has one per cache length."""
        info = self.bmrt.bmrt_get_network_info(self.p, name).contents
        largest = _largest_stage(info)
        stage = info.stages[largest]

        def tensors(count, names, dtypes, shapes, devices):
            return [{"name": names[i].decode(), "dtype": DTYPES[dtypes[i]][0],
                     "shape": _dims(shapes[i]), "device": devices[i] if devices else 0} for i in range(count)]

        return {"inputs": tensors(info.input_num, info.input_names, info.input_dtypes, stage.input_shapes,
                                  info.input_loc_devices),
                "outputs": tensors(info.output_num, info.output_names, info.output_dtypes, stage.output_shapes,
                                   info.output_loc_devices),
                "io_alone": info.addr_mode == 1, "dynamic": bool(info.is_dynamic),
                "stages": [[_dims(info.stages[s].input_shapes[i]) for i in range(info.input_num)]
                           for s in range(info.stage_num)],
                # every stage reads its inputs where the largest does (decode stages deployed onto its
                # io_alone addresses): the cache is one memory for all (outputs go where the caller says)
                "shared_inputs": all(_addresses(info, s) == _addresses(info, largest) for s in range(info.stage_num)),
                "_dtypes": ([info.input_dtypes[i] for i in range(info.input_num)],
                            [info.output_dtypes[i] for i in range(info.output_num)])}

    def _stage_mems(self, name: str) -> tuple[list[DeviceMem], list[DeviceMem]]:
        """The device memory the compiler gave a net's inputs and outputs (its largest stage's): for
        io_alone nets it is theirs alone and keeps its content between launches."""
        info = self.bmrt.bmrt_get_network_info(self.p, name.encode()).contents
        stage = info.stages[_largest_stage(info)]
        return ([DeviceMem.from_buffer_copy(stage.input_mems[i]) for i in range(info.input_num)],
                [DeviceMem.from_buffer_copy(stage.output_mems[i]) for i in range(info.output_num)])

    # -- device memory, counted: the primitives of runtime/device_walk.py --------------------------

    def alloc(self, nbytes: int, device: int = 0) -> DeviceMem:
        mem = DeviceMem()
        self._check(self.bmlib.bm_malloc_device_byte(self.handles[device], ctypes.byref(mem), nbytes),
                    f"allocate {nbytes} bytes of device memory on device {device}")
        self._allocated.append((device, mem))
        return mem

    def free(self, mem: DeviceMem, device: int = 0) -> None:
        for k, (where, held) in enumerate(self._allocated):
            if where == device and held.address == mem.address:
                self.bmlib.bm_free_device(self.handles[device], self._allocated.pop(k)[1])
                return

    def zero(self, mem: DeviceMem, device: int = 0) -> None:
        value = ctypes.c_int(0)
        self._check(self.bmlib.bm_memset_device_ext(self.handles[device], ctypes.byref(value), 1, mem),
                    "clear device memory")

    def at(self, mem: DeviceMem, offset: int, nbytes: int) -> DeviceMem:
        """A view of `nbytes` of `mem` from `offset`: what a net reads or writes in place."""
        if offset + nbytes > mem.size:
            raise ToolchainError(f"{offset}+{nbytes} bytes overrun a {mem.size}-byte device buffer")
        return self.bmlib.bm_mem_from_device(mem.address + offset, nbytes)

    def h2d(self, mem: DeviceMem, array: np.ndarray, device: int = 0, what: str = "input") -> None:
        data = np.ascontiguousarray(array)
        self._check(self.bmlib.bm_memcpy_s2d_partial(self.handles[device], mem, data.ctypes.data, data.nbytes),
                    f"copy {what} in")
        self.traffic.h2d += data.nbytes

    def d2h(self, mem: DeviceMem, out: np.ndarray, device: int = 0, what: str = "output") -> np.ndarray:
        self._check(self.bmlib.bm_memcpy_d2s_partial(self.handles[device], out.ctypes.data, mem, out.nbytes),
                    f"copy {what} out")
        self.traffic.d2h += out.nbytes
        return out

    def d2d(self, dst: DeviceMem, dst_offset: int, src: DeviceMem, src_offset: int, nbytes: int,
            device: int = 0) -> None:
        self._check(self.bmlib.bm_memcpy_d2d_byte(self.handles[device], dst, dst_offset, src, src_offset, nbytes),
                    "copy on the device")
        self.traffic.d2d += nbytes

    def tensor(self, net: str, index: int, output: bool, mem: DeviceMem, shape: list[int] | None = None) -> Tensor:
        """A tensor of `net`'s input (or output) `index` placed at `mem`; of `shape` where a dynamic
        net runs at less than its largest shape."""
        spec = self.nets[net]["outputs" if output else "inputs"][index]
        tensor = Tensor()
        tensor.dtype = self.nets[net]["_dtypes"][1 if output else 0][index]
        tensor.shape = _shape(shape or spec["shape"])
        tensor.device_mem = mem
        tensor.st_mode = 0
        return tensor

    def launch(self, net: str, inputs, outputs) -> None:
        """Queue a net on the device: no wait (sync() does that, once per step). Lists of tensors,
        or ctypes arrays of them (the runtime then writes a dynamic net's output shapes there)."""
        arrays = [group if isinstance(group, ctypes.Array) else (Tensor * len(group))(*group) for group in (inputs, outputs)]
        ok = self.bmrt.bmrt_launch_tensor_ex(self.p, net.encode(), arrays[0], len(inputs), arrays[1], len(outputs),
                                             True, False)
        self.traffic.launches += 1
        if not ok:
            raise ToolchainError(f"the BM runtime failed to launch {net}{self._log_says()} (its log: {self.log})")

    def _log_says(self) -> str:
        """The runtime's last complaint in its log, quoted."""
        flush_c_stdio()
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-50:]
        except OSError:
            return ""
        said = [line.strip() for line in lines if any(w in line for w in ("WRONG", "ERROR", "FATAL", "error"))]
        return f": {said[-1]}" if said else ""

    def sync(self) -> None:
        for handle in self.handles:  # a multi-device net runs on all of them
            self._check(self.bmlib.bm_thread_sync(handle), "wait for the device")
        self.traffic.syncs += 1

    # -- the copy path: host arrays in, host arrays out ---------------------------------------------

    def _device_tensors(self, net: str) -> tuple:
        """Device memory for a net's inputs and outputs, on their devices; made once, reused."""
        if net not in self._tensors:
            spec = self.nets[net]
            made = []
            for specs, dtypes in ((spec["inputs"], spec["_dtypes"][0]), (spec["outputs"], spec["_dtypes"][1])):
                group = []
                for t, dtype in zip(specs, dtypes):
                    tensor = Tensor()
                    if not self.bmrt.bmrt_tensor_ex(ctypes.byref(tensor), self.p, t["device"], dtype, _shape(t["shape"])):
                        raise ToolchainError(f"no device memory for {net}/{t['name']} on device {t['device']}")
                    group.append(tensor)
                made.append((Tensor * len(group))(*group))
            self._tensors[net] = tuple(made)
        return self._tensors[net]

    def run(self, net: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Inputs as float32/int32 (converted to the net's dtypes); outputs as float32/int32."""
        with output_to(self.log):
            return self._run(net, arrays)

    def _run(self, net: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        spec = self.nets[net]
        in_types, out_types = spec["_dtypes"]
        inputs, outputs = self._device_tensors(net)
        for tensor, t, array, dtype in zip(inputs, spec["inputs"], arrays, in_types, strict=True):
            data = to_device_type(array, dtype)
            tensor.shape = _shape(data.shape)
            self.h2d(tensor.device_mem, data, t["device"], t["name"])
        self.launch(net, inputs, outputs)
        self.sync()
        results = []
        for tensor, t, dtype in zip(outputs, spec["outputs"], out_types):
            shape = [tensor.shape.dims[d] for d in range(tensor.shape.num_dims)]  # a dynamic net's, as it ran
            host = self.d2h(tensor.device_mem, np.zeros(shape, DTYPES[dtype][1]), t["device"], t["name"])
            results.append(from_device_type(host, dtype))
        return results

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise ToolchainError(f"the BM runtime could not {what} (bm_status {status}; its log: {self.log})")


def _dims(shape: Shape) -> list[int]:
    return [shape.dims[d] for d in range(shape.num_dims)]


def _largest_stage(info: NetInfo) -> int:
    """The stage with the most input elements (stage 0 as this project and llm_convert combine them)."""
    return max(range(info.stage_num),
               key=lambda s: sum(int(np.prod(_dims(info.stages[s].input_shapes[i]))) for i in range(info.input_num)))


def _addresses(info: NetInfo, stage: int) -> list[int]:
    return [info.stages[stage].input_mems[i].address for i in range(info.input_num)]


def _shape(dims) -> Shape:
    shape = Shape()
    shape.num_dims = len(dims)
    for d, n in enumerate(dims):
        shape.dims[d] = n
    return shape


def to_device_type(array: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == 8:  # bf16: round to nearest even, keep the upper 16 bits
        bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(array, DTYPES[dtype][1])


def from_device_type(array: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == 8:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32) if dtype in (1, 0) else array
