"""The decode step split's timeline logic (sparsek.bench.decode_split) on chrome-trace events as
torch.profiler writes them: kernel events with ts/dur in microseconds, other categories mixed in."""

from __future__ import annotations

import pytest

from sparsek.bench import decode_split

ATT = "void sparsek::(anonymous namespace)::decode_attention_kernel<128, true>(sparsek::DecodeAttentionParams)"
UPD = "void sparsek::(anonymous namespace)::decode_update_kernel<64>(sparsek::DecodeUpdateParams)"


def _k(name, ts, dur, op=None):
    args = {"device": 0, "stream": 7, "correlation": int(ts)} | ({} if op is None else {"External id": op})
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": args}


def test_pairs_each_attention_with_its_update_and_measures_the_overlap():
    events = [
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 0.0, "dur": 3.0},
        _k("at::native::vectorized_elementwise_kernel", 1.0, 40.0),  # the L2 flush: not a decode kernel
        _k(ATT, 100.0, 54.0, op=11), _k(UPD, 102.5, 50.0, op=11),  # beside: ends inside the attention
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernelExC", "ts": 99.0, "dur": 4.0},
        _k(ATT, 300.0, 54.0, op=12), _k(UPD, 345.0, 33.0, op=12),  # starts late: sticks out by 24 us
    ]
    steps = decode_split.step_overlap(events)
    assert steps == [
        {"update_start": 2.5, "attention": 54.0, "update": 50.0, "span": 54.0},
        {"update_start": 45.0, "attention": 54.0, "update": 33.0, "span": 78.0},
    ]


def test_update_first_steps_have_a_negative_start_and_ops_of_one_kernel_are_dropped():
    events = [_k(ATT, 10.0, 5.0, op=3),  # decode_attention alone: no update in its op
              _k(UPD, 20.0, 6.0, op=4), _k(ATT, 27.0, 10.0, op=4)]  # window 0: update first, then attention
    assert decode_split.step_overlap(events) == [{"update_start": -7.0, "attention": 10.0, "update": 6.0, "span": 17.0}]


def test_without_op_ids_kernels_pair_in_launch_order():
    events = [_k(ATT, 0.0, 50.0), _k(UPD, 2.0, 40.0), _k(ATT, 60.0, 50.0), _k(UPD, 61.0, 40.0)]
    assert [s["update_start"] for s in decode_split.step_overlap(events)] == [2.0, 1.0]


def test_summary_skips_the_first_steps_and_takes_medians():
    steps = [{"update_start": s, "attention": 50.0 + s, "update": 1.0, "span": 60.0} for s in (100.0, 90.0, 1.0, 3.0, 2.0)]
    summary = decode_split.summarize_overlap(steps, skip=2)
    assert summary == {"update_start": 2.0, "attention": 52.0, "update": 1.0, "span": 60.0, "steps": 3}
    assert decode_split.summarize_overlap([]) == {}


def test_cli_refuses_a_prefill_case(capsys):
    # Exit status 2 alone would not tell: on a CPU a valid decode case exits 2 too (no CUDA device).
    with pytest.raises(SystemExit) as exc:
        decode_split.main(["--case", "seed"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--case must be a CUDA decode case" in err and "got 'seed'" in err and "decode-32k-b16" in err
