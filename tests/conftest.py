"""Test configuration. TRITON_INTERPRET must be set before any @triton.jit module loads: without
a CUDA device the Triton kernels run under the interpreter (numpy, on CPU); with one they run on
the GPU. An explicit TRITON_INTERPRET in the environment wins (benchmarks/gpu_check.py sets 0 on
the GPU and 1 in its CPU dry run)."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


@pytest.fixture(scope="session")
def magnetic_tile():
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"real dataset not present at {MAGNETIC_TILE} (only in the project's dev/CI checkout)")
    return MAGNETIC_TILE
