"""SparseK attention and its exact gradients, in plain PyTorch.

Three forward paths that must agree:

* ``attention_dense``: builds the (S, S) log-gate bias; the ground truth for small S.
* ``attention_blocked``: per query block over the window and the union of selected keys;
  memory grows with S * (topk + window), not S * S. This is what the op runs without CUDA.
* ``attention_rows``: a few query rows, each computed on its own (own top-k, own threshold
  by bisection); an independent check for long sequences.

Inputs follow ``scaled_dot_product_attention``: q (B, Hq, S, D), k and v (B, Hkv, S, D),
scores (B, Hkv, S). Arithmetic is float32, or float64 when q is float64.

Why the gate multiplies the softmax weights (a ``log g`` bias) instead of the values: a key
whose gate goes to 0 leaves the numerator and the denominator together, so the output is
continuous in the scores and the scorer gets a useful gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import selection as sel_mod
from .selection import Selection


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_heads(x: Tensor, hq: int) -> Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _gate_bias(g: Tensor) -> Tensor:
    """log g with -inf where g == 0 (outside the window and the selection)."""
    return torch.where(g > 0, torch.log(g.clamp(min=torch.finfo(g.dtype).tiny)), torch.full_like(g, float("-inf")))


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


def attention_dense(q, k, v, scores, topk, window, scale, sel: Selection | None = None):
    """Returns out (B, Hq, S, D) in q's dtype and lse (B, Hq, S) in the compute dtype."""
    ct = compute_dtype(q.dtype)
    sel = sel or sel_mod.select(scores, topk, window)
    Hq = q.shape[1]
    bias = _gate_bias(_expand_heads(sel_mod.gates(sel, scores), Hq).to(ct))  # (B, Hq, S, S)
    s = scale * q.to(ct) @ _expand_heads(k, Hq).to(ct).transpose(-1, -2) + bias
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ _expand_heads(v, Hq).to(ct)
    return out.to(q.dtype), lse


def _block_logits(q_blk, k, scores, sel, i0, i1, scale, ct):
    """Logits, gates and key indices of one query block over its window and union keys.

    q_blk (B, Hq, Bq, D). Returns s (B, Hq, Bq, L) scaled q.k (-inf where masked),
    g (B, Hq, Bq, L) gates (0 where masked), keys (B, Hkv, L) key indices, and a mask of
    the entries that are selected (not window) keys.
    """
    B, Hkv, S, D = k.shape
    Hq = q_blk.shape[1]
    W = sel.window
    dev = k.device
    i = torch.arange(i0, i1, device=dev)
    w0 = max(0, i0 - W + 1) if W > 0 else i1  # window keys of the block: [w0, i1)
    win_keys = torch.arange(w0, i1, device=dev).expand(B, Hkv, -1)
    uni_keys, uni_valid = sel_mod.block_union(sel, i0, i1)
    keys = torch.cat([win_keys, uni_keys], -1)  # (B, Hkv, L)
    Lw = win_keys.shape[-1]

    d = i.view(-1, 1) - keys.unsqueeze(2)  # (B, Hkv, Bq, L)
    in_window = (d >= 0) & (d < W)
    in_window[..., Lw:] = False
    end = sel.end.long().gather(-1, keys).unsqueeze(2)
    in_sel = (keys.unsqueeze(2) + W <= i.view(-1, 1)) & (i.view(-1, 1) < end)
    in_sel[..., :Lw] = False
    in_sel &= torch.cat([torch.zeros_like(win_keys, dtype=torch.bool), uni_valid], -1).unsqueeze(2)

    tau = sel.tau[..., i0:i1].to(ct).unsqueeze(-1)
    u = scores.to(ct).gather(-1, keys).unsqueeze(2)
    g = torch.where(in_sel, (u - tau).clamp(0.0, 1.0), in_window.to(ct))

    k_g = k.to(ct).gather(2, keys.unsqueeze(-1).expand(-1, -1, -1, D))  # (B, Hkv, L, D)
    s = scale * q_blk.to(ct) @ _expand_heads(k_g, Hq).transpose(-1, -2)
    valid = _expand_heads(g > 0, Hq)
    s = torch.where(valid, s, torch.full_like(s, float("-inf")))
    return s, _expand_heads(g, Hq), keys, _expand_heads(in_sel, Hq)


def attention_blocked(q, k, v, scores, topk, window, scale, sel: Selection | None = None, block: int = 64):
    """Same result as ``attention_dense``, one query block at a time."""
    ct = compute_dtype(q.dtype)
    sel = sel or sel_mod.select(scores, topk, window)
    B, Hq, S, D = q.shape
    out = torch.empty(B, Hq, S, D, dtype=ct, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=ct, device=q.device)
    for i0 in range(0, S, block):
        i1 = min(S, i0 + block)
        s, g, keys, _ = _block_logits(q[:, :, i0:i1], k, scores, sel, i0, i1, scale, ct)
        logits = s + _gate_bias(g)
        m = torch.logsumexp(logits, -1)
        v_g = v.to(ct).gather(2, keys.unsqueeze(-1).expand(-1, -1, -1, D))
        out[:, :, i0:i1] = torch.exp(logits - m.unsqueeze(-1)) @ _expand_heads(v_g, Hq)
        lse[:, :, i0:i1] = m
    return out.to(q.dtype), lse


def _row_threshold(c: Tensor, topk: int) -> Tensor:
    """Smallest t with sum clip(c - t, 0, 1) <= topk, by bisection; c (B, H, n) float64."""
    lo = c.min(-1).values - 1.0  # f(lo) = n > topk
    hi = c.max(-1).values  # f(hi) = 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if bool(((mid == lo) | (mid == hi)).all()):
            break
        above = (c - mid.unsqueeze(-1)).clamp(0.0, 1.0).sum(-1) > topk
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return hi


def attention_rows(q, k, v, scores, topk, window, scale, rows):
    """Output rows (B, Hq, R, D) for the query positions ``rows``, each computed alone.

    Independent of ``selection.select``: every row sorts its own candidates and finds its own
    threshold by bisection. Meant for spot checks of long sequences.
    """
    ct = compute_dtype(q.dtype)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    u = scores.to(torch.float64)
    outs = []
    for i in [int(r) for r in rows]:
        n = max(0, i - window + 1)
        keys = torch.arange(max(0, i - window + 1) if window > 0 else i + 1, i + 1, device=q.device)
        g_win = torch.ones(B, Hkv, keys.numel(), dtype=torch.float64, device=q.device)
        key_b = keys.expand(B, Hkv, -1)
        if n > 0:
            c = u[..., :n]
            if n <= topk:
                chosen = torch.arange(n, device=q.device).expand(B, Hkv, -1)
                g_sel = torch.ones(B, Hkv, n, dtype=torch.float64, device=q.device)
            else:
                # stable ascending sort: equal scores keep index order, so the top-k (the tail)
                # prefers the larger index
                chosen = torch.sort(c, dim=-1, stable=True).indices[..., -topk:]
                tau = _row_threshold(c, topk).to(scores.dtype).to(torch.float64)
                g_sel = (c.gather(-1, chosen) - tau.unsqueeze(-1)).clamp(0.0, 1.0)
            key_b = torch.cat([key_b, chosen], -1)
            g_win = torch.cat([g_win, g_sel], -1)
        k_g = k.to(ct).gather(2, key_b.unsqueeze(-1).expand(-1, -1, -1, D))
        v_g = v.to(ct).gather(2, key_b.unsqueeze(-1).expand(-1, -1, -1, D))
        s = scale * (q[:, :, i : i + 1].to(ct) @ _expand_heads(k_g, Hq).transpose(-1, -2))
        s = s + _gate_bias(_expand_heads(g_win.to(ct), Hq)).unsqueeze(2)
        outs.append(torch.softmax(s, -1) @ _expand_heads(v_g, Hq))
    return torch.cat(outs, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------
#
# With P the normalised weights and dP = dO . v, the logits gradient is
#   dS_ij = P_ij (dP_ij - dO_i . o_i),
# which gives dq, dk, dv as in ordinary attention. The scores enter only through the gates
# g_ij = u_j - tau_i of the soft selected keys (0 < g < 1), and tau_i moves with every soft
# candidate (dtau_i / du_l = 1 / |F_i| for l in F_i). With gamma_ij = dS_ij / g_ij
# (= exp(s_ij - lse_i) (dP_ij - dO_i . o_i), bounded even as g -> 0):
#   dL/du_l = sum_i [l in A_i] gamma_il - sum_i [l in F_i] Gamma_i / |F_i|,
#   A_i = S_i n F_i,  Gamma_i = sum_{j in A_i} gamma_ij.


def _sum_groups(x: Tensor, hkv: int) -> Tensor:
    """(B, Hq, ...) -> (B, Hkv, ...): add up the query heads of each kv group."""
    B, Hq = x.shape[:2]
    return x.view(B, hkv, Hq // hkv, *x.shape[2:]).sum(2)


def backward_dense(grad_out, q, k, v, scores, out, lse, sel: Selection, scale):
    """Exact (dq, dk, dv, dscores) through the (S, S) formulation."""
    ct = compute_dtype(q.dtype)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    qc, kc, vc = q.to(ct), _expand_heads(k, Hq).to(ct), _expand_heads(v, Hq).to(ct)
    do, o = grad_out.to(ct), out.to(ct)
    g = _expand_heads(sel_mod.gates(sel, scores), Hq).to(ct)
    s = scale * qc @ kc.transpose(-1, -2)
    e = torch.exp(s - lse.to(ct).unsqueeze(-1))  # P / g
    e = torch.where(g > 0, e, torch.zeros_like(e))
    p = g * e
    dp = do @ vc.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * ds @ kc
    dk = _sum_groups(scale * ds.transpose(-1, -2) @ qc, Hkv)
    dv = _sum_groups(p.transpose(-1, -2) @ do, Hkv)

    soft = sel_mod.soft_mask(sel, scores)  # (B, Hkv, S, S)
    active = _expand_heads(soft & sel_mod.selected_mask(sel), Hq)
    gamma = torch.where(active, e * (dp - delta), torch.zeros_like(e))
    big_gamma = _sum_groups(gamma.sum(-1), Hkv)  # (B, Hkv, S)
    coeff = big_gamma / soft.sum(-1).clamp(min=1).to(ct)  # |F_i|
    du = _sum_groups(gamma.sum(-2), Hkv) - (soft.to(ct) * coeff.unsqueeze(-1)).sum(-2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), du.to(scores.dtype)


def backward_blocked(grad_out, q, k, v, scores, out, lse, sel: Selection, scale, block: int = 64):
    """Same as ``backward_dense``, one query block at a time."""
    ct = compute_dtype(q.dtype)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    dq = torch.empty(B, Hq, S, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, Hkv, S, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, Hkv, S, D, dtype=ct, device=q.device)
    du = torch.zeros(B, Hkv, S, dtype=ct, device=q.device)
    vc = v.to(ct)
    for i0 in range(0, S, block):
        i1 = min(S, i0 + block)
        s, g, keys, in_sel = _block_logits(q[:, :, i0:i1], k, scores, sel, i0, i1, scale, ct)
        idx = keys.unsqueeze(-1).expand(-1, -1, -1, D)
        k_g = _expand_heads(k.to(ct).gather(2, idx), Hq)
        v_g = _expand_heads(vc.gather(2, idx), Hq)
        do = grad_out[:, :, i0:i1].to(ct)
        e = torch.exp(s - lse[:, :, i0:i1].to(ct).unsqueeze(-1))  # 0 where masked
        p = g * e
        dp = do @ v_g.transpose(-1, -2)
        delta = (do * out[:, :, i0:i1].to(ct)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, i0:i1] = scale * ds @ k_g
        dk.scatter_add_(2, idx, _sum_groups(scale * ds.transpose(-1, -2) @ q[:, :, i0:i1].to(ct), Hkv))
        dv.scatter_add_(2, idx, _sum_groups(p.transpose(-1, -2) @ do, Hkv))

        soft_rows = sel_mod.soft_mask(sel, scores, torch.arange(i0, i1, device=q.device))  # (B, Hkv, Bq, S)
        soft_keys = soft_rows.gather(-1, keys.unsqueeze(2).expand(-1, -1, i1 - i0, -1))
        active = in_sel & _expand_heads(soft_keys, Hq)
        gamma = torch.where(active, e * (dp - delta), torch.zeros_like(e))
        du.scatter_add_(2, keys, _sum_groups(gamma.sum(-2), Hkv))
        coeff = _sum_groups(gamma.sum(-1), Hkv) / soft_rows.sum(-1).clamp(min=1).to(ct)  # |F_i|
        du -= (soft_rows.to(ct) * coeff.unsqueeze(-1)).sum(-2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), du.to(scores.dtype)


class SparseKFunction(torch.autograd.Function):
    """Reference SparseK attention with the analytic backward (no autograd through a sort)."""

    @staticmethod
    def forward(ctx, q, k, v, scores, topk, window, scale, block):
        sel = sel_mod.select(scores, topk, window)
        out, lse = attention_blocked(q, k, v, scores, topk, window, scale, sel, block)
        ctx.save_for_backward(q, k, v, scores, out, lse, sel.tau, sel.end)
        ctx.params = (topk, window, scale, block)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, scores, out, lse, tau, end = ctx.saved_tensors
        topk, window, scale, block = ctx.params
        sel = Selection(topk=topk, window=window, tau=tau, nsoft=None, end=end)
        dq, dk, dv, du = backward_blocked(grad_out, q, k, v, scores, out, lse, sel, scale, block)
        return dq, dk, dv, du, None, None, None, None
