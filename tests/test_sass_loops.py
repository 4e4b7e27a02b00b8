"""ci/sass_loops.py: the loop finder and opcode counts behind the lab book's static counts (CPU).

The listing below has the shape `cuobjdump -sass` prints (two functions, predicated and modified
opcodes, a forward branch inside the loop and the loop's backward branch); the counts are worked
out by hand from it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

CI = Path(__file__).resolve().parent.parent / "ci"


def _load():
    spec = importlib.util.spec_from_file_location("ci_sass_loops", CI / "sass_loops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SL = _load()

LISTING = """
\tcode for sm_90a
\t\tFunction : _ZN7sparsek12kernel_aILi128EEEvv
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT ;  /* 0x0 */
        /*0030*/                   FADD.FTZ R2, R2, R3 ;                       /* 0x0 */
        /*0040*/              @!P0 BRA 0x60 ;                                  /* 0x0 */
        /*0050*/                   FMUL.FTZ R2, R2, R3 ;                       /* 0x0 */
        /*0060*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R88 ;  /* 0x0 */
        /*0070*/                   VOTE.ALL P0, P0 ;                           /* 0x0 */
        /*0080*/              @!P0 BRA 0x60 ;                                  /* 0x0 */
        /*0090*/                   ISETP.NE.AND P1, PT, R0, RZ, PT ;            /* 0x0 */
        /*00a0*/               @P1 BRA 0x20 ;                                  /* 0x0 */
        /*00b0*/                   EXIT ;                                      /* 0x0 */
\t\t..........
\t\tFunction : _ZN7sparsek12kernel_bILi64EEEvv
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x0 */
        /*0010*/                   EXIT ;                                      /* 0x0 */
"""


def test_functions_split_the_listing_by_name():
    fns = SL.functions(LISTING)
    assert list(fns) == ["_ZN7sparsek12kernel_aILi128EEEvv", "_ZN7sparsek12kernel_bILi64EEEvv"]
    assert len(fns["_ZN7sparsek12kernel_aILi128EEEvv"]) == 12
    assert fns["_ZN7sparsek12kernel_bILi64EEEvv"] == [(0, "MOV R1, c[0x0][0x28]"), (16, "EXIT")]


def test_loops_are_backward_branches_with_their_instruction_counts():
    instrs = SL.functions(LISTING)["_ZN7sparsek12kernel_aILi128EEEvv"]
    # the forward branch at 0x40 is not a loop; the wait loop 0x60-0x80 nests in 0x20-0xa0
    assert SL.loops(instrs) == [(0x20, 0xA0, 9), (0x60, 0x80, 3)]


def test_opcodes_drop_predicates_and_modifiers():
    assert SL.opcode("@!P0 BRA 0x60") == "BRA"
    assert SL.opcode("@UP1 HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT") == "HGMMA"
    assert SL.opcode("FADD.FTZ R2, R2, R3") == "FADD"
    instrs = SL.functions(LISTING)["_ZN7sparsek12kernel_aILi128EEEvv"]
    counts = SL.histogram(instrs, 0x20, 0xA0)
    assert counts == {"HGMMA": 1, "FADD": 1, "FMUL": 1, "BRA": 3, "SYNCS": 1, "VOTE": 1, "ISETP": 1}


def test_the_cli_reports_the_largest_loop_of_a_saved_listing(tmp_path, capsys):
    dump = tmp_path / "dump.txt"
    dump.write_text(LISTING, encoding="utf-8")
    assert SL.main(["--sass", str(dump), "--function", "kernel_a", "--min", "3"]) == 0
    out = capsys.readouterr().out
    assert "loop 0x0020-0x00a0: 9 instructions" in out and "loop 0x0060-0x0080: 3 instructions" in out
    assert "largest loop: BRA 3," in out
    assert "kernel_b" not in out
    assert SL.main(["--sass", str(dump), "--function", "no_such_kernel"]) == 1
