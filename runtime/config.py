"""What a stream is asked to do (`StreamConfig`, validated when built) and the checks made before
anything runs: engine / camera compatibility and the memory the stream's buffers will hold.

Every check raises one error naming the option and what was expected, so `runtime.stream` can
refuse a bad start with one line and without having opened a camera, an engine or a file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from deploy import Engine, EngineError
from deploy.contract import channels_of

from .sources import CameraMeta
from .sources.base import check_fits
from .tiling import tile_starts

DEFAULT_LATENCY_BUDGET_MS = 1000.0


@dataclass
class StreamConfig:
    tile: Optional[int] = None            # tile height (and width unless tile_w); None = engine's frame size
    tile_w: Optional[int] = None
    stride: Optional[int] = None          # along the strip; None = 3/4 of the tile (25 % overlap)
    stride_w: Optional[int] = None        # across the width; None = same fraction as stride
    max_batch: int = 16                   # tiles per inference call
    max_wait_ms: float = 5.0              # wait this long for a fuller batch
    overload: str = "drop-oldest"         # or "block" (applies to live sources; recordings always wait)
    capture_queue: int = 64               # buffers of >= 64 lines (smaller buffers get more slots: capture_slots)
    infer_queue: int = 16                 # bands
    post_queue: int = 64                  # results
    pixel_threshold: Optional[float] = None  # None = the artifact's runtime section, else score_stats.map_threshold
    image_threshold: Optional[float] = None  # None = the runtime section, else the graph's normalized_score >= 0.5
    min_area: int = 1
    line_pitch_mm: Optional[float] = None
    pixel_pitch_mm: Optional[float] = None
    # a live source's line whose verdict cannot come within this many ms of its band's newest
    # line's capture is dropped as `late` (None = no budget)
    latency_budget_ms: Optional[float] = DEFAULT_LATENCY_BUDGET_MS
    reconnect_backoff_s: float = 0.1
    reconnect_backoff_max_s: float = 2.0
    reconnect_max_tries: int = 20         # consecutive failed reopen attempts before giving up
    drain_timeout_s: float = 2.0          # stop: let queued work finish this long, then hard stop
    preview_rows: int = 1024              # rows kept for the rolling preview / overlays

    def __post_init__(self):
        if self.overload not in ("drop-oldest", "block"):
            raise ValueError(f"overload={self.overload!r}; expected 'drop-oldest' or 'block'")
        for name in ("tile", "tile_w", "stride", "stride_w"):
            _int(self, name, 1, 1 << 16, optional=True)
        for name, lo in (("max_batch", 1), ("capture_queue", 1), ("infer_queue", 1), ("post_queue", 1),
                         ("min_area", 1), ("reconnect_max_tries", 0), ("preview_rows", 0)):
            _int(self, name, lo, 1 << 31)
        _num(self, "max_wait_ms", lo=0.0, hi=60_000.0)
        _num(self, "pixel_threshold", optional=True)
        _num(self, "image_threshold", optional=True)
        _num(self, "line_pitch_mm", lo=0.0, optional=True, open_lo=True)
        _num(self, "pixel_pitch_mm", lo=0.0, optional=True, open_lo=True)
        _num(self, "latency_budget_ms", lo=0.0, hi=3_600_000.0, optional=True, open_lo=True)
        _num(self, "reconnect_backoff_s", lo=0.0, hi=3600.0)
        _num(self, "reconnect_backoff_max_s", lo=self.reconnect_backoff_s, hi=3600.0)
        _num(self, "drain_timeout_s", lo=0.0, hi=3600.0)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(cfg, name, lo, hi, optional=False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{_option(name)} {v!r}: expected an integer in [{lo}, {hi}]")


def _num(cfg, name, lo=None, hi=None, optional=False, open_lo=False) -> None:
    v = getattr(cfg, name)
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{_option(name)} {v!r}: expected a finite number")
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise ValueError(f"{_option(name)} {v!r}: expected a number {'>' if open_lo else '>='} {lo:g}")
    if hi is not None and v > hi:
        raise ValueError(f"{_option(name)} {v!r}: expected a number <= {hi:g}")
    setattr(cfg, name, float(v))


def scale_mismatch(meta: dict, tile_hw, tolerance: float = 0.15) -> Optional[str]:
    """A warning when the tiles the stream cuts show the model parts at another scale than it was
    trained at (metadata "training", models.tiles), else None. Scale = model input pixels per
    strip pixel: input_size / tile for the stream."""
    geo = meta.get("training") or {}
    size = (meta.get("preprocess") or {}).get("input_size")
    if not geo.get("scale") or not size:
        return None
    trained, streamed = float(geo["scale"]), float(size) / float(tile_hw[0])
    if abs(streamed / trained - 1.0) <= tolerance:
        return None
    how = (f"on {geo['tile']} px tiles of a {geo.get('line_width')} px wide strip" if geo.get("mode") == "tiles"
           else f"on whole images (median {geo.get('native_median_hw')}) resized to {size} px")
    fix = (f"cut {geo['tile']} px tiles (export with --frame-size {geo['tile']}x{geo['tile']})"
           if geo.get("mode") == "tiles" else "train with models.train --tile on the stream's tiles")
    return (f"scale mismatch: the model was trained {how}, i.e. {trained:.2f} model px per strip px; this stream "
            f"cuts {tile_hw[0]} px tiles, {streamed:.2f} model px per strip px: parts look {streamed / trained:.2f}x "
            f"the size the model learned; {fix}")


def check_compatible(engine: Engine, camera: CameraMeta, tile_hw) -> None:
    """Fail at start, with one message, when engine and camera cannot work together."""
    eng_fmt = engine.pixel_format
    if camera.pixel_format != eng_fmt:
        raise EngineError(
            f"{engine.path.name}: engine expects {eng_fmt} frames ({engine.frame_channels} channel"
            f"{'s' if engine.frame_channels > 1 else ''}) but the camera delivers {camera.pixel_format}; "
            f"set the source's format={eng_fmt} or export the engine with frame_channels="
            f"{channels_of(camera.pixel_format)}")
    if engine.frame_hw is not None and tuple(tile_hw) != tuple(engine.frame_hw):
        raise EngineError(f"{engine.path.name}: engine takes {engine.frame_hw[0]}x{engine.frame_hw[1]} tiles; "
                          f"--tile {tile_hw[0]}x{tile_hw[1]} does not match (omit --tile or export for that size)")


SLOT_LINES = 64   # capture_queue counts buffers of this many lines (or more)


def capture_slots(cfg: StreamConfig, cam: CameraMeta) -> int:
    """Capture queue length in buffers: `capture_queue` buffers, but never fewer lines than
    capture_queue x SLOT_LINES for a line camera, so 1-line buffers get the same slack in time
    (and memory) as 64-line ones."""
    if cam.kind != "line" or cam.height >= SLOT_LINES:
        return cfg.capture_queue
    return -(-cfg.capture_queue * SLOT_LINES // max(1, cam.height))


def buffer_memory(cfg: StreamConfig, cam: CameraMeta, tile_hw: Tuple[int, int], stride_w: int,
                  ring_rows: int, max_batch: int) -> List[Tuple[str, int]]:
    """(what, bytes) of the buffers a stream holds at most: its queues full, the line ring, a
    batch, the strip map and the previews. runtime.sources.base.check_fits refuses too much."""
    th, tw = tile_hw
    ch = cam.channels
    row = cam.width * ch
    tiles = len(tile_starts(cam.width, tw, stride_w)) * th * tw
    slots = capture_slots(cfg, cam)
    return [(f"capture queue ({slots} buffers)", slots * cam.height * row),
            (f"line ring ({ring_rows} lines)", ring_rows * row),
            (f"inference queue ({cfg.infer_queue} bands)", cfg.infer_queue * tiles * ch),
            (f"results queue ({cfg.post_queue} bands with maps)", cfg.post_queue * tiles * (ch + 4)),
            (f"batch ({max_batch} tiles)", max_batch * th * tw * (ch + 4 + 12)),
            ("strip map and previews", (2 * th + 2 * cfg.preview_rows) * cam.width * (ch + 4))]


def check_memory(cfg: StreamConfig, cam: CameraMeta, tile_hw, stride_w: int, ring_rows: int,
                 max_batch: int, where: str) -> int:
    """Bytes the stream's buffers may hold; SourceError (one line with the sizes) when they cannot fit."""
    return check_fits(buffer_memory(cfg, cam, tile_hw, stride_w, ring_rows, max_batch), where)


def parse_address(text: str, option: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    """"HOST:PORT", ":PORT" or "PORT" -> (host, port); ValueError naming the option."""
    text = str(text).strip()
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8080)") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"{option} {text!r}: port {p} is not in 0..65535")
    return host, p
