"""The band-size tool (sparsek.bench.select_bands) against a direct count on small rows."""

from __future__ import annotations

import torch

from sparsek.bench.select_bands import band_sizes, main, summary


def _direct(u, topk, window, chunk):
    S = u.numel()
    out = []
    for n0 in range(topk + 1, S - window + 1, chunk):
        n_end = min(n0 + chunk, S - window + 1)
        best = sorted(u[:n0].tolist(), reverse=True)
        floor = best[topk] - 1.0  # the (K+1)-th best present at n0, minus one
        out.append(sum(1 for j in range(n_end) if u[j].item() > floor))
    return out


def test_band_sizes_match_a_direct_count():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 300, generator=gen).cumsum(-1) * 0.2 + torch.randn(3, 300, generator=gen)
    got = band_sizes(scores, 20, 7, 64).tolist()
    want = [m for r in range(3) for m in _direct(scores[r].double(), 20, 7, 64)]
    assert got == want
    assert min(got) >= 21  # the K + 1 best present keys always lie above the floor


def test_no_chunks_when_every_prefix_fits_in_topk():
    assert band_sizes(torch.randn(2, 50), 60, 4, 16).numel() == 0


def test_summary_and_cli(tmp_path, capsys):
    s = summary(torch.tensor([10, 20, 30, 40]), [25])
    assert s["max"] == 40 and s["over 25"] == 0.5 and s["chunks"] == 4
    out = tmp_path / "bands.json"
    assert main(["--case", "cpu-smoke", "--rows", "2", "--chunk", "16", "--json", str(out)]) == 0
    assert out.exists() and '"case": "cpu-smoke"' in capsys.readouterr().out
