"""Vision towers: features, preprocessing and weight loading against timm itself (tiny towers)."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mlmamba.vision import TOWERS, VisionTowers

TINY = {"dino": dict(embed_dim=32, depth=4, num_heads=2),
        "siglip": dict(embed_dim=48, depth=3, num_heads=2)}
SIZE = 56  # 4x4 patches of 14


def full_timm(name, size=SIZE):
    return timm.create_model(TOWERS[name].timm_name, pretrained=False, num_classes=0,
                             img_size=size, **TINY[name]).eval()


def test_constants_match_formats_md():
    assert TOWERS["dino"].timm_name == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert TOWERS["siglip"].timm_name == "vit_so400m_patch14_siglip_384"
    assert TOWERS["dino"].mean == (0.485, 0.456, 0.406) and TOWERS["dino"].std == (0.229, 0.224, 0.225)
    assert TOWERS["siglip"].mean == (0.5,) * 3 and TOWERS["siglip"].std == (0.5,) * 3


@pytest.mark.parametrize("backbone,names", [("dinosiglip-vit-so-384px", ("dino", "siglip")),
                                            ("siglip-vit-so400m-384px", ("siglip",)),
                                            ("dinov2-vit-l-384px", ("dino",))])
def test_features_are_second_to_last_block_without_prefix(rng, backbone, names):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    towers = VisionTowers(backbone, SIZE, {n: TINY[n] for n in names})
    assert towers.names == names and towers.grid == (4, 4)
    pixels = {n: torch.randn(2, 3, SIZE, SIZE, generator=rng) for n in names}
    want = []
    for n in names:
        full = full_timm(n)
        missing, unexpected = full.load_state_dict(towers.towers[n].state_dict(), strict=False)
        assert not unexpected
        # only the last block, the final norm and the pooling head are not in our tower
        assert all(k.startswith((f"blocks.{len(full.blocks) - 1}.", "norm.", "attn_pool.", "fc_norm."))
                   for k in missing), missing
        with torch.no_grad():
            # the official call: get_intermediate_layers(n={len(blocks) - 2}), no norm
            feats = full.get_intermediate_layers(pixels[n], n=[len(full.blocks) - 2])[0]
        assert feats.shape == (2, 16, TINY[n]["embed_dim"])
        want.append(feats)
    got = towers(pixels)
    torch.testing.assert_close(got, torch.cat(want, -1), rtol=1e-5, atol=1e-5)
    assert towers.embed_dim == sum(TINY[n]["embed_dim"] for n in names)


def test_preprocessing_from_paths_pil_and_tensors(rng, tmp_path):
    towers = VisionTowers("dinosiglip-vit-so-384px", SIZE, TINY)
    arr = (torch.rand(37, 53, 3, generator=rng) * 255).to(torch.uint8).numpy()
    path = tmp_path / "im.png"
    Image.fromarray(arr).save(path)
    resized = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
    unit = torch.from_numpy(resized / 255).permute(2, 0, 1)[None]
    for src in (path, str(path), Image.fromarray(arr), Image.fromarray(arr).convert("RGBA")):
        px = towers.preprocess(src)
        for n in ("dino", "siglip"):
            mean = torch.tensor(TOWERS[n].mean).view(1, 3, 1, 1)
            std = torch.tensor(TOWERS[n].std).view(1, 3, 1, 1)
            torch.testing.assert_close(px[n], (unit - mean) / std, rtol=0, atol=1e-6)
    # tensors: float in [0, 1] or uint8, resized bicubically when needed, any strides
    t = torch.rand(3, SIZE, 2 * SIZE, generator=rng)[:, :, ::2]
    torch.testing.assert_close(towers.to_unit_pixels(t), t[None])
    u8 = (t * 255).round().to(torch.uint8)
    torch.testing.assert_close(towers.to_unit_pixels(u8), u8[None].float() / 255)
    assert towers.to_unit_pixels(torch.rand(2, 3, 30, 90)).shape == (2, 3, SIZE, SIZE)
    batch = towers.to_unit_pixels([path, t])
    assert batch.shape == (2, 3, SIZE, SIZE)


def test_image_errors(tmp_path):
    towers = VisionTowers("siglip-vit-so400m-384px", SIZE, {"siglip": TINY["siglip"]})
    with pytest.raises(FileNotFoundError, match="no such file"):
        towers.preprocess(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*bad.jpg as an image"):
        towers.preprocess(tmp_path / "bad.jpg")
    with pytest.raises(TypeError, match="expected a path, PIL image or tensor"):
        towers.preprocess(3.5)
    with pytest.raises(ValueError, match="vision_backbone 'clip'"):
        VisionTowers("clip")
    with pytest.raises(ValueError, match="tower 'dino' is not part of"):
        VisionTowers("siglip-vit-so400m-384px", SIZE, {"dino": TINY["dino"]})


def test_frozen_by_default():
    towers = VisionTowers("dinov2-vit-l-384px", SIZE, {"dino": TINY["dino"]})
    assert not any(p.requires_grad for p in towers.parameters())
    towers.train()
    assert not towers.training and not towers.towers["dino"].training
    trainable = VisionTowers("dinov2-vit-l-384px", SIZE, {"dino": TINY["dino"]}, frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())


def test_weights_from_local_file_and_dir(rng, tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    full = full_timm("siglip")
    (tmp_path / "d").mkdir()
    save_file(full.state_dict(), tmp_path / "d" / "model.safetensors")
    for src in (tmp_path / "d", tmp_path / "d" / "model.safetensors"):
        towers = VisionTowers("siglip-vit-so400m-384px", SIZE, {"siglip": TINY["siglip"]},
                              weights={"siglip": src})
        ours = towers.towers["siglip"].state_dict()
        theirs = full.state_dict()
        assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    # DINO weights made at another size: timm resamples the position embedding (518 -> 384)
    big = timm.create_model(TOWERS["dino"].timm_name, pretrained=False, num_classes=0,
                            img_size=98, **TINY["dino"])
    save_file(big.state_dict(), tmp_path / "dino.safetensors")
    towers = VisionTowers("dinov2-vit-l-384px", SIZE, {"dino": TINY["dino"]},
                          weights={"dino": tmp_path / "dino.safetensors"})
    assert towers.towers["dino"].pos_embed.shape[1] == 16
    with pytest.raises(FileNotFoundError, match="no weight file"):
        VisionTowers("dinov2-vit-l-384px", SIZE, {"dino": TINY["dino"]}, weights={"dino": tmp_path})
