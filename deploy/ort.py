"""ONNX Runtime engine (`ort-cpu`, `ort-cuda`, `ort-trt`) and the session settings every ORT path uses.

A graph exported with `--scan plugin` (one `edgead::SelectiveScan` node per scan, meant for a
TensorRT plugin) has no ONNX Runtime kernel for that node; on CPU it runs through
kernels.onnx_plugin's Python custom op (torch + onnxruntime-extensions), which is how the parity
gate checks such an export. Every other graph needs only onnxruntime and numpy.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from typing import Optional, Tuple

from .contract import INPUT_NAME, OUTPUT_NAMES
from .engine import Engine, EngineError, export_info, read_engine_metadata

try:
    import onnxruntime as ort
except ImportError:  # the `runtime` extra installs it; without it only other artifacts run
    ort = None

PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"],
             "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def _require_ort():
    if ort is None:
        raise EngineError("ONNX engines need onnxruntime: pip install 'edge-ad[runtime]' "
                          "(onnxruntime-gpu for the CUDA / TensorRT execution providers)")
    return ort


def available_backends() -> Tuple[str, ...]:
    if ort is None:
        return ()
    prov = ort.get_available_providers()
    return tuple(b for b, p in PROVIDERS.items() if p[0] in prov)


def best_backend() -> str:
    """ort-trt, else ort-cuda, else ort-cpu: the fastest provider this install has."""
    _require_ort()
    avail = available_backends()
    for b in ("ort-trt", "ort-cuda", "ort-cpu"):
        if b in avail:
            return b
    raise EngineError(f"onnxruntime {ort.__version__} offers none of the providers "
                      f"{[p[0] for p in PROVIDERS.values()]}")


_X86 = ("x86_64", "amd64", "i386", "i686")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def int8_kernels_exact() -> bool:
    """Whether ONNX Runtime's fused int8 CPU kernels compute a Q/DQ graph as written on this CPU.
    Without VNNI, x86 int8 dot products add u8 x s8 pairs into 16 bits with saturation (VPMADDUBSW),
    so a Conv / MatMul whose activations use the full int8 range can clip: on an AVX2-only EPYC, a
    tiny DVAD's int8 anomaly map correlated with fp32's at 0.74 as written and 0.33 fused. VNNI (and
    ARM's dot-product instructions) accumulate in 32 bits. Where /proc/cpuinfo cannot be read on
    x86, the answer is the safe one (False)."""
    if platform.machine().lower() not in _X86:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _VNNI_FLAGS)


def int8_as_written(precision: Optional[str], backend: str = "ort-cpu") -> bool:
    """Whether a graph of this export precision runs with its Q/DQ as written (`exact_int8`) on this
    backend: an int8 graph on the CPU provider where the fused int8 kernels would saturate."""
    return backend == "ort-cpu" and precision == "int8" and not int8_kernels_exact()


def ort_session_options(threads: int = 0, profile_prefix: Optional[str] = None, exact_int8: bool = False):
    """The ONNX Runtime session settings of every ORT path here (OrtEngine, so the parity gate,
    the stream and the benchmark run the same session):
    - all graph optimisations (constant folding, Conv + BatchNorm/activation fusion, NCHWc
      layout), said explicitly rather than relied on as the Python default;
    - sequential execution (ORT_PARALLEL with two inter-op threads was ~2x slower on the 256 px
      DVAD at batch 1);
    - `threads`: intra-op threads; 0 = ONNX Runtime's default (one per physical core);
    - `profile_prefix`: ONNX Runtime's per-node profiler on (JSON written by end_profiling());
    - `exact_int8`: Q/DQ pairs are not fused into int8 kernels, so the graph runs as written
      (dequantised weights and activations in fp32: what TensorRT's int8 kernels compute, up to
      float rounding, without the saturation of non-VNNI x86 kernels; see int8_kernels_exact).
      Slower than fused kernels.
    """
    _require_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if exact_int8:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


class OrtEngine(Engine):
    """`provider_options`: options of the first provider (e.g. TensorRT EP's trt_fp16_enable)."""

    def __init__(self, path, backend: str = "ort-cpu", threads: int = 0, meta: Optional[dict] = None,
                 provider_options: Optional[dict] = None):
        _require_ort()
        meta = meta if meta is not None else read_engine_metadata(path)
        hw, ch, _batch = export_info(meta, path)
        if backend not in PROVIDERS:
            raise EngineError(f"{path}: backend {backend!r} is not an ONNX Runtime backend ({sorted(PROVIDERS)})")
        providers = PROVIDERS[backend]
        if providers[0] not in ort.get_available_providers():
            raise EngineError(f"{path}: backend {backend} needs ONNX Runtime's {providers[0]}, not in this "
                              f"install ({ort.get_available_providers()}); pip install onnxruntime-gpu")
        self.session = self._session(path, meta, backend, threads, provider_options)
        inp = self.session.get_inputs()[0]
        if inp.name != INPUT_NAME or len(inp.shape) != 4:
            raise EngineError(f"{path}: expected one input {INPUT_NAME!r} (B, H, W, C), found {inp.name} {inp.shape}")
        b, h, w, c = inp.shape
        if isinstance(c, int) and c != ch:
            raise EngineError(f"{path}: graph input has {c} channels but metadata says {ch}")
        graph_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        if graph_hw is not None and hw is not None and graph_hw != hw:
            raise EngineError(f"{path}: graph input is {graph_hw} but metadata frame_hw is {hw}")
        super().__init__(path, meta, graph_hw or hw, ch, b if isinstance(b, int) else None)
        self.backend = backend
        self.threads = int(threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = set(OUTPUT_NAMES) - set(self.output_names)
        if missing:
            raise EngineError(f"{path}: outputs {self.output_names} lack {sorted(missing)}")

    @staticmethod
    def _session(path, meta, backend, threads, provider_options):
        if (meta.get("export") or {}).get("scan") == "plugin":
            if backend != "ort-cpu":
                raise EngineError(f"{path}: a --scan plugin graph runs in ONNX Runtime only on CPU, through "
                                  "the Python custom op (build a TensorRT engine from it with export.trt)")
            from kernels.onnx_plugin import ort_session

            return ort_session(str(path))
        providers = list(PROVIDERS[backend])
        if provider_options:
            providers[0] = (providers[0], dict(provider_options))
        exact = int8_as_written((meta.get("export") or {}).get("precision"), backend)
        try:
            return ort.InferenceSession(str(path), ort_session_options(threads, exact_int8=exact),
                                        providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad / foreign graphs
            raise EngineError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None

    def _run(self, frames):
        outs = self.session.run(self.output_names, {INPUT_NAME: frames})
        return dict(zip(self.output_names, outs))
