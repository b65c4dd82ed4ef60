"""The deploy layer: the artifact contract, artifact metadata, and every inference engine.

    from deploy import load_engine
    with load_engine("export/model.onnx") as engine:      # .onnx, .engine/.plan, .pt2, .pt
        out = engine.infer(frames)                         # uint8 (B, H, W, C) -> numpy outputs

Layering: kernels <- models <- deploy <- {export, runtime} <- benchmarks. What this package
imports at the top is torch-free (numpy, json, onnxruntime where installed): a stream running an
ONNX or TensorRT artifact never imports torch or `models`. The torch engines (AOTInductor,
checkpoints) live in deploy.torch_engines and import torch when used. docs/design.md describes
the contract (deploy.contract), the artifact format (deploy.artifacts) and the engines.
"""
from .artifacts import ArtifactError, read_metadata, sidecar_path, write_runtime_config, write_sidecar
from .engine import Engine, EngineError, available_backends, choose_backend, load_engine

__all__ = ["ArtifactError", "Engine", "EngineError", "available_backends", "choose_backend", "load_engine",
           "read_metadata", "sidecar_path", "write_runtime_config", "write_sidecar"]
