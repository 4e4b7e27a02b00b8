#!/usr/bin/env bash
# Job-started hook for a self-hosted GPU runner: refuses any job that would run a fork's code
# unless the workflow definition itself comes from the default branch.
#
# Install on the runner machine (not from a checkout: a job must not be able to change it):
#   sudo install -m 0755 ci/runner-hook.sh /opt/sparsek/runner-hook.sh
#   echo ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/sparsek/runner-hook.sh >> <runner dir>/.env
# and restart the runner service. A non-zero exit fails the job before any of its steps runs.
#
# Why: with `pull_request`, a fork's pull request runs the workflow files of the fork, so a fork
# can edit the `if:` that keeps it off this runner. The runner itself reads the event and refuses:
# - pull_request*, when the head repository is not this repository;
# - pull_request_target and workflow_run (which may handle fork code), unless the workflow file is
#   taken from the default branch - there pr.yml checks the maintainer's label and the labeller's
#   write access before any fork code is checked out;
# - anything from a repository other than $SPARSEK_RUNNER_REPOSITORY, when that is set.
# Pushes, schedules and manual dispatches need write access to the repository and pass.
#
# Test by hand: GITHUB_EVENT_NAME=pull_request GITHUB_EVENT_PATH=event.json \
#   GITHUB_REPOSITORY=owner/repo GITHUB_WORKFLOW_REF=owner/repo/.github/workflows/pr.yml@refs/pull/1/merge \
#   ci/runner-hook.sh
set -euo pipefail

python3 - <<'PY'
import json
import os
import sys

event_name = os.environ.get("GITHUB_EVENT_NAME", "")
repository = os.environ.get("GITHUB_REPOSITORY", "")
workflow_ref = os.environ.get("GITHUB_WORKFLOW_REF", "")
allowed_repository = os.environ.get("SPARSEK_RUNNER_REPOSITORY", "")
with open(os.environ["GITHUB_EVENT_PATH"], encoding="utf-8") as f:
    event = json.load(f)


def refuse(reason):
    print(f"::error title=Refused by the runner hook::{reason}")
    sys.exit(1)


if allowed_repository and repository != allowed_repository:
    refuse(f"this runner serves {allowed_repository}, not {repository}")

if event_name in ("pull_request", "pull_request_review", "pull_request_review_comment"):
    head_repo = ((event.get("pull_request") or {}).get("head") or {}).get("repo") or {}
    if head_repo.get("full_name") != repository:
        refuse(f"{event_name} from {head_repo.get('full_name') or 'a deleted fork'}: fork code on a self-hosted runner")
elif event_name in ("pull_request_target", "workflow_run"):
    default_ref = "refs/heads/" + ((event.get("repository") or {}).get("default_branch") or "")
    if not workflow_ref.endswith("@" + default_ref):
        refuse(f"{event_name} with a workflow from {workflow_ref or 'an unknown ref'}, not {default_ref}")
print(f"runner hook: {event_name} on {repository} allowed")
PY
