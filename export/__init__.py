"""Exporters: self-describing deployable artifacts with a parity gate.

    python -m export.onnx        --ckpt model.pt   ONNX (uint8 frames in; resize/normalise in graph)
    python -m export.check       --ckpt model.pt --artifact model.onnx   parity gate on its own
    python -m export.trt         --ckpt model.pt   TensorRT (precision in the ONNX graph, strongly typed)
    python -m export.trt_compat  model.onnx        static TensorRT parser compatibility check
    python -m export.aoti        --ckpt model.pt   AOTInductor package (.pt2)
    python -m export.triton_repo --ckpt model.pt --out REPO   Triton Inference Server repository
    (export.precision: the fp16 / int8 ONNX passes; export.triton_ensemble: pre/post around bare engines)

`export.formats` holds the one table of formats (`python -m export.formats` prints it as
Markdown). What an artifact is (metadata, sidecar, hashes) and how it is run is the deploy
layer's: `deploy.read_metadata`, `deploy.load_engine`; the parity gate loads every artifact
through the latter, so the engine it certifies is the engine runtime.stream and runtime.serve use.
"""
