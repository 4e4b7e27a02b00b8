"""What a new user reads first: help texts that name the choices, results that land where git
ignores them unless saved on purpose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsek.bench import cli, runner
from sparsek.bench.cases import CASES, DEFAULT_CASES
from sparsek.bench.impls import IMPLS

REPO = Path(__file__).resolve().parents[1]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "tiers"])
def test_run_help_lists_every_case_and_implementation_of_the_registry(command, capsys):
    out = _help([command, "--help"], capsys)
    for name, case in CASES.items():
        assert f"  {name} " in out and case.describe() in out, name
    for impl_id in IMPLS:
        assert f"  {impl_id} " in out, impl_id
    for names in DEFAULT_CASES.values():
        assert ", ".join(names) in out
    assert "learn-quick" in out and "--save" in out and "benchmarks/local/" in out


def test_the_help_of_other_commands_does_not_load_the_registry(capsys):
    out = _help(["compare", "--help"], capsys)
    assert "cpu-smoke" not in out


@pytest.fixture
def planned(monkeypatch):
    """cli `run` up to runner.run: the arguments it would run with (no benchmark runs)."""
    seen = {}

    def fake_run(cases, impls, **kwargs):
        seen.update(kwargs, cases=cases)
        raise SystemExit(0)

    monkeypatch.setattr(runner, "run", fake_run)
    return seen


def test_results_go_to_the_ignored_local_folder_unless_saved(planned):
    with pytest.raises(SystemExit):
        cli.main(["run", "--case", "cpu-smoke"])
    assert planned["json_path"] is None and planned["folder"] == runner.LOCAL_DIR == Path("benchmarks/local")
    with pytest.raises(SystemExit):
        cli.main(["run", "--case", "cpu-smoke", "--save"])
    assert planned["folder"] == runner.RUNS_DIR == Path("benchmarks/runs")


def test_save_and_json_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--case", "cpu-smoke", "--save", "--json", "x.json"])
    assert done.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_default_results_path_names_the_run():
    import datetime as dt

    started = dt.datetime(2026, 12, 1, 4, 13, 16, tzinfo=dt.timezone.utc)
    fp = {"name": "NVIDIA H200", "git": {"commit": "5d28bbb0123"}}
    assert runner.default_json_path(fp, started) == Path("benchmarks/local/20261201T041316Z-nvidia-h200-5d28bbb.json")
    assert runner.default_json_path(fp, started, runner.RUNS_DIR).parent == Path("benchmarks/runs")


def test_learn_help_has_a_program_name_and_described_choices():
    from sparsek.learn.bench import CASES as LEARN_CASES
    from sparsek.learn.model import VARIANTS

    done = subprocess.run([sys.executable, "-m", "sparsek.learn", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("usage: python -m sparsek.learn") and "__main__.py" not in out
    for name, cfg in LEARN_CASES.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))  # its description line
        assert f"{cfg.task.seq_len} tokens" in line and f"{cfg.steps} steps" in line, line
    for variant in VARIANTS:
        assert any(line.strip().startswith(variant + " ") or line.strip().startswith(variant + ":")
                   for line in out.splitlines()), variant
