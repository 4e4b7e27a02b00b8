"""sparsek.bench.bwd_schedule counts the work of key-major schedules: hand-made selections."""

import pytest
import torch

from sparsek.bench.bwd_schedule import main, visits


def test_window_only_wastes_only_the_band_corner():
    S, W, tile = 8, 2, 4
    end = torch.arange(S) + W  # no key is selected beyond its window
    v = visits(end, W, tile)
    # key j is attended by [j, min(j + 2, 8)): 2 queries each, 1 for the last key
    assert v["attended_pairs"] == 2 * S - 1
    # tile [0, 4): queries [0, 5) -> 4 x 5; tile [4, 8): queries [4, 8) -> 4 x 4
    assert v["consecutive"] == pytest.approx((20 + 16) / 15)
    assert v["window band"] == pytest.approx((20 + 16) / 15)
    assert v["keys selected beyond the window"] == 0.0 and v["selected, by end"] is None


def test_one_long_run_makes_consecutive_tiles_visit_it_for_every_key():
    S, W, tile = 16, 1, 4
    end = torch.arange(S) + W
    end[0] = S  # key 0 is selected by every later query
    v = visits(end, W, tile)
    assert v["attended_pairs"] == S + (S - 1)  # 16 window pairs, 15 selected pairs of key 0
    # tile [0, 4) now spans queries [0, 16): 4 x 16 instead of 4 x 4
    assert v["consecutive"] == pytest.approx((64 + 3 * 16) / 31)
    assert v["window band"] == pytest.approx(4 * 4 * 4 / 16)
    assert v["keys selected beyond the window"] == 1 / S
    assert v["selected, by end"] is None  # one selected key: no full tile of 4


def test_cli_writes_its_rows(tmp_path):
    out = tmp_path / "sched.json"
    assert main(["--case", "cpu-smoke", "--kv-heads", "1", "--tiles", "16", "--json", str(out)]) == 0
    import json

    doc = json.loads(out.read_text())
    assert doc["case"] == "cpu-smoke" and len(doc["rows"]) == 1 and doc["rows"][0]["consecutive"] >= 1.0
