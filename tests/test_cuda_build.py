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
    cached = tmp_path / "sparsek_cuda" / _cuda.source_digest()
    cached.mkdir(parents=True)
    (cached / "sparsek_cuda.so").write_bytes(b"")
    _cuda._build()
    assert "building" not in capsys.readouterr().err


def test_the_build_directory_is_named_by_the_sources(fake_build):
    calls, tmp_path = fake_build
    _cuda._build()
    (kwargs,) = calls
    assert kwargs["build_directory"] == str(tmp_path / "sparsek_cuda" / _cuda.source_digest())


def test_the_digest_follows_contents_not_file_times(tmp_path):
    """A source older-dated than the last build but different from it must not reuse that build."""
    for name in ("binding.cpp", "kernel.cu", "tile.h", "notes.txt"):
        (tmp_path / name).write_text(f"// {name}\n")
    first = _cuda.source_digest(tmp_path)
    os.utime(tmp_path / "kernel.cu", (0, 0))  # only the time changes
    assert _cuda.source_digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not a source\n")
    assert _cuda.source_digest(tmp_path) == first
    (tmp_path / "tile.h").write_text("// tile.h, edited\n")
    os.utime(tmp_path / "tile.h", (0, 0))  # edited, yet dated 1970
    assert _cuda.source_digest(tmp_path) != first


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
