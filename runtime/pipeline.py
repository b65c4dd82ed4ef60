"""The streaming pipeline: capture -> tiling -> batched inference -> stitching/events -> sinks.

(Over 500 lines on purpose: the four stage threads share the queues, the stop events and the
line accounting, and that one invariant is easiest to check when they are read together; the
counters, the batching and the tiling live in runtime/accounting.py, batching.py and tiling.py.)

Each stage is a thread; stages talk through bounded queues. Every `get`/`put` has a timeout and
every loop checks the stop events, so a dead stage can never hang another (no shutdown by
sentinel). Shutdown is two-phase: `stop()` ends capture and lets the stages drain; if draining
takes longer than `drain_timeout_s`, a hard stop ends them and what was still in flight is
counted as dropped ("shutdown").

Line accounting (the invariant `lines_in == lines_scored + sum(lines_dropped.values())`):
  lines_in       every line the camera produced: lines of received buffers plus the lines of
                 gaps in the camera's line/frame counter
  camera_drop    gap in the counter while connected (the camera / driver lost buffers)
  reconnect_gap  gap across a disconnect + reopen
  corrupt        buffers delivered incomplete
  overload       drop-oldest evicted them from a full queue (capture or inference queue)
  engine_error   the inference call for their tiles raised
  shutdown       still in flight at a hard stop
  scored         owned by a band whose tiles were all inferred (see runtime.tiling.Band)
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from deploy import Engine, EngineError
from deploy.contract import channels_of

from .accounting import Latencies, Stats
from .batching import BandBatcher
from .sources import Buffer, CameraMeta, Source, SourceDisconnected, SourceError
from .tiling import Band, LineAssembler, RollingRows, StripStitcher

log = logging.getLogger("runtime.pipeline")

_POLL = 0.05   # seconds: every blocking queue call uses this timeout


@dataclass
class StreamConfig:
    tile: Optional[int] = None            # tile height (and width unless tile_w); None = engine's frame size
    tile_w: Optional[int] = None
    stride: Optional[int] = None          # along the strip; None = 3/4 of the tile (25 % overlap)
    stride_w: Optional[int] = None        # across the width; None = same fraction as stride
    max_batch: int = 16                   # tiles per inference call
    max_wait_ms: float = 5.0              # wait this long for a fuller batch
    overload: str = "drop-oldest"         # or "block"
    capture_queue: int = 64               # buffers
    infer_queue: int = 16                 # bands
    post_queue: int = 64                  # results
    pixel_threshold: Optional[float] = None  # None = metadata score_stats.map_threshold
    min_area: int = 1
    line_pitch_mm: Optional[float] = None
    pixel_pitch_mm: Optional[float] = None
    reconnect_backoff_s: float = 0.1
    reconnect_backoff_max_s: float = 2.0
    reconnect_max_tries: int = 20         # consecutive failed reopen attempts before giving up
    drain_timeout_s: float = 10.0
    preview_rows: int = 1024              # rows kept for the rolling preview / overlays

    def __post_init__(self):
        if self.overload not in ("drop-oldest", "block"):
            raise ValueError(f"overload={self.overload!r}; expected 'drop-oldest' or 'block'")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch}; expected >= 1")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={self.max_wait_ms}; expected >= 0")


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


class Pipeline:
    """Run a source through an engine. `start()`, then `wait()` or `stop()`; `summary()`.

    `on_band(band, rec)` is called from the postprocess thread for every band, in order, right
    after the stitcher took it: `rec` holds the band's tile maps and scores ({"maps", "norm",
    "score"}), or is None for a band that was dropped or only marks the end of a segment."""

    def __init__(self, engine: Engine, source: Source, config: StreamConfig = None,
                 sinks=None, on_band: Optional[Callable] = None):
        self.engine = engine
        self.source = source
        self.cfg = config or StreamConfig()
        self.sinks = sinks            # runtime.sinks.SinkRunner or None
        self.on_band = on_band
        self.stats = Stats()
        self.stop_capture = threading.Event()
        self.hard_stop = threading.Event()
        self.capture_done = threading.Event()
        self.pre_done = threading.Event()
        self.infer_done = threading.Event()
        self.post_done = threading.Event()
        self.error: Optional[BaseException] = None
        self.events: collections.deque = collections.deque(maxlen=10_000)   # most recent events
        self._threads: List[threading.Thread] = []

    # ------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        try:
            self.source.open()
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.source.uri}: cannot open: {e}") from None
        cam = self.source.meta
        cfg, eng = self.cfg, self.engine
        th = cfg.tile or (eng.frame_hw[0] if eng.frame_hw else 256)
        tw = cfg.tile_w or (cfg.tile if cfg.tile else (eng.frame_hw[1] if eng.frame_hw else th))
        check_compatible(eng, cam, (th, tw))
        sh = cfg.stride or max(1, th - th // 4)
        sw = cfg.stride_w or max(1, int(round(tw * sh / th)))
        if sh > th or sw > tw:
            raise EngineError(f"--stride {sh} is larger than the tile ({th}); tiles would leave gaps")
        self.tile_hw, self.stride_hw = (th, tw), (sh, sw)
        self.scale_warning = scale_mismatch(eng.meta, self.tile_hw)
        if self.scale_warning:
            log.warning("%s", self.scale_warning)
        # never build batches larger than the engine was built for
        self.max_batch = min(cfg.max_batch, getattr(eng, "max_batch", None) or cfg.max_batch)
        self.area = cam.kind == "area"
        self.assembler = LineAssembler(cam.width, cam.channels, th, tw, sh, sw,
                                       capacity=max(2 * th, th + cam.height))
        thr = cfg.pixel_threshold if cfg.pixel_threshold is not None else eng.map_threshold
        self.pixel_threshold = float(thr)
        self.map_low = float(eng.score_stats.get("map_low", 0.0))
        self.stitcher = StripStitcher(cam.width, th, tw, self.pixel_threshold, cfg.min_area,
                                      cfg.line_pitch_mm, cfg.pixel_pitch_mm, keep_rows=cfg.preview_rows)
        self.preview = RollingRows(cfg.preview_rows, cam.width, cam.channels)
        self.q_cap: queue.Queue = queue.Queue(cfg.capture_queue)
        self.q_inf: queue.Queue = queue.Queue(cfg.infer_queue)
        self.q_post: queue.Queue = queue.Queue(cfg.post_queue)
        self._inflight_bands: Dict[int, Band] = {}     # taken by the inference thread, not yet posted
        self._reorder: Dict[int, tuple] = {}

    def start(self) -> "Pipeline":
        self._setup()
        self.stats.t_start = time.monotonic()
        for name, fn in (("capture", self._capture), ("preprocess", self._preprocess),
                         ("inference", self._inference), ("postprocess", self._postprocess)):
            t = threading.Thread(target=self._guard(fn), name=f"stream-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as e:  # a stage that dies stops the pipeline, never hangs it
                log.exception("stage %s failed", fn.__name__)
                if self.error is None:
                    self.error = e
                self.stop_capture.set()
                self.hard_stop.set()
            finally:
                {"_capture": self.capture_done, "_preprocess": self.pre_done,
                 "_inference": self.infer_done, "_postprocess": self.post_done}[fn.__name__].set()
        return run

    # ------------------------------------------------------------------------------------
    # queue helpers (timeouts everywhere)
    # ------------------------------------------------------------------------------------
    def _put(self, q: queue.Queue, item, evict: Optional[Callable] = None) -> bool:
        """Put with the overload policy; `evict(item)` accounts an evicted oldest item.
        drop-oldest never waits: a full queue loses its oldest item at once. block waits (in
        _POLL steps, so stop events are seen). Returns False when hard-stopped first."""
        drop = evict is not None and self.cfg.overload == "drop-oldest"
        while not self.hard_stop.is_set():
            try:
                if drop:
                    q.put_nowait(item)
                else:
                    q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                if drop:
                    try:
                        evict(q.get_nowait())
                    except queue.Empty:
                        pass
        return False

    def _get(self, q: queue.Queue, timeout: float = _POLL):
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    # ------------------------------------------------------------------------------------
    # stage 1: capture
    # ------------------------------------------------------------------------------------
    def _capture(self) -> None:
        st, src = self.stats, self.source
        cam = src.meta
        unit = 1 if not self.area else cam.height      # lines per index step
        expected = None
        offset = 0                 # added to indices when a camera counter restarted
        last_t = None
        reconnected = False

        def evict(old: Buffer):
            st.drop("overload", old.lines)

        while not self.stop_capture.is_set():
            try:
                buf = src.read()
            except SourceDisconnected as e:
                log.warning("%s", e)
                if not self._reopen():
                    break
                reconnected = True
                continue
            if buf is None:
                break
            idx = buf.index + offset
            step = buf.lines if not self.area else 1
            if expected is not None and idx != expected:
                if idx > expected:
                    gap = (idx - expected) * unit
                else:
                    # the counter restarted (reopened device): estimate the gap from time
                    rate = cam.rate_hz or 0.0
                    lines_rate = rate if not self.area else rate * cam.height
                    gap = 0
                    if lines_rate and last_t is not None:
                        gap = max(0, int(round((buf.t_ns - last_t) * 1e-9 * lines_rate)) - buf.lines)
                    if self.area:
                        gap = (gap // cam.height) * cam.height
                    offset += expected - idx + gap // unit
                    idx = buf.index + offset
                with st.lock:
                    st.lines_in += gap
                st.drop("reconnect_gap" if reconnected else "camera_drop", gap)
            reconnected = False
            expected = idx + step
            last_t = buf.t_ns
            with st.lock:
                st.lines_in += buf.lines
                st.buffers_in += 1
                st.frames_in += 1 if self.area else 0
            if buf.status != "ok" or buf.data is None:
                with st.lock:
                    st.corrupt_buffers += 1
                st.drop("corrupt", buf.lines)
                continue
            if idx != buf.index:
                buf = Buffer(buf.data, idx, buf.lines, buf.t_ns, buf.status, buf.info)
            if not self._put(self.q_cap, buf, evict):
                st.drop("shutdown", buf.lines)
                break
        src.close()

    def _reopen(self) -> bool:
        cfg, st = self.cfg, self.stats
        delay = cfg.reconnect_backoff_s
        for attempt in range(cfg.reconnect_max_tries):
            self.source.close()
            if self.stop_capture.wait(delay):
                return False
            try:
                self.source.open()
                with st.lock:
                    st.reconnects += 1
                return True
            except Exception as e:  # still gone: back off
                log.warning("reopen %d of %s failed: %s", attempt + 1, self.source.uri, e)
                delay = min(delay * 2, cfg.reconnect_backoff_max_s)
        log.error("%s: giving up after %d reopen attempts", self.source.uri, cfg.reconnect_max_tries)
        return False

    # ------------------------------------------------------------------------------------
    # stage 2: tiling
    # ------------------------------------------------------------------------------------
    def _preprocess(self) -> None:
        asm = self.assembler
        while not self.hard_stop.is_set():
            buf = self._get(self.q_cap)
            if buf is None:
                if self.capture_done.is_set() and self.q_cap.empty():
                    break
                continue
            data = buf.data if buf.data.ndim == 3 else buf.data[:, :, None]
            if self.area:
                bands = asm.push_frame(data, buf.index, buf.t_ns)
            else:
                bands = asm.push(data, buf.index, buf.t_ns)
            if not self._submit_all(bands):
                return
        if not self.hard_stop.is_set():
            self._submit_all(asm.flush())

    def _submit_all(self, bands) -> bool:
        for i, b in enumerate(bands):
            if not self._submit(b):
                for rest in bands[i + 1:]:
                    self.stats.drop("shutdown", rest.owned)
                return False
        return True

    def _submit(self, band: Band) -> bool:
        if band.rows == 0 or band.n_tiles == 0:     # end-of-segment marker: no inference
            return self._put(self.q_post, ("marker", band, None))

        def evict(old: Band):
            if not self._put(self.q_post, ("dropped", old, "overload")):
                self.stats.drop("overload", old.owned)

        ok = self._put(self.q_inf, band, evict)
        if not ok:
            self.stats.drop("shutdown", band.owned)
        return ok

    # ------------------------------------------------------------------------------------
    # stage 3: batched inference
    # ------------------------------------------------------------------------------------
    def _inference(self) -> None:
        cfg, st, eng = self.cfg, self.stats, self.engine
        batcher = BandBatcher(self.max_batch)
        wait_s = cfg.max_wait_ms / 1000.0
        while not self.hard_stop.is_set():
            if batcher.pending_tiles == 0:
                if not self._take_band(batcher, _POLL):
                    if self.pre_done.is_set() and self.q_inf.empty():
                        break
                    continue
            deadline = time.monotonic() + wait_s
            while batcher.pending_tiles < self.max_batch and not self.hard_stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self._take_band(batcher, min(left, _POLL)) and self.pre_done.is_set() \
                        and self.q_inf.empty():
                    break
            frames, parts = batcher.next_batch()
            t0 = time.perf_counter()
            out, err = None, None
            try:
                raw = eng.infer(frames)
                out = (self._tile_maps(raw, frames.shape[0]),
                       np.asarray(raw["normalized_score"], np.float32).reshape(-1),
                       np.asarray(raw["score"], np.float32).reshape(-1))
            except Exception as e:   # one failed call (or malformed output): count it, the stream goes on
                err = f"{type(e).__name__}: {e}"
                log.warning("engine error on %d tiles: %s", frames.shape[0], e)
            with st.lock:
                st.engine_calls += 1
                st.engine_time_s += time.perf_counter() - t0
                st.engine_errors += err is not None
            for band, rec in batcher.scatter(parts, out, err):
                item = ("dropped", band, "engine_error") if rec["err"] is not None else ("scored", band, rec)
                if not self._put(self.q_post, item):
                    return
                self._inflight_bands.pop(band.seq, None)

    def _take_band(self, batcher: "BandBatcher", timeout: float) -> bool:
        band = self._get(self.q_inf, timeout=timeout)
        if band is None:
            return False
        self._inflight_bands[band.seq] = band
        batcher.add(band)
        return True

    def _tile_maps(self, out: dict, n: int) -> np.ndarray:
        th, tw = self.tile_hw
        m = out.get("anomaly_map_full")
        if m is None or tuple(m.shape[-2:]) != (th, tw):
            m = out["anomaly_map"]
        m = np.asarray(m, np.float32).reshape(n, m.shape[-2], m.shape[-1])
        if m.shape[1:] != (th, tw):
            m = np.stack([cv2.resize(x, (tw, th), interpolation=cv2.INTER_LINEAR) for x in m])
        return m

    # ------------------------------------------------------------------------------------
    # stage 4: stitching, events, accounting, sinks
    # ------------------------------------------------------------------------------------
    def _postprocess(self) -> None:
        next_seq = 0
        while not self.hard_stop.is_set():
            item = self._get(self.q_post)
            if item is None:
                if self.infer_done.is_set() and self.q_post.empty():
                    break
                continue
            self._reorder[item[1].seq] = item
            while next_seq in self._reorder:
                self._handle(self._reorder.pop(next_seq))
                next_seq += 1
        if not self.hard_stop.is_set():
            for ev in self.stitcher.end_segment():
                self._emit_event(ev)

    def _handle(self, item) -> None:
        kind, band, payload = item
        st = self.stats
        now = time.monotonic_ns()
        if kind == "scored":
            rec = payload
            with st.lock:
                st.lines_scored += band.owned
                st.tiles_scored += band.n_tiles
                st.bands_scored += 1
                st.tiles_anomalous += int((rec["norm"] >= 0.5).sum())
            st.latency.add((now - band.t_ns) / 1e6)
            st.age.add((now - band.t_first_ns) / 1e6)
            self._write_preview(band)
            events = self.stitcher.add_band(band, rec["maps"])
        else:
            if kind == "dropped":
                st.drop(payload, band.owned)
            if band.tiles is not None:
                self._write_preview(band)
            events = self.stitcher.add_band(band, None)
        if self.on_band is not None:   # every band, in the order the stitcher saw it
            self.on_band(band, payload if kind == "scored" else None)
        for ev in events:
            self._emit_event(ev)
        if self.sinks is not None and kind == "scored":
            self.sinks.offer_preview(self)

    def _write_preview(self, band: Band) -> None:
        if band.rows:
            self.preview.write(band.y0, band.strip_rows(self.assembler.width))

    def _emit_event(self, ev) -> None:
        with self.stats.lock:
            self.stats.events += 1
        d = ev.to_dict()
        self.events.append(d)
        if self.sinks is not None:
            self.sinks.offer_event(self, ev)

    # ------------------------------------------------------------------------------------
    # control
    # ------------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stop_capture.set()

    def running(self) -> bool:
        return not self.post_done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.post_done.wait(timeout)

    def finish(self) -> dict:
        """Stop capture, drain (hard stop after drain_timeout_s), join, return the summary."""
        self.stop_capture.set()
        if not self.post_done.wait(self.cfg.drain_timeout_s):
            log.warning("drain took longer than %.1f s: hard stop", self.cfg.drain_timeout_s)
            self.hard_stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        if self.hard_stop.is_set():
            self._account_leftovers()
        self.stats.t_end = time.monotonic()
        return self.summary()

    def _account_leftovers(self) -> None:
        """After a hard stop: whatever is still queued or half-done is dropped ('shutdown')."""
        st = self.stats
        for q in (self.q_cap,):
            while True:
                try:
                    st.drop("shutdown", q.get_nowait().lines)
                except queue.Empty:
                    break
        seen = set()
        while True:
            try:
                b = self.q_inf.get_nowait()
            except queue.Empty:
                break
            seen.add(b.seq)
            st.drop("shutdown", b.owned)
        while True:
            try:
                kind, b, payload = self.q_post.get_nowait()
            except queue.Empty:
                break
            self._reorder[b.seq] = (kind, b, payload)
        for seq, b in list(self._inflight_bands.items()):
            if seq not in self._reorder and seq not in seen:
                st.drop("shutdown", b.owned)
        for kind, b, payload in self._reorder.values():
            st.drop(payload if kind == "dropped" else "shutdown", b.owned)
        self._reorder.clear()
        st.drop("shutdown", self.assembler.unowned_lines)

    def snapshot(self) -> dict:
        """Live figures (the console line and /metrics use this)."""
        st = self.stats
        now = time.monotonic()
        with st.lock:
            d = {
                "elapsed_s": (st.t_end or now) - st.t_start,
                "lines_in": st.lines_in, "lines_scored": st.lines_scored,
                "lines_dropped": sum(st.dropped.values()), "dropped": dict(st.dropped),
                "buffers_in": st.buffers_in, "frames_in": st.frames_in,
                "tiles_scored": st.tiles_scored, "tiles_anomalous": st.tiles_anomalous,
                "events": st.events, "engine_errors": st.engine_errors, "engine_calls": st.engine_calls,
                "engine_time_s": st.engine_time_s, "reconnects": st.reconnects,
                "corrupt_buffers": st.corrupt_buffers,
            }
        d["queues"] = {"capture": self.q_cap.qsize(), "inference": self.q_inf.qsize(), "post": self.q_post.qsize()}
        el = max(d["elapsed_s"], 1e-9)
        d["lines_per_s"] = d["lines_scored"] / el
        d["tiles_per_s"] = d["tiles_scored"] / el
        d["latency_ms"] = Latencies.pct(list(st.latency.recent))
        return d

    def summary(self) -> dict:
        d = self.snapshot()
        st = self.stats
        d["latency_ms"] = Latencies.pct(st.latency.samples)
        d["latency_ms"]["mean"] = float(np.mean(st.latency.samples)) if st.latency.samples else None
        d["oldest_line_age_ms"] = Latencies.pct(st.age.samples)
        d["accounting_ok"] = d["lines_in"] == d["lines_scored"] + d["lines_dropped"]
        d["engine"] = self.engine.describe()
        d["source"] = {"uri": self.source.uri, **asdict(self.source.meta)}
        d["tile"] = list(self.tile_hw)
        d["scale_warning"] = self.scale_warning
        d["stride"] = list(self.stride_hw)
        d["pixel_threshold"] = self.pixel_threshold
        d["config"] = {k: v for k, v in asdict(self.cfg).items()}
        d["error"] = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        d["hard_stopped"] = self.hard_stop.is_set()
        return d
