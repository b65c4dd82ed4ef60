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
                 gaps in the camera's line/frame counter - before the first buffer (from the
                 source's `first_index`), between buffers, and after the last one (its
                 `end_index()` at close) when the source knows its counter
  camera_drop    gap in the counter while connected (the camera / driver lost buffers)
  reconnect_gap  gap across a disconnect + reopen
  corrupt        buffers delivered incomplete (or files that do not decode)
  overload       drop-oldest evicted them from a full queue (capture or inference queue)
  late           a live source's lines whose verdict could not come within the latency budget
                 (dropped before inference when predicted late, or when the verdict came late)
  engine_error   the inference call for their tiles raised
  paused         arrived while scoring was paused (`pause()`; the camera keeps running)
  shutdown       still in flight at a stop (queued, or produced by the camera but not yet read)
  scored         owned by a band whose tiles were all inferred in time (see runtime.tiling.Band)

A source that is not live (a recording read as fast as it is taken) is never dropped from: the
capture waits for room whatever --overload says, and no latency budget applies.

Run-time controls (`set_thresholds`, `pause`, `resume`; runtime/control.py) may be called from any
thread: they are applied by the stage threads (thresholds from the next band on, pause between
buffers) and recorded with their time in the summary's `controls` and the sinks' control records.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from deploy import Engine, EngineError

from .accounting import Latencies, Stats
from .batching import BandBatcher
from .control import Controls
from .config import StreamConfig, capture_slots, check_compatible, check_memory, scale_mismatch
from .sources import Buffer, Source, SourceDisconnected, SourceError
from .tiling import Band, LineAssembler, RollingRows, StripStitcher

log = logging.getLogger("runtime.pipeline")

_POLL = 0.05   # seconds: every blocking queue call uses this timeout
_JOIN_S = 1.5  # after the drain (or hard stop), how long finish() waits for the stage threads

__all__ = ["Pipeline", "StreamConfig", "check_compatible", "scale_mismatch"]


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
        self.events: collections.deque = collections.deque(maxlen=1000)   # most recent events
        self.last_verdict: Optional[dict] = None        # the newest scored band's verdict
        self._band_times: collections.deque = collections.deque(maxlen=512)   # (own0, own1, t_first, t_new)
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._threads: List[threading.Thread] = []

    # ------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------
    def setup(self) -> "Pipeline":
        """Open the source and check everything that can be checked before a thread starts:
        engine / camera compatibility, strides, thresholds, the memory the buffers need.
        SourceError / EngineError / ValueError with one message; idempotent."""
        if getattr(self, "_ready", False):
            return self
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
        ring = max(2 * th, th + cam.height)
        self.memory_bytes = check_memory(cfg, cam, (th, tw), sw, ring, self.max_batch,
                                         f"stream of {self.source.uri}")
        self.live = bool(self.source.live)
        budget = cfg.latency_budget_ms if self.live else None
        self.budget_ns = None if budget is None else int(budget * 1e6)
        self._resolve_thresholds()
        self.control = Controls(self.pixel_threshold, self.image_threshold, time.monotonic())
        self.assembler = LineAssembler(cam.width, cam.channels, th, tw, sh, sw, capacity=ring)
        self.map_low = float(eng.score_stats.get("map_low", 0.0))
        self.stitcher = StripStitcher(cam.width, th, tw, self.pixel_threshold, cfg.min_area,
                                      cfg.line_pitch_mm, cfg.pixel_pitch_mm, keep_rows=cfg.preview_rows)
        self.preview = RollingRows(cfg.preview_rows, cam.width, cam.channels)
        self.q_cap: queue.Queue = queue.Queue(capture_slots(cfg, cam))
        self.q_inf: queue.Queue = queue.Queue(cfg.infer_queue)
        self.q_post: queue.Queue = queue.Queue(cfg.post_queue)
        self._inflight_bands: Dict[int, Band] = {}     # taken by the inference thread, not yet posted
        self._reorder: Dict[int, tuple] = {}
        self._call_s = 0.0                              # running mean of one engine call (late prediction)
        self._last_call_ns = 0                          # when the last engine call ended
        self._ready = True
        return self

    def _resolve_thresholds(self) -> None:
        """Pixel / image thresholds: the option, else the artifact's runtime section, else the
        export's score_stats (docs/design.md section 5); `threshold_source` says which."""
        cfg, rt = self.cfg, self.engine.runtime_config
        if cfg.pixel_threshold is not None:
            self.pixel_threshold, src = float(cfg.pixel_threshold), "option"
        elif "pixel_threshold" in rt:
            self.pixel_threshold, src = float(rt["pixel_threshold"]), "runtime section"
        else:
            self.pixel_threshold, src = float(self.engine.map_threshold), "score_stats"
        if cfg.image_threshold is not None:
            self.image_threshold = float(cfg.image_threshold)
        else:
            self.image_threshold = rt.get("image_threshold")
        self.threshold_source = src

    # ------------------------------------------------------------------------------------
    # run-time controls (any thread; applied by the stages, runtime/control.py)
    # ------------------------------------------------------------------------------------
    def set_thresholds(self, pixel_threshold=None, image_threshold=None, by: str = "api",
                       clear_image_threshold: bool = False) -> dict:
        """New pixel / image thresholds (raw scale) from the next band on; see Controls."""
        self.setup()
        return self.control.set_thresholds(pixel_threshold, image_threshold, by, clear_image_threshold)

    def pause(self, by: str = "api") -> None:
        """Stop scoring, keep capturing: lines that arrive are counted `paused`."""
        self.setup()
        self.control.pause(by)

    def resume(self, by: str = "api") -> None:
        self.setup()
        self.control.resume(by)

    def record_control(self, kind: str, from_line, by: str = "api", **fields) -> None:
        """Record an operator action (and offer it to the sinks); the stages call it for what they
        applied, the page for a saved runtime config."""
        rec = self.control.record(kind, from_line, by, **fields)
        if self.sinks is not None:
            self.sinks.offer_control(rec)

    def wall_time(self, t_ns: int) -> float:
        """A monotonic_ns capture time as Unix seconds."""
        return (t_ns + self._wall_offset_ns) / 1e9

    def start(self) -> "Pipeline":
        self.setup()
        self.stats.t_start = self.control.t_start = time.monotonic()
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
    def _put(self, q: queue.Queue, item, evict: Optional[Callable] = None,
             give_up: Optional[threading.Event] = None) -> bool:
        """Put with the overload policy; `evict(item)` accounts an evicted oldest item.
        drop-oldest never waits: a full queue loses its oldest item at once. block waits (in
        _POLL steps, so stop events are seen). Returns False when hard-stopped (or `give_up` is
        set) first."""
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
                elif give_up is not None and give_up.is_set():
                    return False
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
        expected = src.first_index  # the camera counter's start, when known: earlier loss counts
        offset = 0                 # added to indices when a camera counter restarted
        last_t = None
        reconnected = False

        def evict(old: Buffer):
            st.drop("overload", old.lines)

        # a recording that is not live waits for room: nothing is lost by reading it later
        policy = evict if self.live else None
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
            if not self._put(self.q_cap, buf, policy, give_up=self.stop_capture):
                st.drop("shutdown", buf.lines)
                break
        src.close()
        self._count_tail(expected, offset, unit)

    def _count_tail(self, expected: Optional[int], offset: int, unit: int) -> None:
        """Lines the camera produced after the last buffer read (its counter at close)."""
        end = self.source.end_index()
        if end is None or expected is None or end + offset <= expected:
            return
        gap = (end + offset - expected) * unit
        with self.stats.lock:
            self.stats.lines_in += gap
        self.stats.drop("shutdown" if self.stop_capture.is_set() else "camera_drop", gap)

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
        next_line = None        # one past the last line this stage saw
        while not self.hard_stop.is_set():
            change = self.control.pause_change()
            if change is not None:
                if change == "pause" and not self._submit_all(asm.flush()):   # what is held is scored
                    return
                self.record_control(change, next_line)
            buf = self._get(self.q_cap)
            if buf is None:
                if self.capture_done.is_set() and self.q_cap.empty():
                    break
                continue
            now = time.monotonic_ns()
            self.stats.hist.wait("capture", (now - buf.t_ns) / 1e9)
            next_line = (buf.index + 1) * buf.lines if self.area else buf.index + buf.lines
            if self.control.paused:
                self.stats.drop("paused", buf.lines)
                continue
            if self.budget_ns is not None and now - buf.t_ns > self.budget_ns:
                self.stats.drop("late", buf.lines)      # waited too long already: no verdict in time
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

        band.t_queued_ns = time.monotonic_ns()
        ok = self._put(self.q_inf, band, evict if self.live else None)
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
                if batcher.pending_tiles == 0:     # that band was late
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
            dt = time.perf_counter() - t0
            st.hist.engine_call.observe(dt)
            if st.engine_calls:       # the first call pays the engine's lazy set-up: not a prediction
                self._call_s = dt if not self._call_s else 0.8 * self._call_s + 0.2 * dt
            self._last_call_ns = time.monotonic_ns()
            with st.lock:
                st.engine_calls += 1
                st.engine_time_s += dt
                st.engine_errors += err is not None
            for band, rec in batcher.scatter(parts, out, err):
                band.t_queued_ns = time.monotonic_ns()
                item = ("dropped", band, "engine_error") if rec["err"] is not None else ("scored", band, rec)
                if not self._put(self.q_post, item):
                    return
                self._inflight_bands.pop(band.seq, None)

    def _take_band(self, batcher: "BandBatcher", timeout: float) -> bool:
        """Take a band for the batch (True), or drop it as late when its verdict cannot come
        within the budget (True: something was taken); False when the queue stayed empty."""
        band = self._get(self.q_inf, timeout=timeout)
        if band is None:
            return False
        self.stats.hist.wait("inference", (time.monotonic_ns() - band.t_queued_ns) / 1e9)
        if self._predicted_late(band, batcher.pending_tiles):
            if not self._put(self.q_post, ("dropped", band, "late")):
                self.stats.drop("late", band.owned)
            return True
        self._inflight_bands[band.seq] = band
        batcher.add(band)
        return True

    def _predicted_late(self, band: Band, tiles_ahead: int) -> bool:
        if self.budget_ns is None:
            return False
        if tiles_ahead == 0 and time.monotonic_ns() - self._last_call_ns > self.budget_ns:
            return False   # no call for a whole budget: the prediction is stale, measure again
        calls = -(-(tiles_ahead + band.n_tiles) // self.max_batch)
        return time.monotonic_ns() + int(calls * self._call_s * 1e9) - band.t_ns > self.budget_ns

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
        if kind != "marker":
            st.hist.wait("post", (now - band.t_queued_ns) / 1e9)
        req = self.control.take_thresholds()
        if req is not None:     # from this band on: rows not yet final, this band's tiles
            self.pixel_threshold = self.stitcher.threshold = req["pixel_threshold"]
            self.image_threshold = req["image_threshold"]
            self.record_control("thresholds", self.stitcher.first_open_line, req["by"],
                                 pixel_threshold=req["pixel_threshold"], image_threshold=req["image_threshold"],
                                 requested=req["requested"])
        if band.owned:
            self._band_times.append((band.own0, band.own1, band.t_first_ns, band.t_ns))
        if kind == "scored" and self.budget_ns is not None and now - band.t_ns > self.budget_ns:
            kind, payload = "dropped", "late"       # the verdict came too late for its lines
            with st.lock:
                st.late_after_inference += band.owned
        if kind == "scored":
            rec = payload
            bad = int((rec["norm"] >= 0.5).sum() if self.image_threshold is None
                      else (rec["score"] >= self.image_threshold).sum())
            with st.lock:
                st.lines_scored += band.owned
                st.tiles_scored += band.n_tiles
                st.bands_scored += 1
                st.tiles_anomalous += bad
            self.last_verdict = {"line": band.own1 - 1, "anomalous": bad > 0, "tiles_anomalous": bad,
                                 "max_score": float(rec["score"].max()), "time": self.wall_time(now)}
            st.latency.add((now - band.t_ns) / 1e6)
            st.hist.line_to_verdict.observe((now - band.t_ns) / 1e9)
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
            seq = self.stats.events
        d = ev.to_dict()
        d["seq"] = seq                 # 1, 2, ... per stream: gaps downstream are countable
        t_cap = self._capture_time(ev.line_end)
        d["t_capture"] = None if t_cap is None else round(self.wall_time(t_cap), 6)
        d["t_verdict"] = round(time.time(), 6)
        self.events.append(d)
        if self.sinks is not None:
            self.sinks.offer_event(self, ev, d)

    def _capture_time(self, line: int) -> Optional[int]:
        """Capture time (monotonic ns) of a strip line of a recent band, interpolated between its
        band's oldest and newest owned lines; None when no recent band owns it."""
        for own0, own1, t0, t1 in reversed(self._band_times):
            if own0 <= line < own1:
                return t0 if own1 - own0 <= 1 else int(t0 + (t1 - t0) * (line - own0) / (own1 - own0 - 1))
            if own1 <= line:
                break
        return None

    # ------------------------------------------------------------------------------------
    # control
    # ------------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stop_capture.set()
        self.source.interrupt()

    def running(self) -> bool:
        return not self.post_done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self.post_done.wait(timeout)

    def finish(self) -> dict:
        """Stop capture, drain (hard stop after drain_timeout_s), join, return the summary.
        Bounded: drain_timeout_s + _JOIN_S at most, even with an engine call or a camera read in
        flight (a stage still running then is named in the summary; what it held is `shutdown`)."""
        self.stop()
        if not self.post_done.wait(self.cfg.drain_timeout_s):
            log.warning("drain took longer than %.1f s: hard stop", self.cfg.drain_timeout_s)
            self.hard_stop.set()
        deadline = time.monotonic() + _JOIN_S
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stages_running = [t.name for t in self._threads if t.is_alive()]
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
        d.update(self.control.snapshot())
        d["last_verdict"] = self.last_verdict
        el = max(d["elapsed_s"], 1e-9)
        d["lines_per_s"] = d["lines_scored"] / el
        d["tiles_per_s"] = d["tiles_scored"] / el
        d["latency_ms"] = Latencies.pct(list(st.latency.recent))
        return d

    def summary(self) -> dict:
        d = self.snapshot()
        st = self.stats
        d["latency_ms"] = Latencies.pct(st.latency.samples)
        d["latency_ms"]["mean"] = float(np.mean(st.latency.samples)) if len(st.latency.samples) else None
        d["oldest_line_age_ms"] = Latencies.pct(st.age.samples)
        # the source's own count of what the camera produced, when it keeps one (linesim)
        produced = self.source.end_index()
        first = self.source.first_index
        d["source_lines_produced"] = None if produced is None or first is None or self.area else produced - first
        d["accounting_ok"] = (d["lines_in"] == d["lines_scored"] + d["lines_dropped"]
                              and d["source_lines_produced"] in (None, d["lines_in"]))
        d["late_after_inference_lines"] = st.late_after_inference
        d["latency_budget_ms"] = None if self.budget_ns is None else self.budget_ns / 1e6
        d["source_live"] = self.live
        d["engine"] = self.engine.describe()
        d["source"] = {"uri": self.source.uri, **asdict(self.source.meta)}
        d["tile"] = list(self.tile_hw)
        d["stride"] = list(self.stride_hw)
        d["threshold_source"] = self.threshold_source
        with self.control.lock:
            d["controls"] = list(self.control.records)
        first = next((c for c in d["controls"] if c["control"] == "thresholds"), None)
        d["thresholds_at_start"] = ({"pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold}
                                    if first is None else first["previous"])
        d["scale_warning"] = self.scale_warning
        d["config"] = {k: v for k, v in asdict(self.cfg).items()}
        d["error"] = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        d["hard_stopped"] = self.hard_stop.is_set()
        d["stages_still_running"] = getattr(self, "stages_running", [])
        return d
