"""The default build makes sm_90a and sm_80 code from the same sources (setup.py:
MLMAMBA_CUDA_ARCHS "90a;80"), so instructions that only sm_90 has (TMA, mbarrier waits, proxy
fences, wgmma, setmaxnreg, stmatrix, vector float reductions) may appear only inside the
helpers of csrc/common/tma.cuh and csrc/ssd/wgmma.cuh, each under its architecture guard
(elsewhere they trap). A bare use in a kernel file fails the sm_80 pass of `pip install` with a
ptxas error (it did once, unnoticed: CI builds 90a only)."""
import re
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SM90_ONLY = re.compile(r"setmaxnreg|mbarrier\.(try_wait|arrive\.expect_tx)|cp\.async\.bulk|"
                       r"fence\.proxy\.async|fence\.mbarrier_init|wgmma\.|stmatrix|"
                       r"red\.[a-z.:]*\.v[248]\.f(16|32)")
GUARDED = {"common/tma.cuh", "ssd/wgmma.cuh"}
GUARD = re.compile(r"#if (MLM_SM90|defined\(__CUDA_ARCH_FEAT_SM90_ALL\))")


def asm_strings(text):
    """(offset, line, first statement) of each inline asm."""
    for m in re.finditer(r"asm\s+volatile\s*\(", text):
        line = text.count("\n", 0, m.start()) + 1
        yield m.start(), line, text[m.start():m.start() + 400].split(";")[0]


def test_sm90_instructions_only_in_guarded_helpers():
    bad = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cu", ".cuh", ".h", ".cpp"):
            continue
        rel = path.relative_to(CSRC).as_posix()
        text = path.read_text()
        for start, line, stmt in asm_strings(text):
            if not SM90_ONLY.search(stmt):
                continue
            if rel not in GUARDED:
                bad.append(f"{rel}:{line}")
                continue
            # the nearest preprocessor line above the asm must open an sm_90 guard
            conds = list(re.finditer(r"^#(if.*|else|endif)$", text[:start], re.M))
            if not conds or not GUARD.match(conds[-1].group(0)):
                bad.append(f"{rel}:{line} (not under an sm_90 guard)")
    assert not bad, "sm_90-only instructions outside the guarded helpers: " + ", ".join(bad)
