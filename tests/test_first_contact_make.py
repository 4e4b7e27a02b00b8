"""The README's two commands on a fresh machine: the Makefile's choice of interpreter and torch.

Runs the real Makefile in a scratch folder with a stub interpreter: ``python3 -m venv DIR`` makes
DIR/bin/python (the stub again), and every other call is logged and answered from environment
variables (is torch installed, is the torch index reachable). No network, no real install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

STUB = """#!/bin/bash
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
  dir="${*: -1}"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; echo "venv $*" >> "$STUB_LOG"; exit 0
fi
echo "$0 $*" >> "$STUB_LOG"
case "$*" in
  *find_spec*) [ -n "${STUB_TORCH:-}" ] ;;
  *urllib*) [ -n "${STUB_REACHABLE:-}" ] ;;
  *) exit 0 ;;
esac
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    stub = tmp_path / "stub-python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return tmp_path


def make(folder: Path, *args: str, gpu: bool = False, torch: bool = False, reachable: bool = False,
         virtual_env: Path | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`make ARGS` in the scratch folder; returns the run and the stub's log of calls."""
    log = folder / "calls.log"
    log.unlink(missing_ok=True)
    smi = folder / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\n")
        smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "TORCH_SPEC", "TORCH_INDEX", "VENV", "VENV_ARGS", "PYTHON")}
    env.update(STUB_LOG=str(log), STUB_TORCH="1" if torch else "", STUB_REACHABLE="1" if reachable else "")
    if virtual_env is not None:
        env["VIRTUAL_ENV"] = str(virtual_env)
    done = subprocess.run(["make", "--no-print-directory", f"BOOTSTRAP_PYTHON={folder / 'stub-python3'}",
                           f"NVIDIA_SMI={smi if gpu else folder / 'no-nvidia-smi'}", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    return done, (log.read_text().splitlines() if log.exists() else [])


def pip_installs(calls: list[str]) -> list[str]:
    return [c.split(" -m pip install ", 1)[1] for c in calls if " -m pip install " in c]


def test_no_virtualenv_active_makes_dot_venv_and_installs_the_cpu_torch_first(scratch):
    done, calls = make(scratch, "test")
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls[0] == "venv -m venv --system-site-packages .venv"
    assert (scratch / ".venv" / "bin" / "python").exists()
    # The index is unreachable in this stub: pip goes on to its own configured sources at once.
    assert pip_installs(calls) == [f"--retries 0 --index-url {CPU_INDEX} torch", "-e .[test]"]
    assert calls[-1] == ".venv/bin/python -m pytest -q"
    assert all(c.startswith(".venv/bin/python ") for c in calls[1:])
    assert not [c for c in pip_installs(calls) if " -q" in f" {c}"]  # pip's progress is shown
    assert "creating the virtualenv .venv" in done.stdout


def test_a_reachable_index_is_used_with_pips_retries(scratch):
    _, calls = make(scratch, "bench", reachable=True)
    assert pip_installs(calls) == [f"--index-url {CPU_INDEX} torch", "-e .[bench]"]
    assert calls[-1] == ".venv/bin/python -m sparsek.bench.cli run --default"


def test_the_second_run_installs_nothing(scratch):
    make(scratch, "test")
    done, calls = make(scratch, "test")
    assert done.returncode == 0 and calls == [".venv/bin/python -m pytest -q"]
    stamp = scratch / ".venv" / ".sparsek-installed-test"
    os.utime(stamp, (0, 0))  # older than pyproject.toml, as after an edit of its dependencies
    _, calls = make(scratch, "test")
    assert "-e .[test]" in pip_installs(calls)


def test_an_active_virtualenv_is_used_as_it_is(scratch):
    env_dir = scratch / "mine"
    (env_dir / "bin").mkdir(parents=True)
    shutil.copy(scratch / "stub-python3", env_dir / "bin" / "python")
    done, calls = make(scratch, "test", virtual_env=env_dir, torch=True)
    assert done.returncode == 0, done.stderr
    assert not (scratch / ".venv").exists()
    assert not [c for c in calls if c.startswith("venv ")]
    assert pip_installs(calls) == ["-e .[test]"]  # torch is there already
    assert all(c.startswith(f"{env_dir}/bin/python ") for c in calls)


def test_a_gpu_machine_takes_torch_from_pypi_with_sparsek(scratch):
    done, calls = make(scratch, "test", gpu=True)
    assert pip_installs(calls) == ["-e .[test]"]
    assert "NVIDIA GPU" in done.stdout


def test_torch_spec_and_an_empty_index_choose_the_build(scratch):
    _, calls = make(scratch, "test", "TORCH_INDEX=", "TORCH_SPEC=torch==2.13.0")
    assert pip_installs(calls) == ["torch==2.13.0", "-e .[test]"]
    assert not [c for c in calls if "urllib" in c]  # no index to probe


def test_python_on_the_command_line_is_used_without_a_virtualenv(scratch):
    done, calls = make(scratch, "test", f"PYTHON={scratch / 'stub-python3'}", torch=True)
    assert done.returncode == 0, done.stderr
    assert not (scratch / ".venv").exists()
    assert pip_installs(calls) == ["-e .[test]"]


def test_a_half_made_venv_folder_is_refused_not_replaced(scratch):
    (scratch / ".venv").mkdir()
    (scratch / ".venv" / "keep").write_text("x")
    done, _ = make(scratch, "test")
    assert done.returncode != 0 and "exists but has no bin/python" in done.stderr
    assert (scratch / ".venv" / "keep").exists()


def test_the_local_results_folder_and_the_venv_are_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/local/x.json"], cwd=REPO)
    assert ignored.returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=REPO).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/runs/x.json"], cwd=REPO).returncode == 1
