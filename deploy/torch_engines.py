"""Engines that need torch: an AOTInductor package (`aoti`) and a model run by PyTorch (`torch`).

`TorchEngine` wraps a checkpoint path or a model object in deploy.graph.DeployModule, so it takes
the same uint8 frames and returns the same outputs as every exported artifact: it is the
reference side of the parity gate (export.check), `runtime.stream --engine model.pt`, and the
eager / `torch.compile` rows of benchmarks/latency.py.
"""
from __future__ import annotations

import copy
import pathlib
from typing import Optional

import numpy as np
import torch

from .contract import OUTPUT_NAMES, output_names
from .engine import Engine, EngineError, export_info, read_engine_metadata
from .graph import DeployModule, default_frame_hw


def _to_device(frames: np.ndarray, device: str) -> torch.Tensor:
    """uint8 frames to the engine's device: through pinned memory for CUDA (an async copy of
    the raw uint8 bytes; resize and normalisation then run on the GPU inside the graph)."""
    x = torch.from_numpy(frames)
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True)
    return x


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class AOTIEngine(Engine):
    backend = "aoti"

    def __init__(self, path, meta: Optional[dict] = None, device: str = "cpu"):
        from torch._inductor import aoti_load_package

        meta = meta if meta is not None else read_engine_metadata(path)
        hw, ch, batch = export_info(meta, path)
        try:
            self.runner = aoti_load_package(str(path))
        except Exception as e:  # Inductor raises RuntimeError / zip / C++ loader errors
            raise EngineError(f"{path}: cannot load AOTInductor package: {_first_line(e)}") from None
        super().__init__(path, meta, hw, ch, batch)
        self.device = device
        self.output_names = list((meta.get("export") or {}).get("outputs") or OUTPUT_NAMES)

    def _run(self, frames):
        with torch.inference_mode():
            outs = self.runner(_to_device(frames, self.device))
        if isinstance(outs, torch.Tensor):
            outs = [outs]
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.output_names, outs)}


class TorchEngine(Engine):
    """`model`: a checkpoint path (`model.pt`) or an AnomalyModel. Any frame size / channels
    (`frame_hw` default: the model's input size). `compiled`: torch.compile the graph (Inductor,
    static shapes); `precision` "fp16": autocast on CUDA. A model object is copied before it is
    moved to another device, so the caller's model stays where it was."""

    backend = "torch"

    def __init__(self, model, frame_hw=None, frame_channels: int = 3, device: str = "cpu",
                 threads: int = 0, full_res_map: bool = False, compiled: bool = False,
                 precision: str = "fp32"):
        if isinstance(model, (str, pathlib.Path)):
            from models.checkpoint import CheckpointError, load_checkpoint

            path = pathlib.Path(model)
            try:
                model = load_checkpoint(path, map_location=device)
            except CheckpointError as e:
                raise EngineError(str(e)) from None
            meta = dict(model.checkpoint_meta)
            hashes = dict(model.checkpoint_hashes)
        else:
            from models.checkpoint import checkpoint_metadata

            path = pathlib.Path(f"<{type(model).__name__}>")
            meta = checkpoint_metadata(model)
            hashes = {}
            if str(device) != "cpu":
                model = copy.deepcopy(model)
        if precision not in ("fp32", "fp16"):
            raise EngineError(f"{path}: torch engines run fp32 or fp16 (autocast), not {precision!r}")
        if precision == "fp16" and not str(device).startswith("cuda"):
            raise EngineError(f"{path}: fp16 runs on CUDA only (CPU fp16 kernels are emulated and not a "
                              "deployment path)")
        hw = tuple(frame_hw) if frame_hw is not None else default_frame_hw(model)
        meta["export"] = {"format": "checkpoint", "frame_hw": list(hw), "frame_channels": int(frame_channels),
                          "batch": None, "outputs": list(output_names(full_res_map))}
        super().__init__(path, meta, hw, frame_channels, None)
        self.checkpoint_hashes = hashes
        self.device, self.precision, self.compiled = device, precision, bool(compiled)
        if threads:
            torch.set_num_threads(int(threads))
        self.module = DeployModule(model, frame_hw=hw, frame_channels=frame_channels,
                                   full_res_map=full_res_map).to(device).eval()
        self.output_names = list(self.module.output_names)
        self._graph = torch.compile(self.module, dynamic=False) if compiled else self.module

    @property
    def model(self):
        return self.module.model

    def integrity(self) -> dict:
        return {**super().integrity(), **self.checkpoint_hashes}

    def _run(self, frames):
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16")
        with torch.inference_mode(), autocast:
            outs = self._graph(_to_device(frames, self.device))
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}
