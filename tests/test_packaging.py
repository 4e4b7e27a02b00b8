"""A built wheel carries the CUDA sources: installed outside the source tree, sparsek finds them
and `python -m sparsek` says so (a CPU machine cannot run them; it can find them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cu", ".cpp", ".h"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies) into a fresh folder."""
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    # setuptools builds in the tree: build/ and *.egg-info are ignored by git
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO))
    (wheel,) = wheels.glob("sparsek-*.whl")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel))
    return target


def _python(target, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)  # outside the source tree


def test_wheel_carries_the_kernel_sources(installed, tmp_path):
    res = _python(installed, "import sparsek, sparsek._cuda as c; print(sparsek.__file__); print(c.CSRC)", tmp_path)
    assert res.returncode == 0, res.stderr
    module_file, csrc = res.stdout.split()
    assert Path(module_file).is_relative_to(installed), "imported the source tree, not the installed wheel"
    assert Path(csrc) == installed / "sparsek" / "csrc"
    assert sorted(p.name for p in Path(csrc).iterdir()) == KERNEL_FILES


def test_installed_package_reports_its_kernels(installed, tmp_path):
    res = _python(installed, "import runpy; runpy.run_module('sparsek', run_name='__main__')", tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"kernel sources: {installed / 'sparsek' / 'csrc'} (present)" in res.stdout
    if "GPU: none" in res.stdout:
        assert "forward kernels: do not run here: CUDA is not available" in res.stdout


def _cuda_build_tools() -> str | None:
    """Why the ahead-of-time build cannot run here, or None (torch with CUDA, and nvcc)."""
    import shutil

    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build: CUDAExtension needs torch's CUDA libraries"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")):
        return "no CUDA toolkit (nvcc) found by torch.utils.cpp_extension"
    # torch's CUDA headers include the CUDA libraries' headers (cusparse.h, cublas_v2.h): a toolkit
    # without them, or pip's nvidia packages not on CPATH, cannot build any CUDA extension.
    dirs = [Path(CUDA_HOME) / "include", *(Path(d) for d in os.environ.get("CPATH", "").split(os.pathsep) if d)]
    if not any((d / "cusparse.h").exists() for d in dirs):
        return f"cusparse.h is in neither {CUDA_HOME}/include nor CPATH (torch's CUDA headers include it)"
    return None


@pytest.mark.slow
def test_ahead_of_time_wheel_carries_the_compiled_kernels(tmp_path_factory, tmp_path):
    """SPARSEK_BUILD_CUDA=1 compiles the extension into the wheel (sparsek/_C*.so); installed
    outside the source tree, sparsek finds it, `python -m sparsek` reports it, and it loads and
    registers the ops (no GPU is needed to load it, only to run it)."""
    reason = _cuda_build_tools()
    if reason:
        pytest.skip(reason)
    wheels, target = tmp_path_factory.mktemp("aot-wheels"), tmp_path_factory.mktemp("aot-site")
    env = {**os.environ, "SPARSEK_BUILD_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(wheels), str(REPO)], capture_output=True, text=True, timeout=3600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = wheels.glob("sparsek-*.whl")
    assert "none-any" not in wheel.name, f"{wheel.name}: a wheel with compiled code is platform-specific"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import sparsek._cuda as c, torch\n"
            "b = c.prebuilt(); print(b)\n"
            "torch.ops.load_library(str(b))\n"
            "print(all(hasattr(torch.ops.sparsek_cuda, op) for op in ('select', 'attention_fwd', 'attention_bwd')))\n")
    res = _python(target, code, tmp_path)
    assert res.returncode == 0, res.stderr
    binary, registered = res.stdout.split()
    assert Path(binary).parent == target / "sparsek" and Path(binary).name.startswith("_C"), binary
    assert registered == "True"
    res = _python(target, "import runpy; runpy.run_module('sparsek', run_name='__main__')", tmp_path)
    assert res.returncode == 0 and f"prebuilt kernels: {binary}" in res.stdout, res.stdout + res.stderr


def test_a_setup_flag_other_than_0_or_1_is_refused(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "setup.py"), "--name"], capture_output=True, text=True,
                         env={**os.environ, "SPARSEK_BUILD_CUDA": "yes"}, cwd=tmp_path, timeout=120)
    assert res.returncode != 0 and "SPARSEK_BUILD_CUDA must be 0 or 1, got 'yes'" in res.stderr
