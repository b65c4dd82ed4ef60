"""Small helpers shared by the exporters: model loading, metadata, scan lowering switch, CLI plumbing."""
from __future__ import annotations

import contextlib
import datetime
import json
import pathlib
import sys
import time
from typing import Any, Callable, Dict, Optional

import onnx
import torch

import kernels
from deploy import ArtifactError
from models.checkpoint import CheckpointError, checkpoint_metadata, load_checkpoint

from .formats import ExportArgError, add_cli_args, cli_kwargs


class ExportError(RuntimeError):
    """An export that could not be completed; the message says why and what to do."""


def load_model(ckpt):
    """A checkpoint path (model.pt) or an already built AnomalyModel -> model in eval mode."""
    if isinstance(ckpt, torch.nn.Module):
        return ckpt.eval()
    return load_checkpoint(ckpt).eval()


def model_source(ckpt) -> str:
    return str(ckpt) if not isinstance(ckpt, torch.nn.Module) else f"<{type(ckpt).__name__} object>"


def build_metadata(model, **export: Any) -> Dict[str, Any]:
    """The artifact metadata (deploy.artifacts): checkpoint_metadata(model) + an "export" dict
    (the given fields + creation time); the onnx version joins the recorded versions."""
    meta = checkpoint_metadata(model)
    ex = dict(export)
    ex.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    meta["versions"]["onnx"] = onnx.__version__
    meta["export"] = json.loads(json.dumps(ex))
    return meta


@contextlib.contextmanager
def scan_lowering(mode: str):
    """Select how `kernels.selective_scan` lowers while exporting: "chunked" or "plugin"
    (kernels.export_mode, kernels/lowering.py)."""
    if mode not in ("chunked", "plugin"):
        raise ValueError(f"scan: expected 'chunked' or 'plugin', got {mode!r}")
    with kernels.export_mode(mode):
        yield


def resolve_out(out, default_name: str) -> pathlib.Path:
    """`out` is a folder (artifact gets `default_name` inside) or a file path with the suffix."""
    out = pathlib.Path(out if out is not None else "export_out")
    suffix = pathlib.Path(default_name).suffix
    if suffix and out.suffix.lower() == suffix:
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / default_name


class Steps:
    """Progress for the few long steps of an export (a tqdm bar over named steps)."""

    def __init__(self, names, desc: str, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc=desc, unit="step", disable=quiet, file=sys.stderr,
                        bar_format="{desc}: {n_fmt}/{total_fmt} {postfix} [{elapsed}]")
        self.times = {}

    @contextlib.contextmanager
    def step(self, name: str):
        self.bar.set_postfix_str(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - t, 3)
            self.bar.update(1)

    def close(self):
        self.bar.close()


def run_cli(fn: Callable[[], object], quiet_errors: tuple = ()) -> int:
    """Run a CLI body: user errors (bad args/files, failed gates) print one line, exit code 2/1."""

    try:
        fn()
    except (ExportArgError, CheckpointError, ArtifactError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def format_main(format_name: str, prog: str, doc: str, export_fn, argv=None) -> int:
    """The whole CLI of a simple exporter: the format table's flags, one call, print the summary."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_cli_args(ap, format_name)

    def body():
        kw = cli_kwargs(ap.parse_args(argv), format_name)
        res = export_fn(kw.pop("ckpt"), kw.pop("out"), **{k: v for k, v in kw.items() if v is not None})
        print(res.summary())

    return run_cli(body)


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def describe_files(paths) -> str:
    lines = []
    for p in paths:
        p = pathlib.Path(p)
        if p.is_file():
            lines.append(f"  {p}  ({p.stat().st_size / 1e6:.2f} MB)")
        elif p.is_dir():
            lines.append(f"  {p}/")
    return "\n".join(lines)


def maybe_int(v) -> Optional[int]:
    return None if v is None else int(v)
