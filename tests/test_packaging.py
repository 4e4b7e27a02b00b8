"""A built wheel carries the CUDA sources: installed in a fresh virtual environment outside the
source tree, sparsek finds them and `python -m sparsek` says so (a CPU machine cannot run them; it
can find them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cu", ".cpp", ".h"))


class Venv:
    """A fresh virtual environment (``python -m venv --without-pip``) holding one installed wheel.

    The wheel goes into the environment's own site-packages (pip, without dependencies and without
    an index). torch is not installed again: a path file names the directory the running torch is
    installed in. That directory is added to sys.path after the environment's site-packages and is
    not a site directory, so its .pth files (an editable install of this checkout) do not run:
    only the installed wheel can provide ``sparsek``."""

    def __init__(self, root: Path, wheel: Path):
        import torch

        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True,
                       timeout=300)
        self.python = root / "bin" / "python"
        self.site = Path(self.run("import sysconfig; print(sysconfig.get_paths()['purelib'])", root).stdout.strip())
        (self.site / "_outer_torch.pth").write_text(f"{Path(torch.__file__).resolve().parents[1]}\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(self.site),
                        str(wheel)], check=True, capture_output=True, timeout=600)

    def run(self, code: str, cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
        """``python -c code`` in the environment, from cwd (outside the source tree), PYTHONPATH unset."""
        environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
        return subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=environ, cwd=cwd)


def _wheel(out: Path, **env) -> Path:
    # setuptools builds in the tree: build/ and *.egg-info are ignored by git
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                          str(REPO)], capture_output=True, text=True, timeout=3600, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-4000:]
    (wheel,) = out.glob("sparsek-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Venv:
    """The wheel built from this checkout, installed (without dependencies) in a fresh virtual environment."""
    return Venv(tmp_path_factory.mktemp("venv"), _wheel(tmp_path_factory.mktemp("wheels")))


def test_wheel_carries_the_kernel_sources(installed, tmp_path):
    res = installed.run("import sparsek, sparsek._cuda as c; print(sparsek.__file__); print(c.CSRC)", tmp_path)
    assert res.returncode == 0, res.stderr
    module_file, csrc = res.stdout.split()
    assert Path(module_file).is_relative_to(installed.site), "imported the source tree, not the installed wheel"
    assert Path(csrc) == installed.site / "sparsek" / "csrc"
    assert sorted(p.name for p in Path(csrc).iterdir()) == KERNEL_FILES


def test_installed_package_reports_its_kernels(installed, tmp_path):
    res = installed.run("import runpy; runpy.run_module('sparsek', run_name='__main__')", tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"kernel sources: {installed.site / 'sparsek' / 'csrc'} (present)" in res.stdout
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
    wheel = _wheel(tmp_path_factory.mktemp("aot-wheels"), SPARSEK_BUILD_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    assert "none-any" not in wheel.name, f"{wheel.name}: a wheel with compiled code is platform-specific"
    venv = Venv(tmp_path_factory.mktemp("aot-venv"), wheel)
    code = ("import sparsek._cuda as c, torch\n"
            "b = c.prebuilt(); print(b)\n"
            "torch.ops.load_library(str(b))\n"
            "print(all(hasattr(torch.ops.sparsek_cuda, op) for op in ('select', 'attention_fwd', 'attention_bwd')))\n")
    res = venv.run(code, tmp_path)
    assert res.returncode == 0, res.stderr
    binary, registered = res.stdout.split()
    assert Path(binary).parent == venv.site / "sparsek" and Path(binary).name.startswith("_C"), binary
    assert registered == "True"
    res = venv.run("import runpy; runpy.run_module('sparsek', run_name='__main__')", tmp_path)
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
        wheel = _wheel(tmp_path_factory.mktemp("gpu-aot-wheels"), SPARSEK_BUILD_CUDA="1",
                       MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        venv = Venv(tmp_path_factory.mktemp("gpu-aot-venv"), wheel)
    else:
        venv = installed
    res = venv.run(_RUN_ON_GPU, tmp_path, timeout=1800, TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert f"sparsek from {venv.site}" in res.stdout
    if aot:
        assert f"extension {venv.site / 'sparsek'}" in res.stdout and "_C" in res.stdout
        assert "building the CUDA kernels" not in res.stderr
    else:
        assert "extension just in time" in res.stdout
        assert res.stderr.count("sparsek: building the CUDA kernels for sm_90a") == 1, res.stderr
