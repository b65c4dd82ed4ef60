"""Batches of tiles for the engine, cut from a queue of bands, and the outputs scattered back.

A band (one row of tiles across the strip, runtime.tiling.Band) may be split across engine calls
and one call may hold tiles of several bands: `next_batch()` takes up to `max_batch` tiles from
the front of the pending bands; `scatter()` files each call's outputs (or its error) under the
bands the tiles came from and returns the bands that are now complete, in order.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional, Tuple

import numpy as np

from .tiling import Band


class BandBatcher:
    def __init__(self, max_batch: int):
        self.max_batch = int(max_batch)
        self._pending: collections.deque = collections.deque()   # [band, next tile index]
        self._partial: Dict[int, dict] = {}                       # band seq -> outputs being filled

    def add(self, band: Band) -> None:
        self._pending.append([band, 0])

    @property
    def pending_tiles(self) -> int:
        return sum(b.n_tiles - i for b, i in self._pending)

    def next_batch(self) -> Tuple[np.ndarray, List[Tuple[Band, int, int]]]:
        """(frames (n, H, W, C), parts [(band, first tile, count)]) with n <= max_batch."""
        parts, left = [], self.max_batch
        for b, i in self._pending:
            if left == 0:
                break
            k = min(b.n_tiles - i, left)
            parts.append((b, i, k))
            left -= k
        if len(parts) == 1:
            b, i, k = parts[0]
            return b.tiles[i:i + k], parts
        return np.concatenate([b.tiles[i:i + k] for b, i, k in parts]), parts

    def scatter(self, parts, out: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]],
                err: Optional[str]) -> List[Tuple[Band, dict]]:
        """File one call's outputs (maps, normalized scores, scores; or `err`) under `parts` and
        return the bands now complete as (band, {"maps", "norm", "score", "err"})."""
        pos = 0
        for b, i, k in parts:
            rec = self._partial.setdefault(b.seq, {"maps": None, "norm": None, "score": None, "err": None})
            if out is None:
                rec["err"] = rec["err"] or err
            else:
                maps, norm, score = out
                if rec["maps"] is None:
                    rec["maps"] = np.empty((b.n_tiles,) + maps.shape[1:], np.float32)
                    rec["norm"] = np.empty(b.n_tiles, np.float32)
                    rec["score"] = np.empty(b.n_tiles, np.float32)
                rec["maps"][i:i + k] = maps[pos:pos + k]
                rec["norm"][i:i + k] = norm[pos:pos + k]
                rec["score"][i:i + k] = score[pos:pos + k]
            pos += k
        done = []
        for b, i, k in parts:
            entry = self._pending[0]
            assert entry[0] is b, "parts must come from the front of the pending bands, in order"
            entry[1] += k
            if entry[1] >= b.n_tiles:
                self._pending.popleft()
                done.append((b, self._partial.pop(b.seq)))
        return done
