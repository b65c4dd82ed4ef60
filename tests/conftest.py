"""Test configuration. TRITON_INTERPRET must be set before any @triton.jit module loads."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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
