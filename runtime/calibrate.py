"""Event threshold in operator units: false alarms per metre, per hour or per 100 parts.

    python -m runtime.calibrate --engine model.onnx --normal DIR --width 256
        (--false-alarms-per-metre 0.5 --line-pitch-mm 0.1 | --false-alarms-per-hour 2 --line-rate-hz 5000
         | --false-alarms-per-100-images 1) [--val-data MVTEC_CLASS_DIR] [--tile T --stride S] [--write]

The defect-free images in --normal (never the test split) are laid end to end as the strip a
camera of --width pixels delivers, streamed once through the production pipeline at the stream's
tiling (runtime.replay), and the pixel threshold is set to the lowest value whose false events on
that strip stay within the target. With --val-data (an MVTec-layout class folder whose test/ split
has labelled defects) the defect recall expected at that threshold is measured too. --write stores
the result as the artifact's runtime config (deploy.artifacts.write_runtime_config: sidecar-only,
covered by the metadata hash), which `runtime.stream` applies and prints at start.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

from deploy import EngineError, load_engine
from deploy.artifacts import write_runtime_config

from .pipeline import StreamConfig
from .replay import ReplayError, lay_out, mvtec_test_images, normal_images, record, score_events, threshold_grid

UNITS = ("per_metre", "per_hour", "per_100_images")


@dataclass
class Calibration:
    pixel_threshold: float
    target: float
    unit: str                      # one of UNITS
    measured: float                # false alarms in `unit` on the normal strip at that threshold
    normal_images: int
    normal_lines: int
    line_pitch_mm: Optional[float] = None
    line_rate_hz: Optional[float] = None
    width: int = 0
    tile: Optional[List[int]] = None
    stride: Optional[List[int]] = None
    expected_recall: Optional[float] = None        # defect regions found on --val-data
    expected_image_recall: Optional[float] = None
    val_images: Optional[int] = None

    def to_runtime(self) -> dict:
        """The artifact's runtime config: the threshold the stream uses, and how it was chosen."""
        return {"pixel_threshold": self.pixel_threshold, "calibration": asdict(self)}


def _rate(metrics: dict, unit: str) -> float:
    key = {"per_metre": "false_per_metre", "per_hour": "false_per_hour", "per_100_images": "false_per_100_good"}[unit]
    return float(metrics[key])


def lowest_threshold(false_rate: Callable[[float], float], grid: List[float], target: float,
                     refine: int = 12) -> float:
    """The lowest threshold t on or between the grid points such that false_rate(t') <= target for
    every grid point t' >= t (false events fall as the threshold rises, but not strictly), refined
    by bisection between the last grid point above the target and the next one."""
    rates = [false_rate(t) for t in grid]
    ok_from = len(grid)
    for i in range(len(grid) - 1, -1, -1):
        if rates[i] > target:
            break
        ok_from = i
    if ok_from == len(grid):
        raise ReplayError(f"no threshold up to {grid[-1]:.6g} meets {target:g} false alarms (lowest rate seen "
                          f"{min(rates):.3g})")
    if ok_from == 0:
        return float(grid[0])
    lo, hi = grid[ok_from - 1], grid[ok_from]       # lo fails, hi passes
    for _ in range(refine):
        mid = 0.5 * (lo + hi)
        if false_rate(mid) <= target:
            hi = mid
        else:
            lo = mid
    return float(hi)


def calibrate(engine, normal_dir, width: int, target: float, unit: str, line_pitch_mm: Optional[float] = None,
              line_rate_hz: Optional[float] = None, val_data=None, config: Optional[StreamConfig] = None,
              log: Callable[[str], None] = lambda s: None) -> Calibration:
    """See module docstring; `engine` is an open deploy engine."""
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
    if unit == "per_metre" and not line_pitch_mm:
        raise ValueError("false alarms per metre need --line-pitch-mm (material travel per line)")
    if unit == "per_hour" and not line_rate_hz:
        raise ValueError("false alarms per hour need --line-rate-hz (lines per second)")
    if not target >= 0:
        raise ValueError(f"target: expected a false-alarm rate >= 0, got {target}")
    cfg = config or StreamConfig()
    with tempfile.TemporaryDirectory(prefix="edge_ad_calib_") as tmp:
        normal = lay_out(normal_images(normal_dir), width, f"{tmp}/normal", engine.frame_channels)
        log(f"calibrate: streaming {len(normal.placed)} normal images ({normal.lines} lines at width {width})")
        rec = record(engine, normal, StreamConfig(**asdict(cfg)))
        thr = lowest_threshold(lambda t: _rate(score_events(rec.events(t, cfg.min_area), normal, line_pitch_mm,
                                                            line_rate_hz), unit),
                               threshold_grid(rec, extra=[engine.map_threshold]), target)
        measured = _rate(score_events(rec.events(thr, cfg.min_area), normal, line_pitch_mm, line_rate_hz), unit)
        cal = Calibration(thr, float(target), unit, measured, len(normal.placed), normal.lines, line_pitch_mm,
                          line_rate_hz, int(width), list(rec.tile_hw), list(rec.summary["stride"]))
        if val_data is not None:
            val = lay_out(mvtec_test_images(val_data), width, f"{tmp}/val", engine.frame_channels)
            log(f"calibrate: streaming {len(val.placed)} labelled images for the expected recall")
            m = score_events(record(engine, val, StreamConfig(**asdict(cfg))).events(thr, cfg.min_area), val,
                             line_pitch_mm, line_rate_hz)
            cal.expected_recall, cal.expected_image_recall, cal.val_images = m["recall"], m["image_recall"], len(val.placed)
    return cal


def describe(cal: Calibration) -> str:
    """One line: the threshold, the false-alarm target and what was measured (and expected recall)."""
    unit = {"per_metre": "per metre", "per_hour": "per hour", "per_100_images": "per 100 good images"}[cal.unit]
    s = (f"pixel threshold {cal.pixel_threshold:.6g}: target <= {cal.target:g} false alarms {unit}, "
         f"{cal.measured:.3g} measured on {cal.normal_images} normal images ({cal.normal_lines} lines)")
    if cal.expected_recall is not None:
        s += (f"; expected defect recall {100 * cal.expected_recall:.1f} % of regions, "
              f"{100 * cal.expected_image_recall:.1f} % of defective images ({cal.val_images} labelled images)")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="exported artifact (.onnx, .engine, .pt2) or model.pt")
    p.add_argument("--normal", required=True, help="folder of defect-free images (not the test split)")
    p.add_argument("--width", type=int, required=True, help="camera line width in pixels the images are replayed at")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--false-alarms-per-metre", type=float)
    g.add_argument("--false-alarms-per-hour", type=float)
    g.add_argument("--false-alarms-per-100-images", type=float)
    p.add_argument("--line-pitch-mm", type=float, default=None, help="material travel per line (mm)")
    p.add_argument("--line-rate-hz", type=float, default=None, help="lines per second")
    p.add_argument("--val-data", default=None, help="MVTec-layout class folder with labelled test/ defects")
    p.add_argument("--tile", type=int, default=None, help="tile size (default: the engine's frame size)")
    p.add_argument("--stride", type=int, default=None, help="tile stride (default 3/4 tile, as runtime.stream)")
    p.add_argument("--min-area", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the threshold in the artifact's runtime config")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    unit, target = next((u, v) for u, v in (("per_metre", a.false_alarms_per_metre),
                                            ("per_hour", a.false_alarms_per_hour),
                                            ("per_100_images", a.false_alarms_per_100_images)) if v is not None)
    try:
        if a.width < 1:
            raise ValueError(f"--width: expected >= 1 pixels, got {a.width}")
        with load_engine(a.engine, threads=a.threads) as engine:
            cal = calibrate(engine, a.normal, a.width, target, unit, a.line_pitch_mm, a.line_rate_hz, a.val_data,
                            StreamConfig(tile=a.tile, stride=a.stride, min_area=a.min_area),
                            log=lambda s: print(s, file=sys.stderr))
        if a.write:
            write_runtime_config(a.engine, cal.to_runtime())
    except (ReplayError, EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(cal))
    print(json.dumps(cal.to_runtime(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
