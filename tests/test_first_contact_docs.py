"""Documents stand alone: every link and every path a document or a comment names is a file of
this repository, and nothing points at documents it does not have (a design document, a brief,
an issue tracker)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "ci" / "site-vendor"
# Files exempt from the pointer check below (and only from that one): none.
POINTER_EXEMPT: set[Path] = set()


def _files(*patterns: str) -> list[Path]:
    out = []
    for pattern in patterns:
        out += [p for p in sorted(REPO.glob(pattern)) if p.is_file() and VENDORED not in p.parents]
    return out


DOCS = _files("README.md", "docs/**/*.md", "benchmarks/**/README.md", "nsight/**/*.md", "ci/**/*.md")
CODE = _files("sparsek/**/*.py", "benchmarks/*.py", "nsight/**/*.py", "ci/*.py", "ci/*.sh", "Makefile", ".ci/run")

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository path named in prose or a comment: a top-level folder, then a file with an extension.
_PATH = re.compile(r"(?<![\w/.-])((?:docs|sparsek|benchmarks|nsight|ci|tests|csrc)/[\w./-]*\.(?:md|py|sh|json|cu|cuh|h|png))\b")
# Outputs and placeholders, not files of the repository.
_NOT_A_FILE = re.compile(r"<|\*|\{|/X\.json|NAME|benchmarks/(?:html|local)/|/runs/\w*\.json$|\.partial")
_POINTER = re.compile(r"DESIGN(?: section|/)|\bthe (?:original )?brief\b|\bbrief's\b|\b(?:kernel|decode) issue\b|"
                      r"\bissue \d|\bthe issue's\b")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#+\s+(.*)$", doc.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_to_a_file_of_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^(?:https?|mailto):", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve()
        if not resolved.exists() or REPO not in resolved.parents:
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, broken


@pytest.mark.parametrize("path", DOCS + CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_named_is_a_file_of_the_repository(path):
    missing = sorted({name for name in _PATH.findall(path.read_text(encoding="utf-8"))
                      if not _NOT_A_FILE.search(name) and not (REPO / name).exists()})
    assert not missing, missing


@pytest.mark.parametrize("path", DOCS + CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_points_at_documents_the_repository_does_not_have(path):
    if path in POINTER_EXEMPT:
        pytest.skip("kept by the kernel lab book (see POINTER_EXEMPT)")
    found = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if _POINTER.search(line)]
    assert not found, found


def test_the_tiers_document_defines_every_tier_and_bar():
    from sparsek.bench.tiers import TIERS

    text = (REPO / "docs" / "tiers.md").read_text(encoding="utf-8")
    for tier in TIERS:
        assert f"| {tier.name} | {tier.title} |" in text, tier.name
        for peer in tier.peers:
            assert f"`{peer}`" in text, (tier.name, peer)
        if tier.brief_us_per_head is not None:
            assert f"{tier.brief_us_per_head:g}" in text and f"{tier.brief_speedup_over_sdpa:g}x" in text, tier.name
    assert "366.72" in text and "pipeline check" in text


def test_the_readme_example_runs_on_a_cpu_in_seconds():
    """The "Using it" example, as written, on the CPU branch (a subprocess that sees no GPU)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert "else (\"cpu\", torch.float32, " in code  # the CPU branch has its own, shorter S
    code += "\nassert out.shape == (B, Hq, S, D) and q.grad is not None and scores.grad is not None\n"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparsek:" not in done.stderr  # CPU tensors run the reference without a warning
    # A few seconds on an idle 2-core machine; the bound leaves room for a loaded CI machine.
    assert time.monotonic() - started < 120
