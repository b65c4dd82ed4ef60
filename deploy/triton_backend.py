"""The Triton Python-backend model of an edge-ad repository: pre- or post-processing, or an ONNX
graph run with ONNX Runtime inside the backend (for Triton builds without the onnxruntime backend).

An artifact exported with deploy.graph.DeployModule (every ONNX / AOTInductor artifact of this
toolkit) already takes raw uint8 frames and returns normalised scores. A bare engine does not: a
TensorRT plan built from another tool takes the normalised float tensor (B, C, S, S) and returns
(anomaly_map, score). export.triton_ensemble chains such an engine between a `preprocess` and a
`postprocess` model of this kind, so clients see the contract of deploy/contract.py.

Inside Triton this file runs from the model's version folder (export.triton_ensemble writes a
`model.py` that puts the folder on sys.path and copies this module and deploy/contract.py there
as the package `deploy`): it imports only numpy, the standard library and the contract. The
metadata (preprocess, score_stats, export.frame_hw/frame_channels) travels in each model's
config.pbtxt `parameters` as JSON.
"""
from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np

from deploy.contract import normalize_score, preprocess_frames, verdict

ROLES = ("preprocess", "postprocess", "onnx")


def postprocess_scores(score: np.ndarray, low: float, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """score (B,) or (B, 1) -> (normalized_score (B, 1) float32, verdict (B, 1) bool)."""
    norm = normalize_score(np.asarray(score, dtype=np.float32).reshape(-1, 1), low, threshold)
    return norm, verdict(norm)


# ---- the Triton Python-backend model -----------------------------------------------------------
class TritonPythonModel:
    """Config parameter `role`: "preprocess" / "postprocess" (metadata JSON in parameter `edge_ad`),
    or "onnx": run the version folder's `model_file` (default model.onnx) with ONNX Runtime."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # only inside Triton

        self.pb = pb_utils
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        self.role = params.get("role", "")
        if self.role not in ROLES:
            raise ValueError(f"{cfg.get('name')}: parameter role must be one of {ROLES}, got {self.role!r}")
        if self.role == "onnx":
            import onnxruntime as ort

            path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
            so = ort.SessionOptions()
            if params.get("threads"):
                so.intra_op_num_threads = int(params["threads"])
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.output_names = [o["name"] for o in cfg.get("output", [])]
            return
        meta = json.loads(params.get("edge_ad") or "{}")
        pp = meta.get("preprocess") or {}
        st = meta.get("score_stats") or {}
        self.input_size = int(pp.get("input_size", 256))
        self.mean = pp.get("mean", (0.485, 0.456, 0.406))
        self.std = pp.get("std", (0.229, 0.224, 0.225))
        self.model_channels = int(pp.get("channels", 3))
        self.low = float(st.get("low", 0.0))
        self.threshold = float(st.get("threshold", 1.0))
        self.core_input = params.get("core_input", "input")

    def _one(self, request):
        pb = self.pb
        if self.role == "onnx":
            x = pb.get_input_tensor_by_name(request, self.input_name).as_numpy()
            outs = self.session.run(self.output_names, {self.input_name: x})
            return pb.InferenceResponse(output_tensors=[pb.Tensor(n, o) for n, o in zip(self.output_names, outs)])
        if self.role == "preprocess":
            frames = pb.get_input_tensor_by_name(request, "frames").as_numpy()
            x = preprocess_frames(frames, self.input_size, self.mean, self.std, self.model_channels)
            return pb.InferenceResponse(output_tensors=[pb.Tensor(self.core_input, x)])
        amap = pb.get_input_tensor_by_name(request, "anomaly_map").as_numpy().astype(np.float32)
        score = pb.get_input_tensor_by_name(request, "score").as_numpy()
        norm, verdict = postprocess_scores(score, self.low, self.threshold)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("anomaly_map_out", amap),
            pb.Tensor("score_out", np.asarray(score, dtype=np.float32).reshape(-1, 1)),
            pb.Tensor("normalized_score", norm),
            pb.Tensor("verdict", verdict)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # one bad request must not fail the others in its batch
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[], error=self.pb.TritonError(f"{self.role}: {type(e).__name__}: {e}")))
        return responses

    def finalize(self):
        pass
