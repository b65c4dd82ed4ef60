"""TensorRT path: reduced-precision ONNX (fp16 / INT8 Q/DQ) runs in ONNX Runtime on CPU close to
fp32; --dry-run writes the trtexec line; the engine build runs only where tensorrt imports."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import precision as P
from export import trt as T
from deploy.artifacts import read_metadata

from .conftest import FRAME_HW, export_through_cli, fresh_frames

NAMES = ["anomaly_map", "score", "normalized_score"]


def run(path, frames):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(NAMES, {"frames": frames})


@pytest.fixture(scope="module")
def fp16(onnx_chunked, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt_fp16")
    return T.export_trt(tiny_ckpt, out, precision="fp16", dry_run=True, onnx_fp32=onnx_chunked[0],
                        min_batch=1, opt_batch=4, max_batch=12, workspace=2, n=6, quiet=True)


def test_dry_run_writes_trtexec_line(fp16):
    cmd = fp16.trtexec
    h, w = FRAME_HW
    assert cmd[0] == "trtexec" and "--stronglyTyped" in cmd
    assert "--onnx=model.fp16.onnx" in cmd and "--saveEngine=model.engine" in cmd
    assert f"--minShapes=frames:1x{h}x{w}x1" in cmd and f"--optShapes=frames:4x{h}x{w}x1" in cmd
    assert f"--maxShapes=frames:12x{h}x{w}x1" in cmd and "--memPoolSize=workspace:2048M" in cmd
    assert not any(c in ("--fp16", "--int8", "--best") for c in cmd)   # precision is in the graph
    script = fp16.trtexec_script.read_text()
    assert "trtexec" in script and "--stronglyTyped" in script and fp16.engine is None
    s = fp16.summary()
    assert "dry run: no engine built" in s and "trtexec --onnx=model.fp16.onnx" in s and "parity PASSED" in s


def test_fp16_graph_runs_in_ort_close_to_fp32(fp16, onnx_chunked):
    m = onnx.load(str(fp16.onnx))
    half = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert half, "no fp16 weights"
    # scan sub-graph and reductions stayed fp32: none of their inputs is an fp16 tensor
    scan = set(P.scan_node_names(onnx.load(str(onnx_chunked[0]))))
    assert scan
    for n in m.graph.node:
        if n.name in scan or n.op_type in ("ReduceSum", "ReduceMax", "Exp", "CumSum", "Softplus"):
            assert not any(x.endswith("__f16") for x in n.input), n.name
    frames = fresh_frames(3, FRAME_HW, 1, seed=7)
    ref, got = run(onnx_chunked[0], frames), run(fp16.onnx, frames)
    for name, r, g in zip(NAMES, ref, got):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, atol=2e-2, rtol=5e-2, err_msg=name)
    assert read_metadata(fp16.onnx)["export"]["precision"] == "fp16"


def test_without_tensorrt_writes_onnx_and_says_so(onnx_chunked, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "tensorrt", None)      # fault injection where tensorrt exists
    with pytest.raises(T.TensorRTUnavailable, match="TensorRT is not installed") as e:
        T.export_trt(tiny_ckpt, tmp_path, precision="fp32", onnx_fp32=onnx_chunked[0], quiet=True)
    assert "trtexec --onnx=model.onnx" in str(e.value)
    assert (tmp_path / "trtexec.sh").is_file() and not (tmp_path / "model.engine").exists()


def test_engine_build_where_tensorrt_imports(onnx_chunked, tiny_ckpt, tmp_path):
    if T.tensorrt is None:
        pytest.skip("tensorrt is not importable here (no NVIDIA GPU / TensorRT on this machine)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt imports but no CUDA device is visible")
    res = T.export_trt(tiny_ckpt, tmp_path, precision="fp16", onnx_fp32=onnx_chunked[0], max_batch=4,
                       opt_batch=2, quiet=True)
    assert res.engine.is_file() and read_metadata(res.engine)["export"]["format"] == "tensorrt"


# ---- INT8 options ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    ({"calib_method": "kl"}, "calib_method: expected one of minmax, percentile, entropy, got 'kl'"),
    ({"int8_ops": "Conv,Relu"}, "int8_ops: expected a comma-separated subset of Conv,Gemm,MatMul"),
    ({"int8_weights": "per-row"}, "int8_weights: expected one of per-channel, per-tensor"),
    ({"calib_percentile": 99.9}, "calib_percentile: only used with calib_method percentile"),
    ({"calib_method": "percentile", "calib_percentile": 101}, r"calib_percentile: expected 50 <= p <= 100"),
    ({"n_calib": 0}, "n_calib: expected 1..10000"),
    ({"int8_fp32_consumers": "int8"}, "int8_fp32_consumers: expected one of fp32, qdq"),
    ({"int8_keep": "encoder;rm -rf"}, "int8_keep: expected module paths"),
    ({"int8_keep": "no_such_module"}, r"keep_fp32: no node of .* lies in module\(s\) \['no_such_module'\]"),
    ({"precision": "fp16", "calib_method": "entropy"}, "calib_method: an INT8 option; it needs precision int8"),
])
def test_bad_int8_option_is_one_clear_error(onnx_chunked, tiny_ckpt, tmp_path, kw, msg):
    from export.formats import ExportArgError

    kw = dict({"precision": "int8"}, **kw)
    with pytest.raises(ExportArgError, match=msg):
        T.export_trt(tiny_ckpt, tmp_path, dry_run=True, onnx_fp32=onnx_chunked[0], n_calib=kw.pop("n_calib", 4),
                     check=False, quiet=True, **kw)


def test_cli_flags_reach_the_metadata_and_sidecar(onnx_chunked, tiny_ckpt, tmp_path, capsys):
    import argparse
    import json

    from export.formats import add_cli_args, cli_kwargs

    ap = add_cli_args(argparse.ArgumentParser(), "tensorrt")
    kw = cli_kwargs(ap.parse_args(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path), "--precision", "int8",
                                   "--dry-run", "--calib-method", "percentile", "--calib-percentile", "99.5",
                                   "--n-calib", "5", "--int8-keep", "fuse.gate", "--int8-weights", "per-tensor",
                                   "--n", "4"]), "tensorrt")
    kw = {k: v for k, v in kw.items() if v is not None}
    res = T.export_trt(kw.pop("ckpt"), kw.pop("out"), onnx_fp32=onnx_chunked[0], quiet=True, **kw)
    assert res.parity is not None and res.parity.passed        # the int8 parity gate ran
    for meta in (read_metadata(res.onnx), json.loads((tmp_path / "model.int8.onnx.json").read_text())):
        info = meta["export"]["precision_info"]
        assert meta["export"]["precision"] == "int8"
        assert info["method"] == "percentile" and info["percentile"] == 99.5 and info["calib_frames"] == 5
        assert info["keep_fp32"] == ["fuse.gate"] and info["per_channel"] is False
        assert info["fp32_consumers"] == "fp32" and info["quant_ops"] == list(P.QUANT_OPS)
    with pytest.raises(SystemExit) as e:
        T.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--precision", "int8",
                "--calib-method", "kl", "--dry-run"])
    assert e.value.code == 2 and "--calib-method: invalid choice: 'kl'" in capsys.readouterr().err




@pytest.fixture(scope="module")
def memory_dvad(tmp_path_factory):
    """A tiny DVAD with the memory term (built on random images), its checkpoint and fp32 export."""
    import torch

    import models
    from models.registry import get_model_class

    cfg = get_model_class("dvad").config_class.tiny(memory_weight=1.0, memory_ratio=0.3).to_dict()
    torch.manual_seed(0)
    model = models.create_model("dvad", pretrained=False, **cfg).eval()
    g = torch.Generator().manual_seed(1)
    model.finalize([torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)])
    return export_through_cli(model, tmp_path_factory.mktemp("memory_dvad"))


@pytest.mark.parametrize("keep,expected", [(None, ["encoder"]), ("", [])])
def test_int8_keeps_the_encoder_of_a_model_with_a_memory(memory_dvad, onnx_chunked, tiny_ckpt, tmp_path, keep,
                                                         expected):
    """A model that scores against a memory of fp32 encoder features keeps its encoder fp32 in INT8
    unless --int8-keep says otherwise ("" = none); a model without a memory keeps nothing by default."""
    ckpt, fp32 = memory_dvad
    res = T.export_trt(ckpt, tmp_path, precision="int8", dry_run=True, onnx_fp32=fp32, n_calib=4, check=False,
                       quiet=True, int8_keep=keep)
    assert read_metadata(res.onnx)["export"]["precision_info"]["keep_fp32"] == expected
    m = onnx.load(str(res.onnx))
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    encoder = set(P.module_node_names(onnx.load(str(fp32)), ["encoder"], P.QUANT_OPS))
    assert encoder
    quantised = [n.name for n in m.graph.node if n.name in encoder and any(x in dq for x in n.input)]
    assert (not quantised) if expected else quantised
    if keep is None:
        plain = T.export_trt(tiny_ckpt, tmp_path / "plain", precision="int8", dry_run=True,
                             onnx_fp32=onnx_chunked[0], n_calib=4, check=False, quiet=True)
        assert read_metadata(plain.onnx)["export"]["precision_info"]["keep_fp32"] == []
