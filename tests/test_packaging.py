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
