"""Static instruction counts of a kernel's loops, read from its SASS (the lab book's static counts).

    python ci/sass_loops.py csrc/attention_fwd_ws.cu --function "attention_fwd_ws_kernelILi128E13__nv_bfloat16"
    python ci/sass_loops.py --sass dump.txt --function attention_bwd_kernel --min 500

Compiles the file with ci/compile_kernels.sh's nvcc flags (sm_90a), disassembles it with
`cuobjdump -sass` (not in every CUDA install: the `nvidia-cuda-cuobjdump` wheel carries one; set
CUOBJDUMP or put it on PATH), and for every function whose mangled name contains --function
prints its loops (a backward branch and its target), each loop's instruction count and, for the
largest, the count of each opcode. Counts are static: both sides of a branch inside the loop are
included, whatever runs. docs/perf-notes.md quotes these counts when it compares kernel versions.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ci/compile_kernels.sh's flags: torch's extension macros, so what is counted is what gets built.
NVCC_FLAGS = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr", "--use_fast_math"]

_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)* (?:\S+, )?0x([0-9a-f]+)")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Each function of a `cuobjdump -sass` listing: its (address, instruction) pairs in order."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2)))
    return out


def loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int, int]]:
    """(first address, last address, instructions) of every backward branch's range, by address."""
    out = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) <= addr:
            start = int(m.group(1), 16)
            out.append((start, addr, sum(1 for a, _ in instrs if start <= a <= addr)))
    return sorted(out)


def opcode(text: str) -> str:
    """The opcode without its predicate and modifiers: `@!P0 HGMMA.64x64x16.F32 ...` -> `HGMMA`."""
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0].split(".")[0]


def histogram(instrs: list[tuple[int, str]], start: int, end: int) -> collections.Counter:
    return collections.Counter(opcode(t) for a, t in instrs if start <= a <= end)


def disassemble(cu: Path, nvcc: str, cuobjdump: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / (cu.name + ".o")
        subprocess.run([nvcc, *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", "-c", str(cu), "-o", str(obj)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return subprocess.run([cuobjdump, "-sass", str(obj)], check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sass_loops.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("cu", nargs="?", type=Path, help="a .cu file to compile (or --sass)")
    parser.add_argument("--sass", type=Path, help="a saved `cuobjdump -sass` listing instead of compiling")
    parser.add_argument("--function", default="", help="substring of the mangled function names to report")
    parser.add_argument("--min", type=int, default=50, help="report loops of at least this many instructions")
    parser.add_argument("--top", type=int, default=40, help="opcodes listed for the largest loop")
    args = parser.parse_args(argv)
    if args.sass:
        sass = args.sass.read_text(encoding="utf-8")
    elif args.cu:
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
        cuobjdump = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
        if not nvcc or not cuobjdump:
            print("sass_loops.py: needs nvcc and cuobjdump (NVCC, CUOBJDUMP or PATH); "
                  "`pip download nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` has cuobjdump", file=sys.stderr)
            return 2
        sass = disassemble(args.cu, nvcc, cuobjdump)
    else:
        parser.error("give a .cu file or --sass")
    found = {name: ins for name, ins in functions(sass).items() if args.function in name}
    if not found:
        print(f"sass_loops.py: no function name contains {args.function!r}", file=sys.stderr)
        return 1
    for name, instrs in found.items():
        print(f"{name}: {len(instrs)} instructions")
        big = [lp for lp in loops(instrs) if lp[2] >= args.min]
        for start, end, n in big:
            print(f"  loop {start:#06x}-{end:#06x}: {n} instructions")
        if big:
            start, end, n = max(big, key=lambda lp: lp[2])
            top = histogram(instrs, start, end).most_common(args.top)
            print("  largest loop: " + ", ".join(f"{op} {count}" for op, count in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
