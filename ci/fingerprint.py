"""Identify this machine for asv, register it, and say whether the GPU is throttled.

    python ci/fingerprint.py [--fingerprint FILE] [--out-dir DIR]

- FILE is the JSON of `sparsek-bench env --json`, the harness's NVML fingerprint of the first
  visible GPU: its name, driver and CUDA runtime become the asv machine's keys, and any
  `"throttled": true` in it marks the run. Without FILE (the harness failed to start) nvidia-smi
  gives name and driver, torch the CUDA version, and the throttling state is `unknown`.
- The clock policy comes from $SPARSEK_CLOCK_POLICY (say `locked-1980MHz` when you lock clocks
  with `nvidia-smi -lgc`; default `default`).
- The asv machine name is $SPARSEK_ASV_MACHINE, else `<hostname>-<gpu>` (e.g. `node7-nvidia-h200`),
  so results of different cards never share a history. The record goes to ~/.asv-machine.json with
  asv's own defaults (os, cpu, ram) plus the keys gpu, gpu_driver, cuda, clock_policy: asv copies
  them into results/<machine>/machine.json and every result's params.

Writes DIR/machine.env (SPARSEK_ASV_MACHINE, SPARSEK_GPU, SPARSEK_THROTTLED, shell-quoted, for
`source`), adds machine= and throttled= to $GITHUB_OUTPUT when set, and prints a GitHub warning
annotation when throttled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

NO_GPU = "cpu"


def slug(text: str) -> str:
    """Lower-case [a-z0-9.-] only: safe in a directory name, an asv machine name and a shell line."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def find_throttled(fingerprint) -> bool | None:
    """True if any "throttled" key in the fingerprint is true, False if all are false, None if none."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "throttled" and isinstance(value, bool):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(fingerprint)
    return any(found) if found else None


def identity_from_fingerprint(fingerprint: dict) -> dict[str, str]:
    """{"gpu", "gpu_driver", "cuda"} from the harness's fingerprint (sparsek.bench.device)."""
    on_gpu = fingerprint.get("source") in ("nvml", "torch")
    return {
        "gpu": str(fingerprint.get("name") or "unknown") if on_gpu else NO_GPU,
        "gpu_driver": str(fingerprint.get("driver") or ""),
        "cuda": str((fingerprint.get("software") or {}).get("cuda_runtime") or ""),
    }


def identity_from_system() -> dict[str, str]:
    """The same keys without the harness: nvidia-smi for the first visible GPU, torch for CUDA."""
    return query_gpu() | {"cuda": torch_cuda()}


def query_gpu() -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        return {"gpu": NO_GPU, "gpu_driver": ""}
    cmd = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible:
        cmd.append(f"--id={visible}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    if not out:
        return {"gpu": NO_GPU, "gpu_driver": ""}
    name, _, driver = out[0].partition(",")
    return {"gpu": name.strip(), "gpu_driver": driver.strip()}


def torch_cuda() -> str:
    try:
        import torch
    except ImportError:
        return ""
    return torch.version.cuda or ""


def machine_record(identity: dict[str, str], clock_policy: str, name: str | None) -> dict[str, str]:
    machine = slug(name) if name else f"{slug(socket.gethostname())}-{slug(identity['gpu'])}"
    keys = ("gpu", "gpu_driver", "cuda")
    return {"machine": machine, **{k: identity[k] for k in keys}, "clock_policy": clock_policy}


def register(record: dict[str, str]) -> None:
    """Save the record in ~/.asv-machine.json through asv itself, on top of asv's defaults."""
    from asv.machine import Machine, MachineCollection

    info = Machine.get_defaults()
    info.update(record)
    MachineCollection.save(record["machine"], info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fingerprint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fingerprint", type=Path, help="JSON of `sparsek-bench env --json`")
    parser.add_argument("--out-dir", type=Path, default=Path("out"), help="where machine.env goes (default out/)")
    parser.add_argument("--no-register", action="store_true", help="do not touch ~/.asv-machine.json")
    args = parser.parse_args(argv)

    throttled = None
    if args.fingerprint and args.fingerprint.is_file():
        fingerprint = json.loads(args.fingerprint.read_text(encoding="utf-8"))
        identity = identity_from_fingerprint(fingerprint)
        throttled = find_throttled(fingerprint)
    else:
        identity = identity_from_system()
    state = {True: "true", False: "false", None: "unknown"}[throttled]
    record = machine_record(
        identity, os.environ.get("SPARSEK_CLOCK_POLICY", "default"), os.environ.get("SPARSEK_ASV_MACHINE")
    )
    if not args.no_register:
        register(record)

    env = {"SPARSEK_ASV_MACHINE": record["machine"], "SPARSEK_GPU": slug(identity["gpu"]), "SPARSEK_THROTTLED": state}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "machine.env").write_text(
        "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()), encoding="utf-8"
    )
    github_output = os.environ.get("GITHUB_OUTPUT")
    if github_output:
        with open(github_output, "a", encoding="utf-8") as f:
            f.write(f"machine={record['machine']}\nthrottled={state}\n")

    print(json.dumps(record | {"throttled": state}, indent=2))
    if throttled:
        message = f"{identity['gpu']} on {record['machine']} reported throttling: treat these timings with care"
        if os.environ.get("GITHUB_ACTIONS") == "true":
            print(f"::warning title=GPU throttled::{message}")
        else:
            print(f"warning: {message}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
