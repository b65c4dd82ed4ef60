"""TensorRT engine: a plain TensorRT plan (`model.engine`) run with `execute_async_v3`.

Metadata lives in the plan's sidecar JSON (a plan carries no private bytes). Device buffers come
from deploy.cuda_buffers (pycuda, else cuda-python, else torch CUDA tensors). Plans built with the
JIT form of the `edgead::SelectiveScan` plugin call back into Python at run time, so the plugin is
registered (deploy.trt_plugin) before such a plan is deserialised; AOT-form plans embed the kernel.
Not run in this repository's CI: TensorRT does not install on its machines.
"""
from __future__ import annotations

import pathlib
from typing import Dict, Optional

import numpy as np

from . import cuda_buffers
from .contract import INPUT_NAME
from .engine import Engine, EngineError, export_info, read_engine_metadata

try:
    import tensorrt as trt
except Exception:  # ImportError, or a broken CUDA install raising at import; `gpu` extra / JetPack
    trt = None


def _require_tensorrt():
    if trt is None:
        raise EngineError("TensorRT engines need the TensorRT Python package and an NVIDIA GPU: "
                          "pip install 'tensorrt>=10.3' (or pip install 'edge-ad[gpu]')")
    return trt


def _register_plugin_for(meta: dict, path) -> Optional[str]:
    """An engine built with the JIT form of the `edgead::SelectiveScan` plugin (sidecar
    `export.plugin_form == "jit"`) calls back into Python at run time: the plugin must be
    registered in this process before the plan is deserialised. AOT-form engines embed the
    kernel (TensorRT >= 10.9) and need nothing here. Returns the form registered, if any."""
    form = (meta.get("export") or {}).get("plugin_form")
    if form != "jit":
        return None
    from .trt_plugin import register_selective_scan_plugin

    try:
        return register_selective_scan_plugin()
    except Exception as e:  # noqa: BLE001 - one clear message for any registration failure
        raise EngineError(f"{path}: built with the JIT SelectiveScan plugin, which must be registered "
                          f"at run time, and registering it failed: {e}") from None


class TensorRTEngine(Engine):
    """A TensorRT plan run with `execute_async_v3`. Device buffers come from
    `deploy.cuda_buffers` (docs/design.md section 5): `buffers="auto"` takes pycuda when installed,
    else cuda-python, else torch CUDA tensors; name one of them to force it, or pass an open
    `DeviceBuffers` (the caller then owns and closes it). Input and output buffers are kept
    between calls and grow with the batch. Not run on a GPU in this repository's CI."""

    backend = "tensorrt"

    def __init__(self, path, meta: Optional[dict] = None, buffers="auto", device: int = 0,
                 allow_rejected: bool = False):
        if not isinstance(buffers, cuda_buffers.DeviceBuffers):
            try:
                cuda_buffers.check_preference(buffers)
            except ValueError as e:
                raise EngineError(f"{path}: {e}") from None
        _require_tensorrt()
        self._own_buffers = not isinstance(buffers, cuda_buffers.DeviceBuffers)
        self._bufs: Dict[str, object] = {}
        self.buffers = None
        if self._own_buffers:
            try:
                self.buffers = cuda_buffers.select_buffers(buffers, device=device)
            except cuda_buffers.BuffersUnavailable as e:
                raise EngineError(f"{path}: TensorRT needs an NVIDIA GPU and CUDA device buffers; {e}") from None
        else:
            self.buffers = buffers
        try:
            self._open(path, meta if meta is not None else read_engine_metadata(path, allow_rejected))
        except BaseException:
            self.close()
            raise

    def _open(self, path, meta):
        hw, ch, _batch = export_info(meta, path)
        _register_plugin_for(meta, path)
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(pathlib.Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: not a TensorRT plan for this TensorRT version / GPU (rebuild it here)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if self.inputs != [INPUT_NAME]:
            raise EngineError(f"{path}: expected one input {INPUT_NAME!r}, found {self.inputs}")
        shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        super().__init__(path, meta, tuple(shape[1:3]) if min(shape[1:3]) > 0 else hw, ch,
                         shape[0] if shape[0] > 0 else None)
        self.outputs = [n for n in self.names if n not in self.inputs]
        np_types = {trt.float32: np.float32, trt.float16: np.float16}
        self.out_dtypes = {}
        for n in self.outputs:
            dt = self.engine.get_tensor_dtype(n)
            if dt not in np_types:
                raise EngineError(f"{path}: output {n!r} has TensorRT dtype {dt}; expected float32 or float16")
            self.out_dtypes[n] = np_types[dt]

    def describe(self) -> dict:
        d = super().describe()
        d["buffers"] = self.buffers.name if self.buffers is not None else None
        return d

    def _buffer(self, name: str, nbytes: int):
        """The device buffer kept for tensor `name`, reallocated when `nbytes` outgrows it."""
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.buffers.free(buf)
            buf = self._bufs[name] = self.buffers.alloc(max(int(nbytes), 1))
        return buf

    def _run(self, frames):
        cb, ctx = self.buffers, self.context
        try:
            if not ctx.set_input_shape(INPUT_NAME, tuple(frames.shape)):
                raise EngineError(f"{self.path.name}: TensorRT rejected input shape {tuple(frames.shape)} "
                                  "(outside the engine's optimisation profile?)")
            inp = self._buffer(INPUT_NAME, frames.nbytes)
            cb.upload(inp, frames)
            ctx.set_tensor_address(INPUT_NAME, inp.ptr)
            outs = {}
            for n in self.outputs:
                outs[n] = np.empty(tuple(ctx.get_tensor_shape(n)), self.out_dtypes[n])
                ctx.set_tensor_address(n, self._buffer(n, outs[n].nbytes).ptr)
            if not ctx.execute_async_v3(cb.stream_handle):
                raise EngineError(f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
            for n, arr in outs.items():
                cb.download(self._bufs[n], arr)
            cb.synchronize()
        except cuda_buffers.CudaBuffersError as e:
            raise EngineError(f"{self.path.name}: {e}") from None
        return {k: v.astype(np.float32, copy=False) for k, v in outs.items()}

    def close(self) -> None:
        cb, self.buffers = self.buffers, None
        if cb is None:
            return
        bufs, self._bufs = self._bufs, {}
        if self._own_buffers:
            cb.close()
        elif not cb.closed:
            for b in bufs.values():
                cb.free(b)
