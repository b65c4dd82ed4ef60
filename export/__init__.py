"""Exporters: self-describing deployable artifacts with a parity gate.

    python -m export.onnx        --ckpt model.pt   ONNX (uint8 frames in; resize/normalise in graph)
    python -m export.check       --ckpt model.pt --artifact model.onnx   parity gate on its own
    python -m export.trt         --ckpt model.pt   TensorRT (precision in the ONNX graph, strongly typed)
    python -m export.trt_compat  model.onnx        static TensorRT parser compatibility check
    python -m export.aoti        --ckpt model.pt   AOTInductor package (.pt2)
    python -m export.triton_repo --ckpt model.pt --out REPO   Triton Inference Server repository

`export.formats` holds the one table of formats (`python -m export.formats` prints it as
Markdown); `export.artifacts.read_metadata` is what the runtime uses to read any artifact.
"""
