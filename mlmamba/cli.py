"""Command line: `python -m mlmamba generate ...` and `python -m mlmamba convert ...`.

    python -m mlmamba generate --model DIR --image cat.jpg --prompt "What is this?"
    python -m mlmamba convert --official latest-checkpoint.pt --tokenizer tokenizer.json \\
        --dino DINO_DIR --siglip SIGLIP_DIR --out DIR

generate streams the answer to stdout and ends with a timing line on stderr. Any failure
(missing files, unreadable images, wrong checkpoint kinds, bad arguments) prints one line
`mlmamba: error: ...` and exits non-zero, without a traceback.
"""
import argparse
import os
import sys

__all__ = ["main"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _float_in(lo, hi, lo_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not ((v > lo) if lo_open else (v >= lo)) or v > hi:
            raise argparse.ArgumentTypeError(
                f"expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {s!r}")
        return v
    return parse


def build_parser():
    p = _Parser(prog="mlmamba", description="ML-Mamba: a Mamba-2 multimodal LLM.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    g = sub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("--model", required=True, help="model directory (config.json, "
                   "model.safetensors, tokenizer.json), e.g. made by `mlmamba convert`")
    g.add_argument("--image", action="append", default=[],
                   help="image file (repeat for several images; omit for text only)")
    g.add_argument("--prompt", default=None,
                   help="the question (default: 'Describe the image.' / required without image)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256)
    g.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0,
                   help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=1.0)
    g.add_argument("--repetition-penalty", type=_float_in(0.0, 100.0, lo_open=True), default=1.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--raw-prompt", action="store_true",
                   help="feed the prompt as is, without the Zephyr chat template")
    g.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    g.add_argument("--no-cuda-graph", action="store_true")

    c = sub.add_parser("convert", help="official ML-Mamba checkpoint -> model directory")
    c.add_argument("--official", required=True, help="ML-Mamba latest-checkpoint.pt")
    c.add_argument("--tokenizer", required=True,
                   help="GPT-NeoX tokenizer.json (file or directory) of xiuyul/mamba-2.8b-zephyr")
    c.add_argument("--dino", default=None, help="timm DINOv2 weights (file or directory)")
    c.add_argument("--siglip", default=None, help="timm SigLIP weights (file or directory)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    return p


def _device_and_dtype(args):
    import torch
    dev = torch.device(args.device) if args.device else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    name = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    return dev, getattr(torch, DTYPES[name])


def _generate(args):
    import time

    import torch

    from .tokenizer import TextStreamer
    from .vision import load_image
    from .vlm import MLMamba

    if not args.image and args.prompt is None:
        raise ValueError("give --image and/or --prompt")
    prompt = args.prompt if args.prompt is not None else "Describe the image."
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such directory")
    for path in args.image:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {path}: no such file")
    dev, dtype = _device_and_dtype(args)
    t0 = time.perf_counter()
    model = MLMamba.from_pretrained(args.model, device=dev, dtype=dtype)
    if model.tokenizer is None:
        raise FileNotFoundError(f"--model {args.model}: no tokenizer.json in the directory")
    load_s = time.perf_counter() - t0
    # decode the images up front so an unreadable file fails before any output
    images = [load_image(p) for p in args.image]
    image = None if not images else (images[0] if len(images) == 1 else images)
    gen = None
    if args.seed is not None:
        gen = torch.Generator(device=dev).manual_seed(args.seed)
    streamer = None if args.no_stream else TextStreamer(model.tokenizer)
    out = model.generate(image, prompt, max_new_tokens=args.max_new_tokens,
                         chat_template=not args.raw_prompt, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, generator=gen,
                         callback=streamer, cuda_graph=not args.no_cuda_graph)
    if streamer is None:
        sys.stdout.write(out.texts[0])
    else:
        streamer.end()
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = out.timing
    vis = t.get("preprocess_s", 0.0) + t.get("vision_s", 0.0)
    sys.stderr.write(
        f"[load {load_s:.2f} s | vision {vis * 1e3:.1f} ms | connector "
        f"{t.get('connector_s', 0.0) * 1e3:.1f} ms | prefill {t['prefill_tokens']} tokens "
        f"{t['prefill_s'] * 1e3:.1f} ms | decode {t['new_tokens']} tokens {t['decode_s']:.2f} s "
        f"= {t['decode_tokens_per_s']:.1f} tokens/s | total {t['total_s']:.2f} s = "
        f"{t['end_to_end_tokens_per_s']:.1f} tokens/s | {dev.type} {str(dtype)[6:]}]\n")
    return 0


def _convert(args):
    import torch

    from .tokenizer import Tokenizer
    from .vlm import MLMamba

    from .vision import BACKBONES
    from .vlm import official_kind

    weights = {k: v for k, v in (("dino", args.dino), ("siglip", args.siglip)) if v}
    Tokenizer.from_pretrained(args.tokenizer)  # fail early on a bad tokenizer path
    parts = MLMamba.read_official(args.official)
    if official_kind(parts) == "ml-mamba":  # other kinds fail with their own message below
        backbone = MLMamba.official_config(parts).vision_backbone
        missing = [n for n in BACKBONES[backbone] if n not in weights]
        if missing:
            raise ValueError(f"{backbone} needs the tower weights: pass "
                             + " ".join(f"--{n} PATH" for n in missing))
    del parts
    model = MLMamba.from_official(args.official, tokenizer=args.tokenizer, vision_weights=weights,
                                  dtype=getattr(torch, DTYPES[args.dtype]))
    model.save_pretrained(args.out)
    sys.stderr.write(f"wrote {args.out}\n")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. random towers during convert
            return _generate(args) if args.command == "generate" else _convert(args)
    except KeyboardInterrupt:
        sys.stderr.write("\nmlmamba: interrupted\n")
        return 130
    except Exception as e:  # one line, never a traceback
        msg = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"mlmamba: error: {msg}\n")
        return 1
