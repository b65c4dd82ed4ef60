"""Triton model repository: config.pbtxt parses as a ModelConfig and matches the graph."""
import pytest

from export.triton_repo import export_triton_repo

from .conftest import FRAME_HW


@pytest.mark.stack("serve")
def test_repository_parses_and_matches_graph(onnx_chunked, tiny_ckpt, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed (serve extra)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = export_triton_repo(tiny_ckpt, tmp_path / "repo", onnx_path=onnx_chunked[0], max_batch=8, instances=2,
                              model_name="tile_ad")
    assert repo.validated
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(repo.config.read_text(), cfg)
    assert cfg.name == "tile_ad" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    (inp,) = cfg.input
    assert inp.name == "frames" and inp.data_type == model_config_pb2.TYPE_UINT8
    assert list(inp.dims) == [*FRAME_HW, 1]
    outs = {o.name: o for o in cfg.output}
    assert list(outs) == ["anomaly_map", "score", "normalized_score"]
    assert list(outs["anomaly_map"].dims) == [1, 64, 64]
    assert list(outs["score"].dims) == [1] and list(outs["score"].reshape.shape) == []
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert 8 in cfg.dynamic_batching.preferred_batch_size
    assert (repo.model_dir / "1" / "model.onnx").is_file() and (repo.model_dir / "1" / "model.onnx.json").is_file()
    # the copied model is the exported one, byte for byte
    assert (repo.model_dir / "1" / "model.onnx").read_bytes() == onnx_chunked[0].read_bytes()
    assert cfg.parameters["edge_ad_verdict"].string_value == "normalized_score >= 0.5"
