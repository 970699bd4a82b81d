"""Vision towers: DINOv2 and SigLIP through timm, as ML-Mamba and Cobra use them (formats.md §5).

Each tower is a timm ViT at the model's image size, truncated after its second-to-last block
(the feature layer), with no final norm and no head. Prefix tokens (cls, registers) are dropped.
Features of several towers are concatenated along the width, DINO first.
"""
import os
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["TOWERS", "BACKBONES", "VisionTowers", "load_image"]


@dataclass(frozen=True)
class TowerSpec:
    timm_name: str
    mean: tuple
    std: tuple


TOWERS = {
    "dino": TowerSpec("vit_large_patch14_reg4_dinov2.lvd142m",
                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": TowerSpec("vit_so400m_patch14_siglip_384", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# vision_backbone_id (prismatic names) -> towers, in concatenation order
BACKBONES = {
    "dinosiglip-vit-so-384px": ("dino", "siglip"),
    "siglip-vit-so400m-384px": ("siglip",),
    "dinov2-vit-l-384px": ("dino",),
}

_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin")


def _weights_file(path):
    """A tower weight file, or the first known weight file inside a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"vision weights: no weight file ({', '.join(_WEIGHT_FILES)}) "
                                f"in directory {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision weights: no such file {path}")
    return path


def build_tower(name, image_size=384, overrides=None, weights=None):
    """A timm ViT for tower `name`, truncated after its feature block (second to last).

    overrides: timm kwargs (embed_dim, depth, ...) for tiny test towers.
    weights: a local file or directory with the tower's timm/open_clip weights; nothing is
    fetched over the network (pretrained=False without weights).
    """
    import timm

    if name not in TOWERS:
        raise ValueError(f"vision tower {name!r}: expected one of {sorted(TOWERS)}")
    kwargs = dict(num_classes=0, img_size=image_size, **(overrides or {}))
    if weights is not None:
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = dict(file=_weights_file(weights))
    else:
        kwargs["pretrained"] = False
    model = timm.create_model(TOWERS[name].timm_name, **kwargs)
    feature_block = len(model.blocks) - 2
    if feature_block < 0:
        raise ValueError(f"vision tower {name!r}: needs at least 2 blocks, got {len(model.blocks)}")
    # drop the last block, final norm, pooling and head: they never touch the features
    model.prune_intermediate_layers([feature_block], prune_norm=True, prune_head=True)
    return model


def load_image(image):
    """A PIL RGB image from a path or PIL image; clear errors for missing or unreadable files."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image: no such file {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image: cannot read {path} as an image ({e})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"image: expected a path, PIL image or tensor, got {type(image).__name__}")


class VisionTowers(nn.Module):
    """One or two frozen ViT towers; forward(pixels) -> (b, num_patches, embed_dim)."""

    def __init__(self, backbone="dinosiglip-vit-so-384px", image_size=384, overrides=None,
                 weights=None, frozen=True):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"vision_backbone {backbone!r}: expected one of {sorted(BACKBONES)}")
        self.backbone = backbone
        self.image_size = image_size
        self.names = BACKBONES[backbone]
        overrides = overrides or {}
        weights = weights or {}
        for key in list(overrides) + list(weights):
            if key not in self.names:
                raise ValueError(f"vision: tower {key!r} is not part of {backbone} {self.names}")
        self.towers = nn.ModuleDict({
            n: build_tower(n, image_size, overrides.get(n), weights.get(n)) for n in self.names})
        grids = {n: tuple(t.patch_embed.grid_size) for n, t in self.towers.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"vision: towers have different patch grids {grids}")
        self.grid = grids[self.names[0]]
        self.embed_dim = sum(t.embed_dim for t in self.towers.values())
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    @property
    def num_patches(self):
        return self.grid[0] * self.grid[1]

    def train(self, mode=True):
        # frozen towers stay in eval mode whatever the parent module does
        return super().train(mode and not self.frozen)

    def to_unit_pixels(self, images, device=None):
        """Images -> (b, 3, S, S) float32 in [0, 1] on `device`, resized to the model size.

        Accepts a path, PIL image, (3,H,W)/(b,3,H,W) tensor (float in [0,1] or uint8), or a list
        of them. PIL images are resized by PIL (bicubic), as the official transforms do; tensors
        of another size by torch (bicubic, antialiased). Images travel to `device` as uint8 and
        are converted there.
        """
        import numpy as np
        from PIL import Image

        size = self.image_size
        if isinstance(images, torch.Tensor):
            x = images
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"image: expected a (3,H,W) or (b,3,H,W) tensor, got "
                                 f"{tuple(images.shape)}")
            x = x.to(device) if device is not None else x
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                  antialias=True).clamp_(0, 1)
            return x
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("image: got an empty list")
        out, pil = [], []
        for im in images:
            if isinstance(im, torch.Tensor):
                out.append(self.to_unit_pixels(im, device))
                pil.append(None)
                continue
            im = load_image(im).resize((size, size), Image.BICUBIC)
            pil.append(len(out))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        idx = [k for k in pil if k is not None]
        if idx:  # one upload of all PIL images as uint8 (b, S, S, 3), converted on the device
            hwc = torch.stack([out[k] for k in idx])
            hwc = hwc.to(device) if device is not None else hwc
            chw = hwc.permute(0, 3, 1, 2).float().div_(255)
            for n, k in enumerate(idx):
                out[k] = chw[n:n + 1]
        return torch.cat(out, 0)

    def preprocess(self, images, device=None):
        """Images -> {tower: (b,3,S,S) normalised float32 pixels} on `device`."""
        x = self.to_unit_pixels(images, device)
        out = {}
        for n in self.names:
            mean = torch.tensor(TOWERS[n].mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(TOWERS[n].std, device=x.device).view(1, 3, 1, 1)
            out[n] = (x - mean) / std
        return out

    def forward(self, pixels):
        """pixels: {tower: (b,3,S,S) normalised} (from preprocess) or raw images."""
        if not isinstance(pixels, dict):
            pixels = self.preprocess(pixels)
        missing = [n for n in self.names if n not in pixels]
        if missing:
            raise ValueError(f"vision: pixel dict lacks towers {missing}")
        feats = []
        for n in self.names:
            tower = self.towers[n]
            p = tower.patch_embed.proj.weight
            x = pixels[n].to(device=p.device, dtype=p.dtype)
            # output of the last kept block (the feature block), prefix tokens dropped, no norm
            feats.append(tower.forward_intermediates(
                x, indices=1, intermediates_only=True, output_fmt="NLC")[0])
        return torch.cat(feats, dim=-1)
