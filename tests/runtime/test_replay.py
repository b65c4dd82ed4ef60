"""runtime.replay and runtime.calibrate: event scoring against hand-counted answers, replayed events
equal to what runtime.stream itself reports at the same threshold, and a calibrated threshold that
is the lowest one meeting its false-alarm target."""
import json

import cv2
import numpy as np
import pytest

from runtime.calibrate import calibrate, lowest_threshold
from runtime.replay import (GOOD, Image, Placed, Strip, lay_out, mvtec_test_images, record, score_events,
                            threshold_grid)
from runtime.stream import run_stream
from runtime.tiling import DefectEvent
from tests.strip_model import TILE


def _event(l0, l1, c0, c1, peak_line=None):
    return DefectEvent(l0, l1, c0, c1, (l1 - l0 + 1) * (c1 - c0 + 1), 1.0, peak_line if peak_line is not None else l0,
                       c0, 0)


def test_score_events_counts_by_hand(tmp_path):
    """Three images of 10 lines on a 20 px strip: good, scratch (two regions), hole (one region)."""
    m1 = np.zeros((10, 20), bool)
    m1[1:3, 2:5] = True           # region A, lines 11-12 on the strip
    m1[7:9, 15:18] = True         # region B, lines 17-18
    m2 = np.zeros((10, 20), bool)
    m2[4:6, 9:11] = True          # region C, lines 24-25
    strip = Strip(20, 1, tmp_path, [Placed(Image(tmp_path / "g.png"), 0, 10),
                                    Placed(Image(tmp_path / "s.png", "scratch", tmp_path / "m"), 10, 20, m1),
                                    Placed(Image(tmp_path / "h.png", "hole", tmp_path / "m"), 20, 30, m2)])
    events = [_event(11, 11, 4, 6),          # finds A (pixel (11, 4))
              _event(10, 19, 5, 14),         # box misses A (cols 2-4 vs 5-14)... and B (15-17): false, on scratch
              _event(2, 3, 0, 19),           # false, on the good image
              _event(5, 6, 1, 1),            # false, on the good image
              _event(23, 24, 10, 12)]        # finds C
    m = score_events(events, strip, line_pitch_mm=0.5, line_rate_hz=10.0)
    assert m["regions"] == 3 and m["regions_found"] == 2 and m["recall"] == pytest.approx(2 / 3)
    assert m["recall_per_type"] == {"hole": 1.0, "scratch": 0.5}
    assert m["image_recall"] == 1.0 and m["precision"] == pytest.approx(2 / 5)
    assert (m["false_events_good"], m["false_events_defective"]) == (2, 1)
    assert m["false_per_100_good"] == pytest.approx(200.0)          # 2 false events on 1 good image
    assert m["false_per_metre"] == pytest.approx(3 / (30 * 0.5 / 1000))
    assert m["false_per_hour"] == pytest.approx(3 / (30 / 10.0 / 3600))


def test_lowest_threshold_is_the_lowest_grid_or_bisected_value():
    rate = lambda t: max(0.0, 10.0 - t)          # noqa: E731 - false alarms fall linearly to 0 at t = 10
    grid = [0.0, 2.0, 4.0, 6.0, 8.0, 12.0]
    assert lowest_threshold(rate, grid, 3.0) == pytest.approx(7.0, abs=2 / 2 ** 12)
    assert lowest_threshold(rate, grid, 100.0) == 0.0
    bumpy = lambda t: {0.0: 9, 2.0: 1, 4.0: 5, 6.0: 0}.get(t, 0 if t > 4 else 9)   # noqa: E731
    assert lowest_threshold(bumpy, [0.0, 2.0, 4.0, 6.0], 1.0) > 4.0   # 2.0 passes, 4.0 does not: not monotone
    with pytest.raises(ValueError, match="no threshold"):
        lowest_threshold(rate, [0.0, 1.0], 0.5)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    from models.synthetic import generate_dataset

    root = generate_dataset(tmp_path_factory.mktemp("syn"), classes=("texture",), n_train=6, n_test_good=5,
                            n_test_defect=6, size=96, seed=11)
    return root / "texture"


def test_replayed_events_equal_the_streams_own(torch_engine, synthetic_set, tmp_path):
    strip = lay_out(mvtec_test_images(synthetic_set), 160, tmp_path / "pages", channels=1, seed=3)
    assert sum(p.image.defect_type != GOOD for p in strip.placed) == 6
    rec = record(torch_engine, strip)
    assert rec.summary["lines_scored"] == strip.lines and rec.tile_hw == (TILE, TILE)
    thr = torch_engine.map_threshold
    uri = f"linesim://?images={strip.folder}&width=160&rate=0&once=1"
    summary = run_stream(torch_engine, uri, pixel_threshold=thr, out_dir=tmp_path / "out", overload="block")
    streamed = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    keys = ("line_start", "line_end", "col_start", "col_end", "area_px")
    replayed = [e.to_dict() for e in rec.events(thr)]
    assert summary["events"] == len(replayed) > 0
    assert [[e[k] for k in keys] for e in streamed] == [[e[k] for k in keys] for e in replayed]
    m = score_events(rec.events(thr), strip)
    assert m["recall"] > 0.5, m                  # the strip model sees the synthetic defects
    grid = threshold_grid(rec)
    assert rec.events(grid[-1]) == [] and rec.events(grid[0])   # the grid spans "all" to "none"


def test_calibrated_threshold_meets_its_target_and_is_the_lowest(torch_engine, synthetic_set, tmp_path):
    normal = synthetic_set / "train" / "good"
    cal = calibrate(torch_engine, normal, 160, 20.0, "per_100_images", val_data=synthetic_set)
    assert cal.measured <= 20.0 and cal.normal_images == 6 and cal.tile == [TILE, TILE]
    assert 0.0 <= cal.expected_recall <= 1.0 and cal.val_images == 11
    # 1 % lower is over the target (the bisection stops within a few parts per thousand of the edge),
    # unless the threshold is the low end of the search grid already (the 90th percentile of the map)
    strip = lay_out([Image(p) for p in sorted(normal.iterdir())], 160, tmp_path / "n", channels=1)
    rec = record(torch_engine, strip)
    lower = score_events(rec.events(cal.pixel_threshold * 0.99), strip)["false_per_100_good"]
    at = score_events(rec.events(cal.pixel_threshold), strip)["false_per_100_good"]
    v = rec.map_values()
    assert at == pytest.approx(cal.measured) and at <= 20.0
    assert lower > 20.0 or cal.pixel_threshold <= np.percentile(v[np.isfinite(v)], 90) * 1.0001
    runtime = cal.to_runtime()
    assert runtime["pixel_threshold"] == cal.pixel_threshold and runtime["calibration"]["unit"] == "per_100_images"


def test_calibrate_cli_errors_are_one_line(onnx_artifact, tmp_path, capsys):
    from runtime.calibrate import main

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((10, 10), np.uint8))
    assert main(["--engine", str(onnx_artifact), "--normal", str(tmp_path), "--width", "64",
                 "--false-alarms-per-metre", "1"]) == 2
    assert "--line-pitch-mm" in capsys.readouterr().err
    assert main(["--engine", str(onnx_artifact), "--normal", str(tmp_path / "nope"), "--width", "64",
                 "--false-alarms-per-100-images", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and "Traceback" not in err


def test_calibrate_write_signs_the_threshold_the_stream_then_uses_and_prints(onnx_artifact, synthetic_set, tmp_path,
                                                                             capsys):
    import json
    import shutil

    from runtime.calibrate import main
    from runtime.stream import main as stream_main

    art = tmp_path / "model.onnx"
    shutil.copy(onnx_artifact, art)
    shutil.copy(str(onnx_artifact) + ".json", str(art) + ".json")
    assert main(["--engine", str(art), "--normal", str(synthetic_set / "train" / "good"), "--width", "160",
                 "--false-alarms-per-100-images", "20", "--val-data", str(synthetic_set), "--write"]) == 0
    written = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["runtime"] == written and written["calibration"]["target"] == 20.0
    out = tmp_path / "run"
    assert stream_main(["--engine", str(art), "--source", "linesim://?width=160&rate=0&lines=64&total=640",
                        "--out", str(out)]) == 0
    said = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pixel_threshold"] == pytest.approx(written["pixel_threshold"])
    assert "from runtime section" in said and "calibration: pixel threshold" in said, said
    assert "expected defect recall" in said
