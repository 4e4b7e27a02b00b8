"""Kernel-development probe (docs/perf-notes.md): the prefill kernels' phases against the
device's own ceilings and against dense SDPA, all measured in one process on one GPU.

    python -m sparsek.bench.kernel_probe [--cases long-16k,long-64k,seed] [--json PATH]
    python -m sparsek.bench.kernel_probe --train [--cases ...]   # the backward and the training step

Times with ``triton.testing.do_bench`` (CUDA events, L2 cleared between calls, median). This is
the quick loop for kernel work; the full, fingerprinted benchmark is ``sparsek-bench run``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from .. import _cuda
from ..ops import sparsek_attention
from .cases import get_case, make_inputs
from .metrics import BACKWARD_FLOPS_PER_PAIR, FORWARD_FLOPS_PER_PAIR, STEP_FLOPS_PER_PAIR, flops


def _bench(fn, ms=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=ms, return_mode="median") * 1e-3  # seconds


def ceilings(dev) -> dict:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t_mm = _bench(lambda: a @ b)
    src = torch.randn(1 << 29, device=dev, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    t_cp = _bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * 8192**3 / t_mm / 1e12, "copy_tbps": 2 * src.numel() * 4 / t_cp / 1e12}


def probe_case(name: str, peaks: dict) -> list[dict]:
    case = get_case(name)
    inp = make_inputs(case)
    q, k, v, u = inp.q, inp.k, inp.v, inp.scores
    ops = _cuda.ops()
    block_q = _cuda.block_q_for(q.shape[1], k.shape[1])
    scale = q.shape[-1] ** -0.5
    sel = ops.select(u, case.topk, case.window, block_q)
    rows = []
    work = flops(case, "sparsek")
    dense = flops(case, "dense-causal")

    def add(impl, seconds, fl):
        rows.append({"case": name, "impl": impl, "ms": seconds * 1e3, "tflops": fl / seconds / 1e12 if fl else None,
                     "pct_peak": 100 * fl / seconds / 1e12 / peaks["matmul_tflops"] if fl else None})

    add("select", _bench(lambda: ops.select(u, case.topk, case.window, block_q)), 0)
    add("attention", _bench(lambda: ops.attention_fwd(q, k, v, u, *sel, case.window, scale, block_q)), work)
    os.environ["SPARSEK_SKIP_FINITE_CHECK"] = "1"
    add("sparsek (op, no finite check)", _bench(lambda: sparsek_attention(q, k, v, u, topk=case.topk, window=case.window)), work)
    os.environ.pop("SPARSEK_SKIP_FINITE_CHECK")
    add("sparsek (op)", _bench(lambda: sparsek_attention(q, k, v, u, topk=case.topk, window=case.window)), work)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for impl, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                fn()
                add(impl, _bench(fn), dense)
        except RuntimeError as exc:
            rows.append({"case": name, "impl": impl, "error": str(exc).splitlines()[0]})
    return rows


# The backward's and the step's FLOPs over the forward's, from the suite's one convention.
BACKWARD_OVER_FORWARD = BACKWARD_FLOPS_PER_PAIR / FORWARD_FLOPS_PER_PAIR
STEP_OVER_FORWARD = STEP_FLOPS_PER_PAIR / FORWARD_FLOPS_PER_PAIR


def probe_train(name: str, peaks: dict) -> list[dict]:
    """The backward kernel alone, the backward op (fast and deterministic) and one training step
    (forward + backward with a fixed upstream gradient) against dense SDPA's step."""
    case = get_case(name)
    inp = make_inputs(case)
    q, k, v, u = inp.q, inp.k, inp.v, inp.scores
    scale = q.shape[-1] ** -0.5
    gen = torch.Generator(device=q.device).manual_seed(case.seed + 1)
    grad = torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)
    ops = _cuda.ops()
    block_q = _cuda.block_q_for(q.shape[1], k.shape[1])
    fwd = _cuda.forward(q, k, v, u, case.topk, case.window, scale)
    out, lse, tau, end, keys, count = fwd
    B, Hkv = k.shape[:2]
    work = flops(case, "sparsek")
    dense = flops(case, "dense-causal")
    rows = []

    def add(impl, seconds, fl, **extra):
        rows.append({"case": name, "impl": impl, "ms": seconds * 1e3, "tflops": fl / seconds / 1e12 if fl else None,
                     "pct_peak": 100 * fl / seconds / 1e12 / peaks["matmul_tflops"] if fl else None, **extra})

    bwd_work = BACKWARD_OVER_FORWARD * work
    kernel_args = (grad, q, k, v, out, lse, u, tau, end, keys.view(B * Hkv, *keys.shape[2:]), count.view(B * Hkv, -1),
                   case.window, scale, block_q, False, None)
    # Both kernels in one run (the mma.sync v1 kept for this comparison), and the default kernel
    # in one launch with accumulators for every (batch, kv head) pair: what the chunking costs.
    budget = _cuda.accumulator_budget(k, block_q=block_q, sms=_cuda._sm_count(q.device))
    streams = _cuda.backward_streams(k)
    for kernel, label, acc, lanes in ((1, "mma.sync", budget, streams), (2, "wgmma", budget, streams),
                                      (2, "wgmma, unchunked", 1 << 60, 1)):
        run = lambda kernel=kernel, acc=acc, lanes=lanes: ops.attention_bwd(*kernel_args, kernel=kernel, acc_budget=acc,
                                                                            streams=lanes)
        add(f"backward kernels, {label} (dot + attention + dk/dv conversion)", _bench(run), bwd_work)
    bwd = lambda: _cuda.backward(grad, q, k, v, u, out, lse, tau, end, keys, count, case.window, scale)
    add("backward (op)", _bench(bwd), bwd_work)
    torch.use_deterministic_algorithms(True)
    try:
        add("backward (op, deterministic)", _bench(bwd), bwd_work)
    finally:
        torch.use_deterministic_algorithms(False)

    leaves = [t.detach().requires_grad_() for t in (q, k, v, u)]
    os.environ["SPARSEK_CUDA_BACKWARD"] = "1"  # the probe measures the kernels, whatever the default

    def step():
        o = sparsek_attention(*leaves, topk=case.topk, window=case.window)
        return torch.autograd.grad(o, leaves, grad)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    add("sparsek step (fwd + bwd)", _bench(step), STEP_OVER_FORWARD * work, peak_extra_mib=peak / 2**20)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dq_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for impl, backend in (("sdpa-cudnn step", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash step", SDPBackend.FLASH_ATTENTION)):
        def dense_step():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(*dq_leaves, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, dq_leaves, grad)

        try:
            dense_step()
            add(impl, _bench(dense_step), STEP_OVER_FORWARD * dense)
        except RuntimeError as exc:
            rows.append({"case": name, "impl": impl, "error": str(exc).splitlines()[0]})
    # The same-budget structured peer's step, through the suite's own adapter.
    from .cases import TRAIN_SHAPES
    from .impls import get_impl

    train_name = {shape: train for train, shape in TRAIN_SHAPES.items()}.get(name)
    if train_name is not None:
        train_case = get_case(train_name)
        impl = get_impl("flex-window")
        reason = impl.available(train_case)
        if reason is None:
            prepared = impl.prepare(train_case, make_inputs(train_case))
            prepared.fn()
            add("flex-window step", _bench(prepared.fn), flops(train_case, "window"))  # a train case counts the step
        else:
            rows.append({"case": name, "impl": "flex-window step", "error": reason})
    return rows


def once_train(name: str) -> None:
    """One forward + backward through the op on the kernels (for ncu: --once --train)."""
    case = get_case(name)
    inp = make_inputs(case)
    os.environ["SPARSEK_CUDA_BACKWARD"] = "1"
    leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v, inp.scores)]
    out = sparsek_attention(*leaves, topk=case.topk, window=case.window)
    torch.autograd.grad(out, leaves, torch.randn_like(out))
    torch.cuda.synchronize()


def breakdown(name: str) -> list[dict]:
    """Device time of every kernel of one selection + attention call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    case = get_case(name)
    inp = make_inputs(case)
    ops = _cuda.ops()
    block_q = _cuda.block_q_for(inp.q.shape[1], inp.k.shape[1])

    def call():
        sel = ops.select(inp.scores, case.topk, case.window, block_q)
        ops.attention_fwd(inp.q, inp.k, inp.v, inp.scores, *sel, case.window, inp.q.shape[-1] ** -0.5, block_q)

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append({"case": name, "kernel": ev.key[:90], "calls": ev.count, "us": t})
    return sorted(rows, key=lambda r: -r["us"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="long-16k,long-64k,seed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--once", action="store_true", help="one selection + attention call per case (with --train: one "
                    "forward + backward) for ncu, no timing")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel device times of one call per case")
    ap.add_argument("--train", action="store_true", help="the backward and the training step instead of the forward")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    if args.once and args.train:
        for name in args.cases.split(","):
            once_train(name)
        return 0
    if args.once or args.breakdown:
        for name in args.cases.split(","):
            rows = breakdown(name)
            for r in rows if args.breakdown else []:
                print(f"{r['case']:10s} {r['us']:10.1f} us  x{r['calls']:<3d} {r['kernel']}")
        return 0
    peaks = ceilings(dev)
    result = {"device": torch.cuda.get_device_name(dev), "peaks": peaks, "rows": []}
    print(f"{result['device']}: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, copy {peaks['copy_tbps']:.2f} TB/s", flush=True)
    for name in args.cases.split(","):
        try:
            result["rows"] += (probe_train if args.train else probe_case)(name, peaks)
        except Exception as exc:  # keep the other cases
            result["rows"].append({"case": name, "impl": "*", "error": f"{type(exc).__name__}: {exc}"})
        torch.cuda.empty_cache()
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['case']:10s} {r['impl']:32s} ERROR {r['error'][:120]}")
        else:
            tf = f"{r['tflops']:7.1f} TFLOP/s {r['pct_peak']:5.1f}%" if r["tflops"] else ""
            mem = f" peak +{r['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in r else ""
            print(f"{r['case']:10s} {r['impl']:36s} {r['ms']:9.3f} ms {tf}{mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
