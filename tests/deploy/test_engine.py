"""Engines behind one interface: exported ONNX vs the PyTorch checkpoint on fresh random frames
(odd batches, fixed-batch engines), backend choice and the clear errors."""

import numpy as np
import pytest

from deploy import cuda_buffers
from deploy import Engine, EngineError, available_backends, choose_backend, load_engine
from deploy.ort import OrtEngine
from deploy.tensorrt import TensorRTEngine, trt
from tests.strip_model import TILE, export_onnx_artifact


def _frames(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, TILE, TILE, 1), dtype=np.uint8)


def _close(a, b):
    for k in ("anomaly_map", "score", "normalized_score"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3 * float(np.abs(b[k]).max() + 1e-6))


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_onnx_engine_matches_the_pytorch_checkpoint(onnx_artifact, torch_engine, batch):
    eng = load_engine(onnx_artifact)
    assert isinstance(eng, OrtEngine) and isinstance(eng, Engine) and eng.backend.startswith("ort")
    assert eng.frame_hw == (TILE, TILE) and eng.frame_channels == 1 and eng.static_batch is None
    assert eng.meta["model"] == torch_engine.meta["model"]
    assert eng.map_threshold == pytest.approx(torch_engine.map_threshold)
    f = _frames(batch, batch)
    _close(eng.infer(f), torch_engine.infer(f))


def test_fixed_batch_engine_is_chunked_and_padded(padim_checkpoint, torch_engine, tmp_path):
    path = export_onnx_artifact(padim_checkpoint, tmp_path / "b4.onnx", batch=4)
    eng = load_engine(path, backend="ort-cpu")
    assert eng.static_batch == 4
    f = _frames(6, 7)                      # one full chunk + one padded chunk
    out = eng.infer(f)
    assert out["score"].shape == (6,)
    _close(out, torch_engine.infer(f))


def test_tampered_artifact_is_refused_at_load(onnx_artifact, tmp_path):
    import onnx

    bad = tmp_path / "model.onnx"
    m = onnx.load(str(onnx_artifact))
    m.doc_string = "edited after export"        # still a valid model, but not the exported bytes
    onnx.save(m, str(bad))
    (tmp_path / "model.onnx.json").write_text(onnx_artifact.with_name("model.onnx.json").read_text())
    with pytest.raises(EngineError, match="sha256"):
        load_engine(bad)


def test_wrong_frames_are_one_clear_error(torch_engine):
    with pytest.raises(EngineError, match="1-channel"):
        torch_engine.infer(np.zeros((1, TILE, TILE, 3), np.uint8))
    with pytest.raises(EngineError, match=f"{TILE}x{TILE}"):
        torch_engine.infer(np.zeros((1, TILE + 1, TILE, 1), np.uint8))
    with pytest.raises(EngineError, match="uint8"):
        torch_engine.infer(np.zeros((1, TILE, TILE, 1), np.float32))


def test_backend_choice(tmp_path):
    for name in ("m.onnx", "m.engine", "m.pt2", "m.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert choose_backend(tmp_path / "m.onnx") in ("ort-cpu", "ort-cuda", "ort-trt")
    assert choose_backend(tmp_path / "m.onnx", "ort-cpu") == "ort-cpu"
    assert choose_backend(tmp_path / "m.pt2") == "aoti"
    assert choose_backend(tmp_path / "m.pt") == "torch"
    assert choose_backend(tmp_path / "m.engine") == "tensorrt"
    with pytest.raises(EngineError, match="not --backend aoti"):
        choose_backend(tmp_path / "m.onnx", "aoti")
    with pytest.raises(EngineError, match="unknown engine type"):
        choose_backend(tmp_path / "m.bin")
    with pytest.raises(EngineError, match="--backend 'magic'"):
        choose_backend(tmp_path / "m.pt", "magic")
    assert "torch" in available_backends()


def test_tensorrt_without_tensorrt_or_gpu_is_a_clear_error(tmp_path):
    (tmp_path / "m.engine").write_bytes(b"not a plan")
    if trt is None:
        with pytest.raises(EngineError, match=r"TensorRT engines need the TensorRT Python package.*pip install"):
            TensorRTEngine(tmp_path / "m.engine")
        with pytest.raises(EngineError, match=r"TensorRT engines need the TensorRT Python package"):
            load_engine(tmp_path / "m.engine", buffers="torch")
        return
    try:
        cuda_buffers.select_buffers("auto").close()
    except cuda_buffers.BuffersUnavailable as e:
        reasons = e.reasons
    else:
        pytest.skip("TensorRT and CUDA device buffers are present: the error path does not apply")
    # tensorrt imports but no device buffers: one error naming every candidate and its reason
    with pytest.raises(EngineError) as ei:
        load_engine(tmp_path / "m.engine")
    msg = str(ei.value)
    assert "TensorRT needs an NVIDIA GPU" in msg
    for name, kind, _ in reasons:
        assert f"- {name}: {kind}" in msg


@pytest.mark.parametrize("buffers", cuda_buffers.BACKENDS)
@pytest.mark.stack("tensorrt")
def test_tensorrt_engine_matches_onnx_runtime_with_each_buffer_backend(buffers, request, tmp_path):
    """Where tensorrt imports and a CUDA device is visible (never on the CPU-only CI machine):
    an fp32 engine (TensorRT may use TF32, hence the looser tolerance) == ORT on CPU, batch 1,
    an odd batch, and a batch above the engine's max (split)."""
    if trt is None:
        pytest.skip("tensorrt is not importable here")
    try:
        cuda_buffers.select_buffers(buffers).close()
    except cuda_buffers.BuffersUnavailable as e:
        pytest.skip(f"{buffers} device buffers unavailable: {e.reasons[0][1]} ({e.reasons[0][2]})")
    from export.trt import export_trt

    padim_checkpoint, onnx_artifact = (request.getfixturevalue(n) for n in ("padim_checkpoint", "onnx_artifact"))
    res = export_trt(padim_checkpoint, tmp_path, precision="fp32", onnx_fp32=onnx_artifact, min_batch=1,
                     opt_batch=2, max_batch=4, quiet=True)
    ref = load_engine(onnx_artifact, backend="ort-cpu")
    with load_engine(res.engine, buffers=buffers) as eng:
        assert isinstance(eng, TensorRTEngine) and eng.describe()["buffers"] == buffers
        assert eng.max_batch == 4
        for batch in (1, 3, 6):
            f = _frames(batch, 100 + batch)
            got, want = eng.infer(f), ref.infer(f)
            for k in ("anomaly_map", "score", "normalized_score"):
                assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
                np.testing.assert_allclose(got[k], want[k], rtol=1e-2, atol=1e-2 * float(np.abs(want[k]).max() + 1e-6))


def test_tensorrt_buffers_choice_is_checked_first(tmp_path):
    (tmp_path / "m.engine").write_bytes(b"not a plan")
    for call in (lambda: TensorRTEngine(tmp_path / "m.engine", buffers="cupy"),
                 lambda: load_engine(tmp_path / "m.engine", buffers="cupy")):
        with pytest.raises(EngineError,
                           match=r"m.engine: buffers='cupy'; expected one of auto, pycuda, cuda-python, torch"):
            call()


def test_missing_engine_file(tmp_path):
    with pytest.raises(EngineError, match="not found"):
        load_engine(tmp_path / "model.onnx")


def test_batches_above_the_engine_max_batch_are_split(onnx_artifact, torch_engine):
    eng = load_engine(onnx_artifact)
    eng.max_batch = 2                      # as export.max_batch = 2 would set it
    calls = []
    run = eng._run
    eng._run = lambda f: calls.append(f.shape[0]) or run(f)
    f = _frames(5, 11)
    _close(eng.infer(f), torch_engine.infer(f))
    assert calls == [2, 2, 1]


def test_jit_plugin_engines_register_the_plugin_before_loading():
    """A plan built with the JIT SelectiveScan plugin needs the plugin registered at run time;
    AOT-form and plugin-free plans need nothing. Without tensorrt the registration fails with one
    error naming the plan; with it, the form registered is the JIT one."""
    from deploy.tensorrt import _register_plugin_for

    assert _register_plugin_for({"export": {"plugin_form": None}}, "m.engine") is None
    assert _register_plugin_for({"export": {"plugin_form": "aot"}}, "m.engine") is None
    assert _register_plugin_for({}, "m.engine") is None
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError) as e:
            _register_plugin_for({"export": {"plugin_form": "jit"}}, "m.engine")
        assert "m.engine" in str(e.value) and "JIT SelectiveScan plugin" in str(e.value)
    else:
        assert _register_plugin_for({"export": {"plugin_form": "jit"}}, "m.engine") in ("jit", "aot")


def test_ort_engine_session_settings_and_threads(onnx_artifact, torch_engine):
    """OrtEngine's session is built by ort_session_options (the settings the latency benchmark
    uses too); a 1-thread engine gives the same answers as the default one."""
    import onnxruntime as ort

    from deploy.ort import ort_session_options

    so = ort_session_options(3)
    assert so.intra_op_num_threads == 3 and not so.enable_profiling
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    one = OrtEngine(onnx_artifact, threads=1)
    assert one.session.get_session_options().intra_op_num_threads == 1
    f = _frames(2, 11)
    _close(one.infer(f), torch_engine.infer(f))
    _close(one.infer(f), load_engine(onnx_artifact).infer(f))
