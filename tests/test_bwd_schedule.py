"""sparsek.bench.bwd_schedule counts the work of key-major schedules: hand-made selections."""

import pytest
import torch

from sparsek import selection as sel_mod
from sparsek.bench.bwd_schedule import main, query_major, visits


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
    assert doc["case"] == "cpu-smoke" and len(doc["rows"]) == 3
    assert doc["rows"][0]["schedule"].startswith("query-major") and doc["rows"][0]["visited / attended"] >= 1.0
    assert doc["rows"][1]["schedule"] == "query-major, two blocks per cluster"
    assert doc["rows"][2]["consecutive"] >= 1.0


@pytest.mark.parametrize("pair", [1, 2])
@pytest.mark.parametrize("S, topk, window, group", [(700, 50, 37, 2), (300, 400, 0, 1), (513, 7, 200, 4)])
def test_query_major_counts_the_kernels_tiles(S, topk, window, group, pair):
    """Against a direct count on the reference selection: every block walks its window keys
    [i0 - W + 1, i1) and the union of the keys its queries select (selection.block_union, which
    the kernels' lists equal), 64 keys per tile, 128 rows per tile; attended pairs are the
    window and the selected keys of every query and head. With pair = 2 a cluster of two CTAs
    walks the union of two neighbouring blocks: 256 rows per tile, one reduction per tile."""
    gen = torch.Generator().manual_seed(S)
    scores = torch.randn(1, 1, S, generator=gen).cumsum(-1) * 0.1 + torch.randn(1, 1, S, generator=gen)
    sel = sel_mod.select(scores, topk, window)
    block_q, tile = 128 // group, 64
    visited = tiles = 0
    for i0 in range(0, S, block_q * pair):
        i1 = min(S, i0 + block_q * pair)
        w0 = max(0, i0 - window + 1) if window > 0 else i1
        _, valid = sel_mod.block_union(sel, i0, i1)
        n_list = int(valid.sum())
        tiles += -(-(i1 - w0) // tile) + -(-n_list // tile)
    visited = 128 * pair * tile * tiles
    sel_and_window = sel_mod.selected_mask(sel)[0, 0] | sel_mod.window_mask(S, window)
    attended = int(sel_and_window.sum()) * group
    q = query_major(sel.end[0, 0].long(), window, topk, block_q, group, pair=pair)
    assert q["visited_pairs"] == visited
    assert q["attended_pairs"] == attended
    assert q["reduced key rows / attended pair"] == pytest.approx(tile * tiles / attended)
