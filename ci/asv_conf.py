"""Write a copy of the project's asv.conf.json for one measurement: absolute paths, results redirected.

    python ci/asv_conf.py --checkout DIR --out FILE [--results DIR]
    python ci/asv_conf.py --checkout DIR --get KEY      (prints a key of that copy, e.g. html_dir)
    python ci/asv_conf.py --checkout DIR --out FILE --publish   (for asv publish: see below)

Two things in asv.conf.json get in the way of measuring an arbitrary checkout:
- `asv run -E existing` accepts no commit range and benchmarks the heads of `branches` instead,
  which fails where no local `main` exists (a pull request's detached merge commit, a worktree).
  The copy names `HEAD`: with --set-commit-hash asv only uses it to pick one commit.
- `results_dir` has no command-line override. ci/gate.sh sends base and head to separate scratch
  directories so that neither touches the committed benchmarks/results/ nor appends to the other
  (base and head may even be one commit in an A/A check).
With --publish the copy keeps `branches` (asv publish draws each branch's history) and, in GitHub
Actions, points `show_commit_url` at the repository being built ($GITHUB_SERVER_URL/$GITHUB_REPOSITORY),
so a fork's site links its own commits.
Every path in the copy is absolute, so it can live anywhere (asv resolves paths from the config
file's folder); the benchmarks still come from the checkout's benchmark_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

# asv.conf.json may carry // comments: asv reads it with json5. Without asv at hand, strip the
# comments that stand outside strings.
_COMMENT = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*')


def load_conf(conf_path: Path) -> dict:
    try:
        from asv.util import load_json
    except ImportError:
        return json.loads(_COMMENT.sub(lambda m: m.group(1) or "", conf_path.read_text(encoding="utf-8")))
    return load_json(str(conf_path), js_comments=True)


def derive(conf_path: Path, checkout: Path, results: Path | None = None, publish: bool = False) -> dict:
    conf = load_conf(conf_path)
    checkout = checkout.resolve()
    # asv's own defaults for the keys a config may leave out.
    defaults = {"benchmark_dir": "benchmarks", "results_dir": "results", "html_dir": "html", "env_dir": "env"}
    for key, default in defaults.items():
        conf[key] = str(checkout / conf.get(key, default))
    if results is not None:
        results = results.resolve()
        conf["results_dir"] = str(results)
        conf["html_dir"] = str(results.parent / (results.name + "-html"))
        conf["env_dir"] = str(results.parent / (results.name + "-env"))
    conf["repo"] = str(checkout)
    if publish:
        server, repository = os.environ.get("GITHUB_SERVER_URL"), os.environ.get("GITHUB_REPOSITORY")
        if server and repository:
            conf["show_commit_url"] = f"{server}/{repository}/commit/"
            conf["project_url"] = f"{server}/{repository}"
    else:
        conf["branches"] = ["HEAD"]
    conf.setdefault("version", 1)
    return conf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asv_conf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", required=True, type=Path, help="repository checkout with asv.conf.json")
    parser.add_argument("--results", type=Path, help="results_dir for the copy (default: the checkout's)")
    parser.add_argument("--out", type=Path, help="where to write the derived config")
    parser.add_argument("--get", metavar="KEY", help="print this key of the checkout's config and exit")
    parser.add_argument("--publish", action="store_true", help="for asv publish: keep branches, commit URL from GitHub")
    args = parser.parse_args(argv)
    conf_path = args.checkout / "asv.conf.json"
    if not conf_path.is_file():
        parser.error(f"--checkout {args.checkout}: no asv.conf.json there")
    if args.get:
        print(derive(conf_path, args.checkout)[args.get])
        return 0
    if args.out is None:
        parser.error("--out is required unless --get is given")
    conf = derive(conf_path, args.checkout, args.results, publish=args.publish)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
