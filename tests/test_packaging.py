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


# One forward + backward on the kernels from an installed package, checked against the float64
# reference on the CPU; a fallback to the reference warns, and RuntimeWarning is an error here.
_RUN_ON_GPU = """
import warnings, torch, sparsek, sparsek._cuda as c
from sparsek import reference as ref, selection as sel_mod
warnings.simplefilter("error", RuntimeWarning)
print("sparsek from", sparsek.__file__)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, 333, 128, generator=g) for h in (8, 2, 2))
u = torch.randn(1, 2, 333, generator=g)
leaves = [t.cuda().bfloat16().requires_grad_() for t in (q, k, v)] + [u.cuda().requires_grad_()]
out = sparsek.sparsek_attention(*leaves, topk=40, window=16)
out.backward(torch.ones_like(out))
torch.cuda.synchronize()
want, _ = ref.attention_dense(*(t.detach().cpu().double() for t in leaves), 40, 16, 128 ** -0.5)
err = (out.detach().cpu().double() - want).abs().max().item()
grads_finite = all(bool(torch.isfinite(t.grad).all()) for t in leaves)
print("max abs error", err, "grads finite", grads_finite)
assert err < 3e-2 and grads_finite
print("extension", c.prebuilt() or "just in time")
"""


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("aot", [True, False], ids=["ahead-of-time", "just-in-time"])
def test_installed_wheel_runs_the_kernels_on_the_gpu(aot, installed, tmp_path_factory, tmp_path):
    """On a GPU machine, from an installed wheel and outside the source tree: the ahead-of-time
    wheel's binary, or the plain wheel's packaged sources built just in time (into an empty
    extension cache, so nothing built from the checkout is reused), run forward and backward."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if aot:
        reason = _cuda_build_tools()
        if reason:
            pytest.skip(reason)
        wheels, target = tmp_path_factory.mktemp("gpu-aot-wheels"), tmp_path_factory.mktemp("gpu-aot-site")
        env = {**os.environ, "SPARSEK_BUILD_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], check=True, capture_output=True, timeout=3600, env=env)
        (wheel,) = wheels.glob("sparsek-*.whl")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       check=True, capture_output=True, timeout=600)
    else:
        target = installed
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    res = subprocess.run([sys.executable, "-c", _RUN_ON_GPU], capture_output=True, text=True, timeout=1800, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert f"sparsek from {target}" in res.stdout
    if aot:
        assert f"extension {target / 'sparsek'}" in res.stdout and "_C" in res.stdout
        assert "building the CUDA kernels" not in res.stderr
    else:
        assert "extension just in time" in res.stdout
        assert res.stderr.count("sparsek: building the CUDA kernels for sm_90a") == 1, res.stderr
