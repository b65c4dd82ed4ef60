"""TensorRT plugin `edgead::SelectiveScan` backed by our Triton scan kernel (tensorrt.plugin).

Only imported where `tensorrt` is (export.trt calls `register_selective_scan_plugin()` before
parsing a `--scan plugin` graph). The ONNX parser maps each `edgead::SelectiveScan` node (op_type =
plugin name, attributes plugin_namespace / plugin_version; see kernels/onnx_plugin.py) to the
plugin registered here.

Forms (DESIGN.md section 1):
- JIT (`@trtp.impl`, TensorRT >= 10.6): TensorRT calls back into Python at run time; the
  implementation wraps the I/O buffers as torch CUDA tensors and calls
  `kernels.selective_scan_chunked` / the registered op (the Triton kernel on CUDA). Needs Python
  and this package at run time.
- AOT (`@trtp.aot_impl`, TensorRT >= 10.9): needs a single-launch Triton kernel with a fixed
  calling convention (inputs..., scalars..., outputs...) compiled to PTX. Our Triton scan is
  launched in several passes from Python (chunk states + carry), so no AOT form is registered
  yet; `plugin_forms()` reports that, and engines built here embed the JIT form.
Not tested here: TensorRT is not installable on the CPU-only development machines.
"""
from __future__ import annotations

from typing import Tuple

PLUGIN_ID = "edgead::SelectiveScan"
_registered = []


def trt_version() -> Tuple[int, ...]:
    import tensorrt as trt

    return tuple(int(p) for p in trt.__version__.split(".")[:3] if p.isdigit())


def plugin_forms() -> dict:
    """Which plugin forms this TensorRT + kernels combination supports."""
    v = trt_version()
    return {"jit": v >= (10, 6), "aot": False, "aot_reason": "no single-launch Triton scan kernel for "
            "trtp.aot_impl yet (kernels launch the scan in passes); JIT form used",
            "tensorrt": ".".join(map(str, v))}


def register_selective_scan_plugin() -> str:
    """Register the plugin with TensorRT's Python plugin registry (idempotent); returns its form."""
    if _registered:
        return _registered[0]
    if trt_version() < (10, 6):
        raise RuntimeError(f"TensorRT {'.'.join(map(str, trt_version()))} has no tensorrt.plugin "
                           "(needs >= 10.6): export with --scan chunked")
    import tensorrt.plugin as trtp
    import torch

    @trtp.register(PLUGIN_ID)
    def _desc(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
              C: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc, delta_bias: trtp.TensorDesc,
              delta_softplus: int, has_z: int) -> trtp.TensorDesc:
        return u.like()

    @trtp.impl(PLUGIN_ID)
    def _impl(u: trtp.Tensor, delta: trtp.Tensor, A: trtp.Tensor, B: trtp.Tensor, C: trtp.Tensor,
              D: trtp.Tensor, z: trtp.Tensor, delta_bias: trtp.Tensor, delta_softplus: int, has_z: int,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import kernels

        t = [torch.as_tensor(x, device="cuda") for x in (u, delta, A, B, C, D, z, delta_bias)]
        out = torch.as_tensor(outputs[0], device="cuda")
        ext = torch.cuda.ExternalStream(stream)
        with torch.cuda.stream(ext):
            y = kernels.selective_scan(t[0], t[1], t[2].float(), t[3], t[4], t[5].float(),
                                       t[6] if has_z else None, t[7].float(), bool(delta_softplus))
            out.copy_(y.to(out.dtype))

    _registered.append("jit")
    return "jit"
