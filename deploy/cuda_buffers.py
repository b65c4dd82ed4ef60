"""Device buffers for the native TensorRT runner: one small interface, three backends.

docs/design.md section 6: device buffers through pycuda when installed, else cuda-python, else torch
CUDA tensors, chosen at run time, with one clear message when none is usable.

    with select_buffers("auto") as cb:          # or "pycuda" / "cuda-python" / "torch"
        buf = cb.alloc(x.nbytes)                # device memory + a same-size host staging area
        cb.upload(buf, x)                       # host -> device, async on cb's stream
        context.set_tensor_address("frames", buf.ptr)
        context.execute_async_v3(cb.stream_handle)
        cb.download(out_buf, out)               # device -> host, async; `out` is filled ...
        cb.synchronize()                        # ... when the stream has finished

Backends (`BACKENDS`, tried in this order by "auto"):

  pycuda        pycuda.driver: mem_alloc, pagelocked_empty staging, memcpy_*_async on a
                pycuda Stream. No pycuda.autoinit: the device's *primary* context (the one the
                CUDA runtime, TensorRT and torch use) is retained once and pushed around every
                call, so any thread may use the object.
  cuda-python   the CUDA runtime API through `cuda.bindings.runtime` (cuda-bindings >= 12.6) or
                `cuda.cudart` (older cuda-python): cudaMalloc, cudaMallocHost staging,
                cudaMemcpyAsync on a cudaStreamCreate stream. Every call's returned error code is
                checked; a failure raises CudaBuffersError naming the call and the CUDA error.
  torch         torch.cuda uint8 tensors, pinned host tensors, a torch.cuda.Stream.

Every backend subclasses `DeviceBuffers`, which owns what they share (size checks, staging,
pending downloads); a backend only implements the raw allocate / copy / sync calls. (Over 500
lines on purpose: the three small backends sit beside the base class they fill in, so the one
contract they share is read in one place.)

Verification status: the selection logic and its error messages are tested on a machine with no
GPU and no NVIDIA driver (the real import / driver failures); the host<->device round trip test
runs only where a CUDA device is visible and has NOT run on a GPU yet.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
from typing import List, Optional, Tuple

import numpy as np

BACKENDS = ("pycuda", "cuda-python", "torch")
PREFERENCES = ("auto",) + BACKENDS

# why a backend is unusable (BuffersUnavailable.reasons)
NOT_INSTALLED, NO_DRIVER, NO_DEVICE, FAILED = "not installed", "no driver", "no device", "failed"

_INSTALL_HINT = {
    "pycuda": "pip install pycuda (builds against the CUDA toolkit)",
    "cuda-python": "pip install cuda-python (or pip install 'edge-ad[gpu]')",
    "torch": "install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
}


class CudaBuffersError(RuntimeError):
    """A device-buffer operation failed; the message names the backend call and the CUDA error."""


class BackendUnusable(CudaBuffersError):
    """Raised by a backend's constructor: `kind` is one of not installed / no driver / no device / failed."""

    def __init__(self, backend: str, kind: str, detail: str):
        super().__init__(f"{backend}: {kind} ({detail})")
        self.backend, self.kind, self.detail = backend, kind, detail


class BuffersUnavailable(CudaBuffersError):
    """No backend could be used. `reasons` is [(backend, kind, detail)] in the order tried."""

    def __init__(self, reasons: List[Tuple[str, str, str]], preference: str):
        self.reasons, self.preference = list(reasons), preference
        tried = ", ".join(r[0] for r in reasons)
        lines = [f"no CUDA device-buffer backend is usable (buffers={preference!r}; tried {tried}):"]
        for name, kind, detail in reasons:
            hint = f"; {_INSTALL_HINT[name]}" if kind == NOT_INSTALLED else ""
            lines.append(f"  - {name}: {kind}: {detail}{hint}")
        lines.append("TensorRT engines need an NVIDIA GPU with its driver and one of these; "
                     "without a GPU run the ONNX artifact with --backend ort-cpu")
        super().__init__("\n".join(lines))


def check_preference(preference: str) -> str:
    if preference not in PREFERENCES:
        raise ValueError(f"buffers={preference!r}; expected one of {', '.join(PREFERENCES)}")
    return preference


class DeviceBuffer:
    """`nbytes` of device memory at `ptr` (an int for TensorRT's set_tensor_address), plus
    `host`: a uint8 numpy view of a same-size host staging area (page-locked where the backend
    can). Created by `DeviceBuffers.alloc`, released by `DeviceBuffers.free` / `close`."""

    __slots__ = ("nbytes", "ptr", "host", "_dev", "_host", "_busy")

    def __init__(self, nbytes: int, ptr: int, dev, host: np.ndarray, host_obj):
        self.nbytes, self.ptr, self._dev, self.host, self._host = int(nbytes), int(ptr), dev, host, host_obj
        self._busy = False

    def __repr__(self):
        return f"DeviceBuffer(nbytes={self.nbytes}, ptr=0x{self.ptr:x})"


def _byte_view(a: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


class DeviceBuffers:
    """Base class: allocation, async copies on one stream owned by this object, synchronize.

    A buffer's staging area is reused by its next upload / download, so a second transfer on a
    buffer whose first has not been synchronized synchronizes first (correct, not fast: the
    TensorRT runner synchronizes once per batch anyway)."""

    name = "?"
    pinned = True          # host staging is page-locked (truly async copies)

    def __init__(self, device: int = 0):
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device={device!r}; expected a CUDA device index >= 0")
        self.device = device
        self._buffers: List[DeviceBuffer] = []
        self._pending: List[Tuple[np.ndarray, DeviceBuffer, int]] = []
        self._closed = False

    # -- what a backend implements ----------------------------------------------------------
    def _alloc_device(self, nbytes: int):             # -> (ptr int, backend object)
        raise NotImplementedError

    def _alloc_host(self, nbytes: int):               # -> (uint8 numpy view, backend object)
        raise NotImplementedError

    def _free_device(self, obj) -> None:
        raise NotImplementedError

    def _free_host(self, obj) -> None:
        raise NotImplementedError

    def _htod(self, buf: DeviceBuffer, nbytes: int) -> None:   # buf.host[:n] -> device, async
        raise NotImplementedError

    def _dtoh(self, buf: DeviceBuffer, nbytes: int) -> None:   # device -> buf.host[:n], async
        raise NotImplementedError

    def _sync(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    @property
    def stream_handle(self) -> int:
        """The stream as an int (cudaStream_t), for `IExecutionContext.execute_async_v3`."""
        raise NotImplementedError

    # -- public -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self):
        if self._closed:
            raise CudaBuffersError(f"{self.name} device buffers are closed")

    def alloc(self, nbytes: int) -> DeviceBuffer:
        self._check_open()
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise ValueError(f"device buffer size must be > 0 bytes, got {nbytes}")
        ptr, dev = self._alloc_device(nbytes)
        try:
            host, host_obj = self._alloc_host(nbytes)
        except BaseException:
            self._free_device(dev)
            raise
        buf = DeviceBuffer(nbytes, ptr, dev, host, host_obj)
        self._buffers.append(buf)
        return buf

    def _own(self, buf) -> DeviceBuffer:
        self._check_open()
        if not isinstance(buf, DeviceBuffer) or not any(b is buf for b in self._buffers):
            raise CudaBuffersError(f"{buf!r} is not a live buffer of these {self.name} device buffers")
        if buf._busy:
            self.synchronize()
        return buf

    def upload(self, buf: DeviceBuffer, array: np.ndarray) -> None:
        """Copy `array`'s bytes to the start of `buf` (through the staging area), async."""
        src = _byte_view(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array, "upload array")
        buf = self._own(buf)
        n = src.size
        if n > buf.nbytes:
            raise ValueError(f"upload of {n} bytes into a {buf.nbytes}-byte device buffer")
        if n == 0:
            return
        buf.host[:n] = src
        buf._busy = True
        self._htod(buf, n)

    def download(self, buf: DeviceBuffer, out: np.ndarray) -> None:
        """Copy the first `out.nbytes` bytes of `buf` into `out`, async: `out` holds them after
        the next `synchronize()`."""
        dst = _byte_view(out, "download target")
        if not out.flags.writeable:
            raise ValueError("download target is read-only")
        buf = self._own(buf)
        n = dst.size
        if n > buf.nbytes:
            raise ValueError(f"download of {n} bytes from a {buf.nbytes}-byte device buffer")
        if n == 0:
            return
        buf._busy = True
        self._dtoh(buf, n)
        self._pending.append((dst, buf, n))

    def synchronize(self) -> None:
        """Wait for this object's stream, then finish the pending downloads."""
        self._check_open()
        self._sync()
        pending, self._pending = self._pending, []
        for dst, buf, n in pending:
            dst[:] = buf.host[:n]
        for b in self._buffers:
            b._busy = False

    def free(self, buf: DeviceBuffer) -> None:
        buf = self._own(buf)
        self._buffers = [b for b in self._buffers if b is not buf]
        self._free_host(buf._host)
        self._free_device(buf._dev)
        buf.ptr, buf.host = 0, None

    def close(self) -> None:
        """Free every buffer and the stream (idempotent)."""
        if self._closed:
            return
        try:
            if any(b._busy for b in self._buffers):
                self.synchronize()
            for b in list(self._buffers):
                self.free(b)
        finally:
            self._closed = True
            self._pending = []
            self._close()

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "pinned_staging": self.pinned,
                "buffers": len(self._buffers), "bytes": sum(b.nbytes for b in self._buffers)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}(device={self.device}, buffers={len(self._buffers)})"


def _import_missing(e: ImportError, top: str) -> bool:
    """True when the ImportError means the package itself is absent (not a broken library load)."""
    return isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


# ------------------------------------------------------------------------------------------
# pycuda
# ------------------------------------------------------------------------------------------
class PycudaBuffers(DeviceBuffers):
    name = "pycuda"

    def __init__(self, device: int = 0):
        super().__init__(device)
        try:
            import pycuda.driver as drv
        except ImportError as e:
            if _import_missing(e, "pycuda"):
                raise BackendUnusable(self.name, NOT_INSTALLED, "no module named 'pycuda'") from None
            # pycuda's extension links libcuda: a failed load of it means no driver
            kind = NO_DRIVER if "libcuda" in str(e) else FAILED
            raise BackendUnusable(self.name, kind, f"import pycuda.driver: {_first_line(e)}") from None
        self.drv = drv
        try:
            drv.init()
        except Exception as e:
            msg = str(e).lower()
            kind = NO_DEVICE if ("no cuda-capable device" in msg or "no_device" in msg) else NO_DRIVER
            raise BackendUnusable(self.name, kind, f"pycuda.driver.init(): {_first_line(e)}") from None
        count = drv.Device.count()
        if self.device >= count:
            raise BackendUnusable(self.name, NO_DEVICE, f"device {self.device} requested, {count} visible")
        try:
            self.ctx = drv.Device(self.device).retain_primary_context()
        except Exception as e:
            raise BackendUnusable(self.name, FAILED, f"Device.retain_primary_context(): {_first_line(e)}") from None
        try:
            with self._current():
                self.stream = drv.Stream()
        except Exception as e:
            self.ctx.detach()
            raise BackendUnusable(self.name, FAILED, f"Stream(): {_first_line(e)}") from None

    @contextlib.contextmanager
    def _current(self):
        """Make the retained primary context current on this thread for the duration."""
        self.ctx.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    def _call(self, what: str, fn, *args):
        try:
            with self._current():
                return fn(*args)
        except self.drv.Error as e:
            raise CudaBuffersError(f"pycuda {what} failed: {_first_line(e)}") from None

    def _alloc_device(self, nbytes):
        dev = self._call("mem_alloc", self.drv.mem_alloc, nbytes)
        return int(dev), dev

    def _alloc_host(self, nbytes):
        host = self._call("pagelocked_empty", self.drv.pagelocked_empty, (nbytes,), np.uint8)
        return host, host

    def _free_device(self, obj):
        self._call("DeviceAllocation.free", obj.free)

    def _free_host(self, obj):
        alloc = getattr(obj, "base", None)     # pagelocked_empty's array keeps its HostAllocation in .base
        if hasattr(alloc, "free"):
            self._call("HostAllocation.free", alloc.free)

    def _htod(self, buf, n):
        self._call("memcpy_htod_async", self.drv.memcpy_htod_async, buf._dev, buf.host[:n], self.stream)

    def _dtoh(self, buf, n):
        self._call("memcpy_dtoh_async", self.drv.memcpy_dtoh_async, buf.host[:n], buf._dev, self.stream)

    def _sync(self):
        self._call("Stream.synchronize", self.stream.synchronize)

    def _close(self):
        try:
            with self._current():
                self.stream = None
        finally:
            self.ctx.detach()          # releases our retain of the primary context

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)


# ------------------------------------------------------------------------------------------
# cuda-python (CUDA runtime API)
# ------------------------------------------------------------------------------------------
def _import_cudart():
    """(module, where) for the CUDA runtime bindings: `cuda.bindings.runtime` (cuda-bindings
    >= 12.6) or `cuda.cudart` (older cuda-python); raises BackendUnusable(not installed)."""
    errors = []
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(mod), mod
        except ImportError as e:
            if not _import_missing(e, "cuda"):
                raise BackendUnusable("cuda-python", FAILED, f"import {mod}: {_first_line(e)}") from None
            errors.append(mod)
    raise BackendUnusable("cuda-python", NOT_INSTALLED, f"neither {' nor '.join(errors)} imports")


_NO_DEVICE_ERRORS = ("cudaErrorNoDevice", "cudaErrorInvalidDevice", "cudaErrorDevicesUnavailable",
                     "cudaErrorCompatNotSupportedOnDevice")


def _cuda_error_text(rt, err) -> str:
    name = getattr(err, "name", str(err))
    try:
        code, text = rt.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # pragma: no cover - error string lookup itself failed
        text = "?"
    return f"{name} ({int(err)}): {text}"


def _check(rt, result, call: str):
    """cuda-python calls return (cudaError_t, *values): raise CudaBuffersError naming `call`
    unless the error is cudaSuccess; return the values (one value unwrapped, none -> None)."""
    if not isinstance(result, tuple) or not result:
        raise CudaBuffersError(f"cuda-python {call} returned {result!r}; expected (cudaError_t, ...)")
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaBuffersError(f"cuda-python {call} failed: {_cuda_error_text(rt, err)}")
    return values[0] if len(values) == 1 else (values or None)


class CudaPythonBuffers(DeviceBuffers):
    name = "cuda-python"

    def __init__(self, device: int = 0):
        super().__init__(device)
        self.rt, self.module = _import_cudart()
        rt = self.rt
        try:
            res = rt.cudaGetDeviceCount()
        except Exception as e:        # cuda-bindings raises when it cannot load libcuda at all
            raise BackendUnusable(self.name, NO_DRIVER, f"cudaGetDeviceCount: {_first_line(e)}") from None
        err = res[0]
        if err != rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            kind = NO_DRIVER if name == "cudaErrorInsufficientDriver" else \
                NO_DEVICE if name in _NO_DEVICE_ERRORS else FAILED
            raise BackendUnusable(self.name, kind, f"cudaGetDeviceCount: {_cuda_error_text(rt, err)}")
        count = int(res[1])
        if self.device >= count:
            raise BackendUnusable(self.name, NO_DEVICE, f"device {self.device} requested, {count} visible")
        try:
            _check(rt, rt.cudaSetDevice(self.device), "cudaSetDevice")
            self.stream = _check(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        except CudaBuffersError as e:
            raise BackendUnusable(self.name, FAILED, str(e)) from None

    def _rt(self, call: str, fn, *args):
        """One runtime call on this object's device (cudaSetDevice is per thread, and the
        runner may be called from a worker thread), its error code checked."""
        if self.device:
            _check(self.rt, self.rt.cudaSetDevice(self.device), "cudaSetDevice")
        return _check(self.rt, fn(*args), call)

    def _alloc_device(self, nbytes):
        ptr = int(self._rt("cudaMalloc", self.rt.cudaMalloc, nbytes))
        return ptr, ptr

    def _alloc_host(self, nbytes):
        ptr = int(self._rt("cudaMallocHost", self.rt.cudaMallocHost, nbytes))
        host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        return host, ptr

    def _free_device(self, ptr):
        self._rt("cudaFree", self.rt.cudaFree, ptr)

    def _free_host(self, ptr):
        self._rt("cudaFreeHost", self.rt.cudaFreeHost, ptr)

    def _htod(self, buf, n):
        self._rt("cudaMemcpyAsync(host to device)", self.rt.cudaMemcpyAsync, buf.ptr, buf._host, n,
                 self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)

    def _dtoh(self, buf, n):
        self._rt("cudaMemcpyAsync(device to host)", self.rt.cudaMemcpyAsync, buf._host, buf.ptr, n,
                 self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)

    def _sync(self):
        self._rt("cudaStreamSynchronize", self.rt.cudaStreamSynchronize, self.stream)

    def _close(self):
        stream, self.stream = self.stream, None
        if stream is not None:
            self._rt("cudaStreamDestroy", self.rt.cudaStreamDestroy, stream)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)


# ------------------------------------------------------------------------------------------
# torch CUDA tensors
# ------------------------------------------------------------------------------------------
class TorchBuffers(DeviceBuffers):
    name = "torch"

    def __init__(self, device: int = 0):
        super().__init__(device)
        try:
            import torch
        except ImportError as e:
            if _import_missing(e, "torch"):
                raise BackendUnusable(self.name, NOT_INSTALLED, "no module named 'torch'") from None
            raise BackendUnusable(self.name, FAILED, f"import torch: {_first_line(e)}") from None
        self.torch = torch
        if torch.version.cuda is None:
            raise BackendUnusable(self.name, NOT_INSTALLED,
                                  f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
        if not torch.cuda.is_available():
            try:              # torch says why: no driver, or a driver and no device
                torch.cuda.init()
                why = "torch.cuda.is_available() is False"
            except Exception as e:
                why = f"torch.cuda.init(): {_first_line(e)}"
            kind = NO_DRIVER if "driver" in why.lower() else NO_DEVICE
            raise BackendUnusable(self.name, kind, why)
        count = torch.cuda.device_count()
        if self.device >= count:
            raise BackendUnusable(self.name, NO_DEVICE, f"device {self.device} requested, {count} visible")
        self.dev = torch.device("cuda", self.device)
        self.stream = torch.cuda.Stream(device=self.dev)

    def _call(self, what, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RuntimeError as e:
            raise CudaBuffersError(f"torch {what} failed: {_first_line(e)}") from None

    def _alloc_device(self, nbytes):
        with self.torch.cuda.stream(self.stream):   # the caching allocator ties the block to our stream
            t = self._call("torch.empty(device=cuda)", self.torch.empty, nbytes, dtype=self.torch.uint8,
                           device=self.dev)
        return t.data_ptr(), t

    def _alloc_host(self, nbytes):
        t = self._call("torch.empty(pin_memory=True)", self.torch.empty, nbytes, dtype=self.torch.uint8,
                       pin_memory=True)
        return t.numpy(), t

    def _free_device(self, obj):
        pass                      # the caching allocator reclaims it when the tensor goes

    def _free_host(self, obj):
        pass

    def _htod(self, buf, n):
        with self.torch.cuda.stream(self.stream):
            self._call("Tensor.copy_(host to device)", buf._dev[:n].copy_, buf._host[:n], non_blocking=True)

    def _dtoh(self, buf, n):
        with self.torch.cuda.stream(self.stream):
            self._call("Tensor.copy_(device to host)", buf._host[:n].copy_, buf._dev[:n], non_blocking=True)

    def _sync(self):
        self._call("Stream.synchronize", self.stream.synchronize)

    def _close(self):
        self.stream = None

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)


_CLASSES = {"pycuda": PycudaBuffers, "cuda-python": CudaPythonBuffers, "torch": TorchBuffers}


def select_buffers(preference: str = "auto", device: int = 0) -> DeviceBuffers:
    """Device buffers from `preference` ("auto" tries pycuda, cuda-python, torch in turn).

    Raises ValueError for an unknown preference and BuffersUnavailable (one message listing
    every candidate tried and why it failed: not installed / no driver / no device / failed)
    when none is usable."""
    check_preference(preference)
    names = BACKENDS if preference == "auto" else (preference,)
    reasons = []
    for name in names:
        try:
            return _CLASSES[name](device)
        except BackendUnusable as e:
            reasons.append((e.backend, e.kind, e.detail))
    raise BuffersUnavailable(reasons, preference)


def usable(preference: str = "auto", device: int = 0) -> Optional[str]:
    """The backend `select_buffers(preference, device)` would pick, or None (opens and closes it)."""
    try:
        b = select_buffers(preference, device)
    except BuffersUnavailable:
        return None
    b.close()
    return b.name
