"""Sources: the line simulator against its own ground truth, OpenCV folders/videos against the
files, and the real camera stacks (Aravis fake GigE camera on 127.0.0.1, pylon emulation, the
GenTL simulator) - each skipped cleanly when its package is not installed."""
import time

import cv2
import numpy as np
import pytest

from runtime.sources import SourceError, genicam_simulator_cti, open_source


def _collect(src, n=None):
    out = []
    with src:
        for b in src:
            out.append(b)
            if n is not None and len(out) >= n:
                break
    return out


def test_linesim_strip_is_independent_of_buffering_and_defects_are_exact():
    uri = "linesim://?width=97&rate=0&kind=texture&seed=5&page=61&defects=40:10:4;75:96:3:255"
    a = np.concatenate([b.data for b in _collect(open_source(uri + "&lines=7&total=130"))])
    b = np.concatenate([b.data for b in _collect(open_source(uri + "&lines=64&total=130"))])
    assert a.shape == (130, 97) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    src = open_source(uri)
    clean = open_source(uri.split("&defects")[0])
    mask = src.defect_mask(0, 130)
    # a defect pixel is painted with the defect's value; elsewhere the strip is untouched
    ref = clean.strip_lines(0, 130)
    assert mask.sum() > 0
    np.testing.assert_array_equal(a[~mask], ref[~mask])
    yy, xx = np.nonzero(mask)
    for y, x in zip(yy, xx):
        d = [d for d in src.defects if (y - d.line) ** 2 + (x - d.col) ** 2 <= d.radius ** 2][0]
        assert a[y, x] == d.value
    # independent disc count: a radius-4 disc has 49 pixels, the radius-3 one clipped at the edge
    assert mask[30:50].sum() == sum((i * i + j * j) <= 16 for i in range(-4, 5) for j in range(-4, 5))


def test_linesim_drops_and_corrupt_buffers_are_accounted():
    src = open_source("linesim://?width=32&rate=0&lines=10&total=1000&drop=0.2&corrupt=0.1&seed=2")
    bufs = _collect(src)
    idx = [b.index for b in bufs]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    got = sum(b.lines for b in bufs)
    missing = 1000 - got
    assert missing == src.lines_lost > 0
    assert sum(b.lines for b in bufs if b.status == "corrupt") == src.lines_corrupt > 0
    assert all(b.data is None for b in bufs if b.status == "corrupt")


def test_linesim_paces_lines_at_the_rate():
    src = open_source("linesim://?width=16&rate=4000&lines=100&total=1000")
    with src:
        t0 = time.monotonic()
        n = sum(b.lines for b in src)
        dt = time.monotonic() - t0
    assert n + src.lines_lost == 1000
    assert dt >= 0.2   # 1000 lines at 4 kHz cannot arrive faster than 0.25 s (minus the first buffer)


@pytest.mark.parametrize("uri,needle", [
    ("ftp://host/x", "unknown source scheme"),
    ("linesim://?width=abc", "width='abc'"),
    ("linesim://?widht=10", "unknown parameter"),
    ("linesim://?defects=1:2", "LINE:COL:RADIUS"),
    ("linesim://?images=/nonexistent/dir", "is not a folder"),
    ("linesim://?format=BGR8", "format='BGR8'"),
    ("/nonexistent/video.mp4", "no such file or folder"),
    ("aravis://camera.local", "explicit address"),
])
def test_bad_uri_is_one_clear_error(uri, needle):
    with pytest.raises(SourceError, match=None) as e:
        open_source(uri)
    assert needle in str(e.value)


def test_image_folder_frames_equal_the_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (21, 33, 3), dtype=np.uint8) for _ in range(3)]
    for i, im in enumerate(imgs):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    bufs = _collect(open_source(str(tmp_path)))
    assert [b.index for b in bufs] == [0, 1, 2]
    for b, im in zip(bufs, imgs):
        np.testing.assert_array_equal(b.data, im)
    gray = _collect(open_source(f"{tmp_path}?format=Mono8"))
    np.testing.assert_array_equal(gray[1].data, cv2.cvtColor(imgs[1], cv2.COLOR_RGB2GRAY))


def _clip(path, fps, n, step):
    """An MJPG clip of n flat frames (value step * i); skips where OpenCV cannot write one."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (48, 32))
    if not w.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(n):
        w.write(np.full((32, 48, 3), step * i, np.uint8))
    w.release()
    return path


def test_video_file_frames(tmp_path):
    path = _clip(tmp_path / "clip.avi", 10, 5, 40)
    bufs = _collect(open_source(f"{path}?rate=0"))
    assert len(bufs) == 5
    means = [float(b.data.mean()) for b in bufs]
    assert all(abs(m - 40 * i) < 4 for i, m in enumerate(means))


def test_video_file_plays_at_its_frame_rate(tmp_path):
    """Issue 16: a recording replayed unpaced was mostly dropped under drop-oldest; it now plays at
    its own frame rate (live, like the camera that recorded it), or as fast as taken with rate=0
    (not live: the stream waits for it)."""
    path = _clip(tmp_path / "clip.avi", 20, 8, 30)
    src = open_source(str(path))
    with src:
        t0 = time.monotonic()
        n = sum(1 for _ in src)
        dt = time.monotonic() - t0
    assert n == 8 and src.live and dt >= 7 / 20 * 0.9        # 8 frames at 20 fps: >= 0.35 s
    fast = open_source(f"{path}?rate=0")
    with fast:
        assert sum(1 for _ in fast) == 8 and not fast.live


# ------------------------------------------------------------------------------------------
# camera stacks
# ------------------------------------------------------------------------------------------
def _aravis():
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
        return Aravis
    except (ImportError, ValueError) as e:
        pytest.skip(f"Aravis 0.8 / PyGObject not installed ({e})")


@pytest.fixture
def fake_gige():
    """Aravis' fake GigE Vision camera, in-process, on 127.0.0.1 only."""
    Aravis = _aravis()
    cam = Aravis.GvFakeCamera.new("127.0.0.1", "EDGEAD01")
    if cam is None or not cam.is_running():
        pytest.skip("Aravis fake camera could not listen on 127.0.0.1")
    yield cam
    del cam


@pytest.mark.stack("aravis")
def test_aravis_fake_camera_line_mode(fake_gige):
    src = open_source("aravis://127.0.0.1?width=320&height=16&format=Mono8&rate=16000")
    bufs = _collect(src, 6)
    assert src.meta.kind == "line" and (src.meta.width, src.meta.height) == (320, 16)
    for b in bufs:
        assert b.status == "ok" and b.data.shape == (16, 320) and b.data.dtype == np.uint8
    idx = [b.index for b in bufs]
    assert all(i % 16 == 0 for i in idx) and all(b > a for a, b in zip(idx, idx[1:]))


@pytest.mark.stack("aravis")
def test_aravis_buffers_left_in_the_driver_at_close_count_as_produced(fake_gige):
    """Issue 16: lines after the last buffer read were never counted. The driver's queued buffers
    (16 here; the camera fills them while the reader sleeps) are the camera's own count of how
    far it got: end_index() after close."""
    src = open_source("aravis://127.0.0.1?width=64&height=32&rate=3200&buffers=16")
    with src:
        first = src.read()
        assert src.end_index() is None            # unknown while acquiring
        time.sleep(0.6)                           # 100 frames/s: the 16 driver buffers fill up
    assert first.index == 0 and src.end_index() == (1 + 16) * 32


def _pylon():
    try:
        import pypylon  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pypylon not installed ({e})")


@pytest.mark.stack("pylon")
def test_pylon_emulation_replays_images_and_reports_failed_buffers(tmp_path):
    _pylon()
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (48, 96), dtype=np.uint8) for _ in range(3)]
    for i, im in enumerate(imgs):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), im)
    src = open_source(f"pylon://emu?width=96&height=48&images={tmp_path}&fail=2")
    bufs = _collect(src, 7)
    assert [b.status for b in bufs[:2]] == ["corrupt", "corrupt"]
    ok = bufs[2:]
    assert all(b.status == "ok" for b in ok)
    # replay cycles through the files in order (the failed buffers used up images 0 and 1)
    for k, b in enumerate(ok):
        np.testing.assert_array_equal(b.data, imgs[(k + 2) % 3])


@pytest.mark.stack("genicam")
def test_genicam_simulator_frames():
    pytest.importorskip("harvesters", reason="harvesters not installed")
    cti = genicam_simulator_cti()
    if cti is None:
        pytest.skip("genicam wheel with the viky.cti simulator not installed")
    src = open_source(f"genicam://{cti}?width=128&height=100&format=Mono8")
    bufs = _collect(src, 3)
    assert src.meta.kind == "area" and (src.meta.width, src.meta.height) == (128, 100)
    assert [b.index for b in bufs] == [0, 1, 2]
    assert all(b.data.shape == (100, 128) and b.status == "ok" for b in bufs)


@pytest.mark.stack("genicam")
def test_genicam_missing_producer_is_clear():
    pytest.importorskip("harvesters", reason="harvesters not installed")
    with pytest.raises(SourceError, match="not found"):
        open_source("genicam:///nonexistent/producer.cti")


def test_linesim_stall_delays_then_loses_what_its_buffer_queue_cannot_hold():
    # 2 kHz, 20-line buffers: a 20 ms stall fits a 16-buffer queue (160 ms), a 400 ms one overflows a
    # 4-buffer queue (40 ms)
    short = open_source("linesim://?width=16&rate=2000&lines=20&queue=16&total=600&stall=200:0.02")
    assert sum(b.lines for b in _collect(short)) == 600 and short.lines_lost == 0
    long = open_source("linesim://?width=16&rate=2000&lines=20&queue=4&total=1600&stall=200:0.4")
    got = sum(b.lines for b in _collect(long))
    assert got + long.lines_lost == 1600
    # about 0.4 s x 2000 lines/s - 4 buffers x 20 lines = 720 lines lost (timing slack under load)
    assert 400 <= long.lines_lost <= 1400


def test_linesim_replays_every_image_of_a_long_folder_once(tmp_path):
    """70 images of different sizes (more than the 64 pages linesim once kept): once=1 streams each
    of them exactly once, in sorted order, each resized to the camera width; nothing cycles."""
    rng = np.random.default_rng(4)
    sizes = [(int(rng.integers(9, 40)), int(rng.integers(20, 60))) for _ in range(70)]
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((h, w), 3 * i, np.uint8))
    src = open_source(f"linesim://?images={tmp_path}&width=48&rate=0&lines=16&once=1")
    strip = np.concatenate([b.data for b in _collect(src)])
    want_h = [max(1, int(round(h * 48 / w))) for h, w in sizes]
    assert strip.shape == (sum(want_h), 48)
    starts = src.page_starts()
    assert list(np.diff(starts)) == want_h
    for i in (0, 37, 69):                      # each image's rows hold its own grey level
        assert (strip[starts[i]:starts[i + 1]] == 3 * i).all()


def test_linesim_refuses_a_folder_it_cannot_hold(tmp_path):
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.zeros((400, 400), np.uint8))
    src = open_source(f"linesim://?images={tmp_path}&width=4000&rate=0&max_mb=20")
    with pytest.raises(SourceError, match=r"5 images; the first \d+ already take \d+ MB"):
        src.open()
    with pytest.raises(SourceError, match="once=1 replays an images= folder"):
        open_source("linesim://?width=64&once=1")
