"""The schemas of csrc/registration.cpp and mlmamba_kernels/_schemas.py must agree."""
import re
from pathlib import Path

import torch

import mlmamba_kernels  # noqa: F401
from mlmamba_kernels._schemas import SCHEMAS

CPP = Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp"


def _cpp_schemas():
    text = CPP.read_text()
    out = {}
    for m in re.finditer(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
        out[schema.split("(")[0]] = schema
    return out


def _norm(s):
    return re.sub(r"\s+", " ", s).strip()


def test_python_table_matches_registration_cpp():
    cpp = _cpp_schemas()
    assert sorted(cpp) == sorted(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert _norm(cpp[name]) == _norm(schema), name


def test_every_op_is_defined_with_cpu_kernel():
    for name in SCHEMAS:
        qual = f"mlmamba::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), qual
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), qual


def test_build_info_names_every_op():
    info = mlmamba_kernels.build_info()
    assert set(info["backends"]) == {"ssd_scan", "ssd_state_update", "causal_conv1d",
                                     "causal_conv1d_update", "msc_scan"}
    for ops in info["backends"].values():
        assert set(ops.values()) <= {"cuda", "reference"}
