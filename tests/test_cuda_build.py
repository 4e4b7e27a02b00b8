"""How sparsek._cuda builds the extension, checked without a GPU: the flags it passes, the one line
a first build prints, and that the user's environment is left alone."""

import os
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

from sparsek import _cuda


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("stub: no compiler here")

    monkeypatch.delenv("SPARSEK_DISABLE_CUDA", raising=False)
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    _cuda._build.cache_clear()
    yield calls, tmp_path
    _cuda._build.cache_clear()


def test_first_build_says_what_it_builds_and_leaves_the_environment_alone(fake_build, capsys, monkeypatch):
    calls, _ = fake_build
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    module, reason = _cuda._build()
    assert module is None and reason.startswith("the CUDA extension failed to build: stub")
    err = capsys.readouterr().err
    assert "sparsek: building the CUDA kernels for sm_90a" in err and len(err.strip().splitlines()) == 1
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    (kwargs,) = calls
    flags = kwargs["extra_cuda_cflags"]
    # the arch flag is ours (torch then adds none); the C++ standard is torch's
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert not any(f.startswith("-std=") for f in flags + kwargs["extra_cflags"])


def test_cached_build_prints_nothing(fake_build, capsys):
    _, tmp_path = fake_build
    (tmp_path / "sparsek_cuda").mkdir()
    (tmp_path / "sparsek_cuda" / "sparsek_cuda.so").write_bytes(b"")
    _cuda._build()
    assert "building" not in capsys.readouterr().err


def test_a_prebuilt_binary_that_does_not_load_falls_back_to_the_jit_build(fake_build, capsys, monkeypatch, tmp_path):
    """A wheel built ahead of time for another torch: one line says so, then the JIT build runs."""
    calls, _ = fake_build
    broken = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_cuda, "prebuilt", lambda: broken)
    module, reason = _cuda._build()
    assert module is None and reason.startswith("the CUDA extension failed to build: stub")
    assert len(calls) == 1  # the JIT build was tried
    err = capsys.readouterr().err
    assert f"the prebuilt {broken.name} did not load" in err and "building the kernels just in time instead" in err


def test_the_ahead_of_time_build_uses_the_jit_flags():
    """setup.py reads sparsek/_flags.py, the file the JIT build imports: one list of flags."""
    from sparsek import _flags

    assert _cuda.CUDA_FLAGS is _flags.CUDA_FLAGS and _cuda.CXX_FLAGS is _flags.CXX_FLAGS
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"sparsek" / "_flags.py"' in setup_py and 'flags.CUDA_FLAGS' in setup_py
