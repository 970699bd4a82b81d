"""Checkpoint reading and writing. Nothing here runs pickled code: safetensors, or torch.load with
weights_only=True.

Shared helpers (the VLM loader uses them too):
  load_state_dict_file(path)        one .safetensors / .bin / .pt file -> {name: tensor}
  load_state_dict_dir(dir)          model.safetensors, sharded model.safetensors.index.json,
                                    pytorch_model.bin (sharded too) -> {name: tensor}
  check_state_dict(expected, sd)    raises CheckpointKeyError naming missing/unexpected keys and
                                    shape mismatches
  load_into(module, sd)             check_state_dict, then copy (or assign onto a meta module)
  save_safetensors(sd, dir)         model.safetensors, or shards + index when max_shard_size is set
"""

import json
import os

import torch

from .config import Mamba2Config

__all__ = ["CheckpointKeyError", "load_state_dict_file", "load_state_dict_dir", "check_state_dict",
           "load_into", "save_safetensors", "read_config", "hf_to_ours", "ours_to_hf", "load_lm", "save_lm"]

SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class CheckpointKeyError(ValueError):
    """A checkpoint's keys or shapes do not match the model. `.missing`, `.unexpected` (lists of
    names) and `.mismatched` (list of (name, checkpoint shape, model shape))."""

    def __init__(self, what, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_names(self.unexpected)}")
        if self.mismatched:
            shown = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:8])
            more = f"; ... and {len(self.mismatched) - 8} more" if len(self.mismatched) > 8 else ""
            parts.append(f"shape mismatches ({len(self.mismatched)}): {shown}{more}")
        super().__init__(f"{what}: checkpoint does not match the model: " + " | ".join(parts))


def _names(keys, limit=12):
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return s + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


# -- reading ------------------------------------------------------------------------------------
def load_state_dict_file(path, device="cpu"):
    """Read one weights file: .safetensors with safetensors, anything else with
    torch.load(weights_only=True). A dict wrapped under 'state_dict' or 'model' is unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_state_dict_file: no such file {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device=str(device))
    sd = torch.load(path, map_location=device, weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and set(sd) == {wrapper}:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"load_state_dict_file: {path} does not hold a flat dict of tensors")
    return sd


def load_state_dict_dir(path, device="cpu"):
    """All weights of a checkpoint directory (safetensors preferred, then pytorch_model.bin)."""
    path = os.fspath(path)
    for index_name, single in ((SAFE_INDEX, SAFE_FILE), (BIN_INDEX, BIN_FILE)):
        if os.path.isfile(os.path.join(path, single)):
            return load_state_dict_file(os.path.join(path, single), device)
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            sd = {}
            for shard in sorted(set(weight_map.values())):
                part = load_state_dict_file(os.path.join(path, shard), device)
                sd.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
            missing = sorted(set(weight_map) - set(sd))
            if missing:
                raise CheckpointKeyError(f"{index}", missing=missing)
            return sd
    raise FileNotFoundError(f"load_state_dict_dir: {path} has none of {SAFE_FILE}, {SAFE_INDEX}, "
                            f"{BIN_FILE}, {BIN_INDEX}")


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# -- checking and loading -----------------------------------------------------------------------
def check_state_dict(expected, sd, what="model", ignore_missing=(), ignore_unexpected=()):
    """expected: a module or {name: shape}. Raises CheckpointKeyError naming every missing key,
    unexpected key and shape mismatch (keys in ignore_* are allowed to be absent / extra)."""
    if isinstance(expected, torch.nn.Module):
        expected = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    missing = [k for k in expected if k not in sd and k not in ignore_missing]
    unexpected = [k for k in sd if k not in expected and k not in ignore_unexpected]
    mismatched = [(k, tuple(sd[k].shape), tuple(s)) for k, s in expected.items()
                  if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(what, missing, unexpected, mismatched)


def load_into(module, sd, what="model", ignore_missing=(), device=None, dtype=None):
    """Check then load `sd` into `module`. On a meta-device module the tensors are assigned
    (converted to device/dtype first: no second copy of the weights); otherwise copied."""
    check_state_dict(module, sd, what, ignore_missing=ignore_missing)
    on_meta = any(p.is_meta for p in module.parameters())
    if on_meta:
        sd = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
              for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=False, assign=on_meta)
    left = [k for k in result.missing_keys if k not in ignore_missing]
    if left or result.unexpected_keys:
        raise CheckpointKeyError(what, left, result.unexpected_keys)
    return module


# -- key layouts --------------------------------------------------------------------------------
def hf_to_ours(sd):
    """HF transformers Mamba2 keys -> state-spaces keys (only the embedding name differs)."""
    return {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in sd.items()}


def ours_to_hf(sd):
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in sd.items()}


def load_lm(cls, path, device=None, dtype=None, config=None):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"from_pretrained: {path} is not a directory")
    if config is None:
        config = Mamba2Config.from_dict(read_config(path))
    sd = hf_to_ours(load_state_dict_dir(path))
    emb = sd.get("backbone.embedding.weight")
    if dtype is None:
        dtype = emb.dtype if emb is not None and emb.is_floating_point() else torch.float32
    device = torch.device("cpu" if device is None else device)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    ignore = ()
    if config.tie_embeddings:
        ignore = ("lm_head.weight",)
        head = sd.pop("lm_head.weight", None)
        if head is not None and emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise ValueError(f"from_pretrained: {path}: lm_head.weight {tuple(head.shape)} differs from "
                             f"backbone.embedding.weight {tuple(emb.shape)}, but the config ties them "
                             f"(tie_embeddings / tie_word_embeddings)")
    load_into(model, sd, what=f"Mamba2LM.from_pretrained({path})", ignore_missing=ignore, device=device, dtype=dtype)
    model.tie_weights()
    return model.eval()


# -- writing ------------------------------------------------------------------------------------
def save_safetensors(sd, path, max_shard_size=None, metadata=None):
    """Write {name: tensor} as path/model.safetensors, or as model-0000i-of-0000n.safetensors shards
    plus model.safetensors.index.json when the total exceeds max_shard_size bytes. Tensors that
    share storage (tied weights) must be dropped by the caller."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    meta = {"format": "pt", **(metadata or {})}
    total = sum(v.nbytes for v in sd.values())
    if not max_shard_size or total <= max_shard_size:
        save_file(sd, os.path.join(path, SAFE_FILE), metadata=meta)
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.nbytes > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=meta)
        weight_map.update({k: name for k in shard})
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_lm(model, path, max_shard_size=None):
    os.makedirs(path, exist_ok=True)
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    save_safetensors(ours_to_hf(sd), path, max_shard_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)
