"""One global switch that picks how `selective_scan` is lowered (timm's `use_fused_attn()`
habit: decided in one place, read by every call site).

Modes:
- "auto" (default): the registered custom op `edgead::selective_scan` (Triton on CUDA; on CPU
  the fused C kernel or the chunked standard ops, see `set_cpu_kernel`), except while `torch.export` / `torch.onnx.export(dynamo=True)` trace
  the model, where the chunked standard-op lowering is traced instead, so every exporter
  (ONNX, AOTInductor) sees only standard ops.
- "chunked": always trace/run the chunked standard-op lowering directly (also lets
  `torch.compile` fuse it on CPU instead of calling the opaque op).
- "plugin": while exporting, emit one custom ONNX node per scan (op_type "SelectiveScan",
  TensorRT plugin attributes; see `kernels.onnx_plugin`); outside export, same as "auto".
- "op": always the registered custom op, even while exporting (for exporters that bring
  their own translation of `edgead::selective_scan`).
"""
from __future__ import annotations

import contextlib

import torch

MODES = ("auto", "chunked", "plugin", "op")
CPU_KERNELS = ("fused", "chunked")
_state = {"mode": "auto", "cpu_kernel": "fused"}


def set_export_mode(mode: str) -> None:
    """Set the global lowering mode (one of MODES)."""
    if mode not in MODES:
        raise ValueError(f"set_export_mode: mode={mode!r} is not one of {MODES}")
    _state["mode"] = mode


def get_export_mode() -> str:
    return _state["mode"]


@contextlib.contextmanager
def export_mode(mode: str):
    """Context manager form: `with kernels.export_mode("plugin"): torch.onnx.export(...)`."""
    old = get_export_mode()
    set_export_mode(mode)
    try:
        yield
    finally:
        _state["mode"] = old


def _exporting() -> bool:
    try:
        return bool(torch.compiler.is_exporting())
    except AttributeError:  # very old torch
        return False


def set_cpu_kernel(kind: str) -> None:
    """What the registered op runs on CPU tensors: "fused" (default; the C kernel of
    `kernels.cpu_scan`, built on first use, falling back to chunked where no C compiler
    works) or "chunked" (the standard-op lowering)."""
    if kind not in CPU_KERNELS:
        raise ValueError(f"set_cpu_kernel: kind={kind!r} is not one of {CPU_KERNELS}")
    _state["cpu_kernel"] = kind


def get_cpu_kernel() -> str:
    return _state["cpu_kernel"]


def resolve_lowering() -> str:
    """What a call made now should do: "op", "chunked" or "plugin"."""
    mode = _state["mode"]
    if mode == "chunked":
        return "chunked"
    if mode == "op":
        return "op"
    if _exporting():
        return "plugin" if mode == "plugin" else "chunked"
    return "op"
