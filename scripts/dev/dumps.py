"""Shared by the *_dump.py dev scripts: a dump is {case: {gradient name: tensor}} saved with
torch.save; `compare` reports every gradient that differs between two dumps, and `cli` runs
`dump OUT.pt` / `compare A.pt B.pt`."""
import sys

import torch


def compare(a_path, b_path):
    """0 if every gradient of every case is bitwise equal, else 1 (each difference printed)."""
    a, b = torch.load(a_path), torch.load(b_path)
    bad = 0
    for name in a:
        for k in a[name]:
            if not torch.equal(a[name][k], b[name][k]):
                bad += 1
                d = (a[name][k].double() - b[name][k].double()).abs().max().item()
                print(f"DIFF {name} {k}: max abs {d:.3e}")
    print("bitwise equal" if not bad else f"{bad} gradients differ")
    return 1 if bad else 0


def cli(dump, doc):
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        print(doc)
        sys.exit(2)
