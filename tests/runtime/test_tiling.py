"""Tiling, stitching and defect merging against brute-force references on random data."""
import numpy as np
import pytest
from scipy import ndimage

from runtime.tiling import LineAssembler, StripStitcher, stitch_reference, tile_starts


@pytest.mark.parametrize("length,tile,stride", [(1, 4, 4), (4, 4, 2), (5, 4, 4), (101, 16, 11), (97, 32, 32)])
def test_tile_starts_cover(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all()
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    if length >= tile:
        assert starts[-1] + tile == length


def test_tile_starts_rejects_gaps():
    with pytest.raises(ValueError, match="gaps"):
        tile_starts(100, 8, 9)


def _feed(asm, strip, first, rng, max_chunk=40):
    bands, pos = [], 0
    while pos < strip.shape[0]:
        n = int(rng.integers(1, max_chunk))
        bands += asm.push(strip[pos:pos + n], first + pos, 1000 + pos)
        pos += n
    return bands


@pytest.mark.parametrize("channels", [1, 3])
def test_assembler_tiles_are_strip_crops_and_own_every_line_once(channels):
    rng = np.random.default_rng(1)
    width, th, tw, sh, sw = 203, 24, 40, 17, 29
    segs = [(5, 211), (300, 13), (313 + 7, 48)]    # (first line, n lines): gaps between
    strips = {}
    bands = []
    asm = LineAssembler(width, channels, th, tw, sh, sw, capacity=50)
    for first, n in segs:
        strip = rng.integers(0, 256, (n, width, channels), dtype=np.uint8)
        strips[first] = strip
        bands += _feed(asm, strip, first, rng)
    bands += asm.flush()
    owned = []
    for b in bands:
        assert [b.seq for b in bands] == list(range(len(bands)))
        if b.rows == 0:
            continue
        first = max(f for f in strips if f <= b.y0)
        strip = strips[first]
        src = strip[b.y0 - first:b.y0 - first + b.rows]
        assert b.rows == min(th, strip.shape[0])
        for i, x0 in enumerate(b.x_starts):
            w = min(tw, width - x0)
            np.testing.assert_array_equal(b.tiles[i, :b.rows, :w], src[:, x0:x0 + w])
            if b.rows < th:   # padded band mirrors its rows: row rows+k == row rows-1-k
                for k in range(th - b.rows):
                    np.testing.assert_array_equal(b.tiles[i, b.rows + k, :w], src[(b.rows - 1 - k) % b.rows, x0:x0 + w])
        owned.extend(range(b.own0, b.own1))
        assert b.y0 <= b.own0 <= b.own1 <= b.y0 + b.rows
    expected = [line for f, n in segs for line in range(f, f + n)]
    assert sorted(owned) == expected, "every line owned by exactly one band"


def _reference_events(full, thr):
    lab, n = ndimage.label(full >= thr, structure=np.ones((3, 3)))
    out = set()
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        m = lab[sl] == i
        out.add((sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1, int(m.sum()),
                 round(float(full[sl][m].max()), 5)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stitched_events_match_bruteforce(seed):
    rng = np.random.default_rng(seed)
    width, th, tw = int(rng.integers(60, 130)), int(rng.integers(9, 20)), int(rng.integers(10, 30))
    sh, sw = int(rng.integers(3, th + 1)), int(rng.integers(4, tw + 1))
    first, n = int(rng.integers(0, 50)), int(rng.integers(70, 160))
    # a smooth field of blobs (some elongated along the strip, crossing many bands) + per-tile noise
    base = ndimage.gaussian_filter(rng.normal(size=(n, width)), (4, 2)).astype(np.float32)
    base[n // 3:n // 3 + 3 * th, width // 2] += 5.0    # a long thin defect across seams
    asm = LineAssembler(width, 1, th, tw, sh, sw)
    bands = _feed(asm, np.zeros((n, width), np.uint8), first, rng) + asm.flush()
    thr = float(np.quantile(base, 0.93))
    st = StripStitcher(width, th, tw, thr, max_open_rows=10 ** 6, keep_rows=37)
    placed, events, dropped = [], [], set()
    for b in bands:
        if b.rows == 0:
            events += st.add_band(b, None)
            continue
        maps = np.zeros((b.n_tiles, th, tw), np.float32)
        for i, x0 in enumerate(b.x_starts):
            w = min(tw, width - x0)
            maps[i, :b.rows, :w] = base[b.y0 - first:b.y0 - first + b.rows, x0:x0 + w]
            maps[i] -= rng.uniform(0, 0.02, size=maps[i].shape).astype(np.float32)   # tiles disagree a little
        if rng.random() < 0.15 and b.seq > 0:
            dropped.add(b.seq)
            events += st.add_band(b, None)
            continue
        placed += [(b.y0 - first, x0, maps[i, :b.rows]) for i, x0 in enumerate(b.x_starts)]
        events += st.add_band(b, maps)
    events += st.end_segment()
    full = stitch_reference(n, width, placed)
    ref = _reference_events(full, thr)
    got = {(e.line_start - first, e.line_end - first, e.col_start, e.col_end, e.area_px,
            round(e.peak_score, 5)) for e in events}
    assert len(got) == len(events), "an event was reported twice"
    assert got == ref
    assert len(ref) > 3
    # the rolling preview holds the last 37 final rows of the same stitched map
    np.testing.assert_array_equal(st.map_rows(first + n - 37, first + n), full[-37:])
    assert st.map_rows(first + n - 38, first + n) is None


def test_events_carry_millimetres_and_do_not_merge_across_segments():
    width, th = 40, 8
    asm = LineAssembler(width, 1, th, 8, 5, 8)
    st = StripStitcher(width, th, 8, 0.5, line_pitch_mm=0.1, pixel_pitch_mm=0.05)
    zeros = np.zeros((30, width), np.uint8)
    bands = asm.push(zeros, 0, 0) + asm.push(zeros, 31, 0) + asm.flush()   # gap at line 30
    events = []
    for b in bands:
        maps = np.zeros((b.n_tiles, th, 8), np.float32)
        for i, x0 in enumerate(b.x_starts):
            for r in range(b.rows):
                line = b.y0 + r
                if 25 <= line <= 36:       # a defect column that the gap cuts in two
                    maps[i, r, max(0, 12 - x0):max(0, 14 - x0)] = 1.0
        events += st.add_band(b, maps)
    events += st.end_segment()
    spans = sorted((e.line_start, e.line_end, e.segment) for e in events)
    assert spans == [(25, 29, 0), (31, 36, 1)]
    e = [e for e in events if e.segment == 0][0]
    assert e.length_mm == pytest.approx(0.5) and e.width_mm == pytest.approx(0.1)
    assert e.position_mm == pytest.approx(2.5)
