"""Parity gate: passes an honest export, catches a corrupted one and says what failed."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import check as C
from deploy.artifacts import read_metadata, write_sidecar


def corrupt(src, dst, scale=1.5):
    """Copy of `src` with one conv weight scaled (a silent numerical bug), sidecar rewritten."""
    m = onnx.load(str(src))
    convs = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    for i, init in enumerate(m.graph.initializer):
        if init.name in convs and init.dims[0] > 4:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
            break
    onnx.save(m, str(dst))
    write_sidecar(dst, read_metadata(src))
    return dst


def test_gate_passes_real_export_and_fails_corrupted(onnx_chunked, tiny_model, tmp_path, capsys):
    good = onnx_chunked[0]
    res = C.check_artifact(tiny_model, good, n=4, seed=5)
    assert res.passed and res.spearman > 0.99 and res.max_abs("score") < 1e-4
    bad = corrupt(good, tmp_path / "bad.onnx")
    res = C.check_artifact(tiny_model, bad, n=4, seed=5)
    assert not res.passed
    assert any("anomaly_map" in f for f in res.failures) and "FAILED" in res.report()
    with pytest.raises(C.ParityError, match="parity gate failed"):
        C.gate(tiny_model, bad, read_metadata(bad), n=4)


def test_cli_exit_codes(onnx_chunked, tiny_ckpt, tmp_path, capsys):
    assert C.main(["--ckpt", str(tiny_ckpt), "--artifact", str(onnx_chunked[0]), "--n", "3"]) == 0
    assert "parity PASSED" in capsys.readouterr().out
    bad = corrupt(onnx_chunked[0], tmp_path / "bad.onnx")
    assert C.main(["--ckpt", str(tiny_ckpt), "--artifact", str(bad), "--n", "3"]) == 1
    assert "<-- over tolerance" in capsys.readouterr().out
    assert C.main(["--ckpt", str(tiny_ckpt), "--artifact", str(tmp_path / "missing.onnx")]) == 2
    assert "artifact file not found" in capsys.readouterr().err


def test_real_images(onnx_chunked, tiny_model, magnetic_tile):
    res = C.check_artifact(tiny_model, onnx_chunked[0], images=magnetic_tile / "test", n=5)
    assert res.passed and "images from" in res.source and res.n_images == 5


def test_compare_outputs_tolerances_are_data():
    ref = {"score": np.array([1.0, 2.0, 3.0], np.float32)}
    got = {"score": np.array([1.0, 2.001, 3.0], np.float32)}
    tight = C.Tolerances(default=C.Tolerance(1e-4, 0.0))
    loose = C.Tolerances(per_output={"score": C.Tolerance(1e-2, 0.0)})
    comps, fails = C.compare_outputs(ref, got, tight, batch=3)
    assert not comps[0].passed and comps[0].n_bad == 1 and abs(comps[0].max_abs - 1e-3) < 1e-6 and fails
    comps, fails = C.compare_outputs(ref, got, loose, batch=3)
    assert comps[0].passed and not fails
    rho, tau = C.rank_agreement(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0]))
    assert rho == pytest.approx(0.8) and tau == pytest.approx(4 / 6)


def test_gate_runs_the_artifact_through_the_deployed_loader(onnx_chunked, tiny_model):
    """The engine that certified the artifact is the one deploy.load_engine gives runtime.stream and
    runtime.serve for it, and the sidecar's parity record names it."""
    from deploy import load_engine

    res = C.check_artifact(tiny_model, onnx_chunked[0], n=3, seed=2)
    with load_engine(onnx_chunked[0]) as deployed:
        cls = type(deployed)
        assert res.engine == {"class": f"{cls.__module__}.{cls.__qualname__}", "backend": deployed.backend}
    assert res.engine["class"] == "deploy.ort.OrtEngine"
    side = read_metadata(onnx_chunked[0])
    assert side["parity"]["engine"]["class"] == "deploy.ort.OrtEngine"
