"""The command line, as a new user would try it: a tiny saved model answers in a subprocess;
bad input gives one line `mlmamba: error: ...` and a non-zero exit, never a traceback."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mlmamba.cli import main
from mlmamba.vlm import MLMamba

from test_vlm import cobra_parts, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model directory and an image file."""
    d = tmp_path_factory.mktemp("cli")
    seed = int(os.environ.get("MLMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"model seed={seed} (MLMAMBA_TEST_SEED={seed} replays it)")
    tiny_model(seed).save_pretrained(d / "model")
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(45, 61, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(d / "cat.png")
    return d


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mlmamba", *map(str, args)], capture_output=True,
                       env=env, cwd=ROOT, timeout=120)
    # decoded by hand: text mode would turn a generated "\r" into "\n" (universal newlines)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def test_subprocess_answers_prompt(saved):
    r = run_cli("generate", "--model", saved / "model", "--image", saved / "cat.png",
                "--prompt", "What is in the picture?", "--max-new-tokens", 7)
    assert r.returncode == 0, r.stderr
    model = MLMamba.from_pretrained(saved / "model")
    want = model.generate(str(saved / "cat.png"), "What is in the picture?", max_new_tokens=7)
    assert r.stdout == want.texts[0] + "\n"
    timing = r.stderr.strip().splitlines()[-1]
    for word in ("vision", "connector", "prefill", "decode", "tokens/s"):
        assert word in timing, timing


def test_subprocess_error_is_one_line(saved):
    r = run_cli("generate", "--model", saved / "model", "--image", saved / "missing.png")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"mlmamba: error: --image {saved / 'missing.png'}: no such file"]
    assert "Traceback" not in r.stderr and r.stdout == ""


def error_line(capsys, argv, code=1):
    with pytest.raises(SystemExit) as e:
        sys.exit(main([str(a) for a in argv]))
    assert e.value.code == code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    return lines[0]


def test_bad_inputs(saved, tmp_path, capsys):
    m, img = saved / "model", saved / "cat.png"
    assert "no such directory" in error_line(capsys, ["generate", "--model", tmp_path / "x", "--image", img])
    (tmp_path / "notes.png").write_text("not an image")
    assert "cannot read" in error_line(capsys, ["generate", "--model", m, "--image", tmp_path / "notes.png"])
    tiny_model(0).lm.save_pretrained(tmp_path / "lm")
    assert "not an mlmamba VLM config" in error_line(
        capsys, ["generate", "--model", tmp_path / "lm", "--image", img])
    assert "give --image and/or --prompt" in error_line(capsys, ["generate", "--model", m])
    for flag, value in (("--temperature", "-1"), ("--max-new-tokens", "0"), ("--top-p", "0"),
                        ("--dtype", "int8")):
        line = error_line(capsys, ["generate", "--model", m, "--image", img, flag, value], code=2)
        assert flag in line and line.startswith("mlmamba generate: error:")
    assert "required" in error_line(capsys, [], code=2)


def test_convert_errors(tmp_path, capsys, rng):
    torch.save({"model": cobra_parts(rng, 80, 64)}, tmp_path / "cobra.pt")
    tiny_model(0).tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    line = error_line(capsys, ["convert", "--official", tmp_path / "cobra.pt", "--tokenizer",
                               tmp_path / "tokenizer.json", "--out", tmp_path / "o"])
    assert "Cobra checkpoint: its LM is Mamba-1" in line
    line = error_line(capsys, ["convert", "--official", tmp_path / "cobra.pt", "--tokenizer",
                               tmp_path / "none.json", "--out", tmp_path / "o"])
    assert "no tokenizer.json" in line
