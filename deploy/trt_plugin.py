"""TensorRT plugin `edgead::SelectiveScan` backed by our Triton scan kernels (tensorrt.plugin).

Registered where `tensorrt` is: export.trt calls `register_selective_scan_plugin()` before
parsing a `--scan plugin` graph, deploy.tensorrt before loading a plan built with the JIT form. The ONNX parser maps each `edgead::SelectiveScan` node (op_type =
plugin name, attributes plugin_namespace / plugin_version [/ aot]; see kernels/onnx_plugin.py)
to the plugin registered here. Node inputs: u, delta, A, B, C, D, z, delta_bias; attributes
delta_softplus, has_z; output y (u's shape and dtype).

Forms (docs/design.md section 2):
- AOT (`@trtp.aot_impl`, TensorRT >= 10.9), preferred: the single-launch kernel of
  kernels/scan_aot.py compiled by Triton to PTX for the build GPU's SM and embedded in the
  engine, launched by TensorRT with (u, delta, A, B, C, D, z, delta_bias, dim, length, groups, y),
  grid (ceil(dim / block_d), batch), no Python at run time. d_state (A's second dimension)
  must be a build-time constant (A is an initializer in our graphs); batch and length may be
  dynamic (symbolic expressions evaluated by TensorRT at run time).
- JIT (`@trtp.impl`, TensorRT >= 10.6): TensorRT calls back into Python at run time; the
  implementation wraps the I/O buffers as torch CUDA tensors and calls `kernels.selective_scan`
  (the Triton kernel on CUDA). Needs Python, torch and this package at run time. Registered as
  the fallback (and for TensorRT 10.6-10.8); with both registered, the engine build asks for
  AOT (node attribute aot=1 and NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS).

Not run here: TensorRT does not install on the CPU-only development machines and no GPU was
available, so neither form has been registered, built into an engine or executed; the
TensorRT-free parts (form selection, dtype mapping, kernel spec, launch arguments) are tested
on CPU. The module deliberately has no `from __future__ import annotations`: tensorrt.plugin
checks the decorated functions' annotations as classes.
"""
import re
from typing import Optional, Tuple, Union

PLUGIN_ID = "edgead::SelectiveScan"
JIT_MIN_VERSION = (10, 6)
AOT_MIN_VERSION = (10, 9)
_registered = []


def parse_version(text: str) -> Tuple[int, ...]:
    """"10.9.0.34" -> (10, 9, 0); "11.4.0rc1" -> (11, 4, 0): at most three leading numbers."""
    m = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def trt_version() -> Tuple[int, ...]:
    import tensorrt as trt

    return parse_version(trt.__version__)


def _triton_problem() -> Optional[str]:
    from kernels import scan_aot

    if scan_aot.triton is None:
        return "triton is not installed (pip install triton)"
    return None


def decide_forms(version: Tuple[int, ...], has_aot_api: bool, triton_problem: Optional[str]) -> dict:
    """Which plugin forms a TensorRT `version` (with or without `trtp.aot_impl`) and the local
    Triton support; `aot_reason` says why AOT is off (empty when on)."""
    v = ".".join(map(str, version))
    jit = tuple(version) >= JIT_MIN_VERSION
    if tuple(version) < AOT_MIN_VERSION:
        reason = f"TensorRT {v} < 10.9 has no ahead-of-time Python plugins"
    elif not has_aot_api:
        reason = f"tensorrt.plugin of TensorRT {v} has no aot_impl"
    elif triton_problem:
        reason = f"no Triton compiler for the AOT kernel: {triton_problem}"
    else:
        reason = ""
    aot = not reason
    if not aot and jit:
        reason += "; the JIT form (Python at run time) is used"
    return {"jit": jit, "aot": aot, "aot_reason": reason, "tensorrt": v}


def plugin_forms() -> dict:
    """Which plugin forms this TensorRT + kernels combination supports (needs tensorrt)."""
    v = trt_version()
    has_aot_api = False
    if v >= JIT_MIN_VERSION:
        import tensorrt.plugin as trtp

        has_aot_api = hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")
    return decide_forms(v, has_aot_api, _triton_problem() if v >= AOT_MIN_VERSION else None)


# ---- the AOT form, TensorRT-free parts ----------------------------------------------------------
def triton_dtype(trt_dtype_name: str, arg: str) -> str:
    """TensorRT DataType name ("FLOAT", "HALF", "BF16", or "DataType.HALF") -> Triton pointer type."""
    name = str(trt_dtype_name).rsplit(".", 1)[-1].upper()
    table = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
    if name not in table:
        raise ValueError(f"{PLUGIN_ID}: input/output {arg!r} has TensorRT type {name}; the AOT kernel "
                         "supports FLOAT, HALF and BF16")
    return table[name]


def build_target_sm() -> int:
    """Compute capability of the GPU the engine is built on (e.g. 87 on Orin, 90 on H100)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except ImportError:
        pass
    try:
        from triton.runtime import driver

        return int(driver.active.get_current_target().arch)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"{PLUGIN_ID}: cannot find the build GPU's compute capability "
                           f"for the AOT kernel ({type(e).__name__}: {e})") from e


def aot_kernel(io_dtypes: dict, d_state: int, delta_softplus: int, has_z: int, sm: int, ptx_version=None):
    """The compiled kernel (kernels.scan_aot.ScanPTX) for one plugin instance. The ONNX node
    always passes D and delta_bias (zeros when absent), so both are read."""
    from kernels.scan_aot import compile_scan_ptx

    return compile_scan_ptx(sm, dict(io_dtypes), int(d_state), delta_softplus=bool(delta_softplus),
                            has_z=bool(has_z), has_d=True, has_bias=True, ptx_version=ptx_version)


def aot_launch(kernel, u_shape, b_shape):
    """(KernelLaunchParams keyword arguments, extra scalar arguments) from u's (batch, dim, length)
    and B's (batch, groups, d_state, length) shapes: ints or TensorRT symbolic expressions."""
    from kernels.scan_aot import scan_extra_args

    batch, dim, length = u_shape[0], u_shape[1], u_shape[2]
    return kernel.launch_params(batch, dim), scan_extra_args(dim, length, b_shape[1])


# ---- registration ---------------------------------------------------------------------------------
def register_selective_scan_plugin(prefer_aot: bool = True) -> str:
    """Register the plugin with TensorRT's Python plugin registry (idempotent: the first call
    decides); returns the form engines will use, "aot" or "jit"."""
    if _registered:
        return _registered[0]
    forms = plugin_forms()
    if not forms["jit"]:
        raise RuntimeError(f"TensorRT {forms['tensorrt']} has no tensorrt.plugin (needs >= 10.6): "
                           "export with --scan chunked")
    import tensorrt.plugin as trtp
    import torch

    from kernels.scan_aot import INPUT_ARGS, choose_ptx_isa, driver_ptx_isa, toolchain_ptx_isa

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

    form = "jit"
    if prefer_aot and forms["aot"]:
        @trtp.aot_impl(PLUGIN_ID)
        def _aot_impl(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
                      C: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc,
                      delta_bias: trtp.TensorDesc, delta_softplus: int, has_z: int,
                      outputs: Tuple[trtp.TensorDesc], tactic: int
                      ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
            descs = (u, delta, A, B, C, D, z, delta_bias)
            dtypes = {name: triton_dtype(d.dtype, name) for name, d in zip(INPUT_ARGS, descs)}
            dtypes["y"] = triton_dtype(outputs[0].dtype, "y")
            n_expr = A.shape_expr[1]
            if not n_expr.is_constant:
                raise ValueError(f"{PLUGIN_ID}: A's second dimension (d_state) must be a build-time "
                                 "constant for the AOT kernel")
            sm = build_target_sm()
            # PTX the build machine's driver can load (an engine is tied to its GPU and driver anyway)
            isa = choose_ptx_isa(driver_ptx_isa(), toolchain_ptx_isa(sm))
            kernel = aot_kernel(dtypes, n_expr.constant_value(), delta_softplus, has_z, sm, isa)
            launch, extra = aot_launch(kernel, u.shape_expr, B.shape_expr)
            return (kernel.name, kernel.ptx, trtp.KernelLaunchParams(**launch),
                    trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra]))

        form = "aot"
    _registered.append(form)
    return form
