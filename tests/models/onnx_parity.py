"""Shared check: a model exported with torch.onnx.export(dynamo=True), dynamic batch, equals PyTorch in ORT."""
import numpy as np
import pytest
import torch


def assert_onnx_matches_pytorch(net, path, size: int = 128):
    ort = pytest.importorskip("onnxruntime")
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    torch.onnx.export(net, (torch.randn(2, 3, size, size),), str(path), dynamo=True, input_names=["x"],
                      output_names=["anomaly_map", "score"], dynamic_shapes={"x": {0: batch}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, size, size)        # a batch size other than the traced one
    amap, score = sess.run(None, {"x": x3.numpy()})
    with torch.no_grad():
        ra, rs = net(x3)
    np.testing.assert_allclose(amap, ra.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(score, rs.numpy(), rtol=1e-3, atol=1e-4)
