"""CLEAR checkpoints: round trips, the released layout, download, and every bad input's error."""

import os

import pytest
import torch
from safetensors.torch import save_file

import clear
from tiny_models import FLUX_CONFIG, flux_inputs, tiny_flux


def released_layout(df: int = 1, seed: int = 0) -> dict:
    """A synthetic file in the released key layout, written from the FLUX module structure (not by clear)."""
    g = torch.Generator().manual_seed(seed)
    dim = FLUX_CONFIG["num_attention_heads"] * FLUX_CONFIG["attention_head_dim"]
    tensors = {}
    for prefix, projs in [("transformer_blocks", ("to_q", "to_k", "to_v", "to_out.0")),
                          ("single_transformer_blocks", ("to_q", "to_k", "to_v"))]:
        for i in range(2):
            for proj in projs:
                tensors[f"{prefix}.{i}.attn.{proj}.weight"] = torch.randn(dim, dim, generator=g)
                tensors[f"{prefix}.{i}.attn.{proj}.bias"] = torch.randn(dim, generator=g)
            if df > 1:
                tensors[f"{prefix}.{i}.attn.processor.spatial_weight"] = torch.rand(1, 1, 1, df, 1, df, 1, generator=g)
    return tensors


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(model).values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_round_trip(tmp_path, flux):
    clear.apply_clear(flux, radius=3, down_factor=2)
    randomize(flux)
    path = clear.save_clear_weights(flux, tmp_path / "sub" / "w.safetensors")
    assert not [f for f in os.listdir(tmp_path / "sub") if f != "w.safetensors"]  # no temp file left behind
    other = tiny_flux(seed=7)
    clear.apply_clear(other, radius=3, down_factor=2)
    clear.load_clear_weights(other, path)
    a, b = clear.clear_state_dict_keys(flux), clear.clear_state_dict_keys(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # only the CLEAR parameters travel: other weights of `other` are untouched
    assert not torch.equal(flux.x_embedder.weight, other.x_embedder.weight)


def test_saved_layout_is_the_released_layout(tmp_path, flux):
    clear.apply_clear(flux, radius=16, down_factor=2)
    from safetensors import safe_open

    path = clear.save_clear_weights(flux, tmp_path / "w.safetensors")
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(released_layout(df=2))
        assert f.metadata()["clear.radius"] == "16"


@pytest.mark.parametrize("df", [1, 2])
def test_load_released_layout(tmp_path, flux, df):
    tensors = released_layout(df)
    name = "clear_local_16" + (f"_down_{df}" if df > 1 else "") + ".safetensors"
    save_file(tensors, tmp_path / name)
    clear.apply_clear(flux, radius=16, down_factor=df)
    clear.load_clear_weights(flux, tmp_path / name)
    params = clear.clear_state_dict_keys(flux)
    assert all(torch.equal(params[k], tensors[k]) for k in tensors)
    assert torch.equal(flux.single_transformer_blocks[1].attn.to_v.bias, tensors["single_transformer_blocks.1.attn.to_v.bias"])


def test_load_into_fused_projections(tmp_path):
    save_file(released_layout(), tmp_path / "clear_local_3.safetensors")
    x = flux_inputs(6, 10)
    outs = []
    for fuse in (False, True):
        model = tiny_flux()
        if fuse:
            model.fuse_qkv_projections()
        clear.apply_clear(model, radius=3)
        clear.load_clear_weights(model, tmp_path / "clear_local_3.safetensors")
        with torch.no_grad():
            outs.append(model(**x).sample)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def _bad(tmp_path, tensors, name="clear_local_16.safetensors", metadata=None):
    save_file(tensors, tmp_path / name, metadata=metadata)
    return tmp_path / name


def test_errors(tmp_path, flux):
    with pytest.raises(ValueError, match="call clear.apply_clear"):
        clear.load_clear_weights(flux, "nowhere.safetensors")
    clear.apply_clear(flux, radius=16)
    good = released_layout()

    t = dict(good); t.pop("transformer_blocks.1.attn.to_out.0.bias")
    with pytest.raises(ValueError, match=r"missing keys: transformer_blocks\.1\.attn\.to_out\.0\.bias"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    t = dict(good); t["transformer_blocks.5.attn.to_q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: transformer_blocks\.5\.attn\.to_q\.weight"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    t = dict(good); t["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match=r"wrong shape.*to_q\.weight: file \(16, 32\) vs model \(32, 32\)"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    with pytest.raises(ValueError, match=r"down_factor=2 but CLEAR was applied with down_factor=1"):
        clear.load_clear_weights(flux, _bad(tmp_path, released_layout(df=2), "clear_local_16_down_2.safetensors"))

    with pytest.raises(ValueError, match=r"trained for radius=8 but CLEAR was applied with radius=16"):
        clear.load_clear_weights(flux, _bad(tmp_path, good, "clear_local_8.safetensors"))
    clear.load_clear_weights(flux, tmp_path / "clear_local_8.safetensors", strict_radius=False)  # on purpose

    with pytest.raises(ValueError, match=r"for a sd3 model, not flux"):
        clear.load_clear_weights(flux, _bad(tmp_path, good, "mine.safetensors", {"clear.family": "sd3"}))

    path = _bad(tmp_path, good, "clear_local_16.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        clear.load_clear_weights(flux, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clear.load_clear_weights(flux, tmp_path / "missing.safetensors")

    clear.apply_clear(flux, radius=16, down_factor=2)
    with pytest.raises(ValueError, match=r"down_factor=1 but CLEAR was applied with down_factor=2"):
        clear.load_clear_weights(flux, _bad(tmp_path, good))


def test_variants():
    assert set(clear.RELEASED) == {"clear_local_8", "clear_local_16", "clear_local_32", "clear_local_8_down_4",
                                   "clear_local_16_down_4"}
    v = clear.Variant.parse("ckpt/clear_local_16_down_4.safetensors")
    assert (v.radius, v.down_factor, v.filename) == (16, 4, "clear_local_16_down_4.safetensors")
    with pytest.raises(ValueError, match="not a CLEAR variant name"):
        clear.Variant.parse("flux.safetensors")


def test_download_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # 1. already in local_dir: no Hub call at all
    (tmp_path / "ckpt").mkdir()
    save_file(released_layout(), tmp_path / "ckpt" / "clear_local_8.safetensors")
    assert clear.download_weights(8, local_dir=tmp_path / "ckpt") == str(tmp_path / "ckpt" / "clear_local_8.safetensors")

    # 2. not released
    with pytest.raises(ValueError, match="no released CLEAR weights for clear_local_12"):
        clear.download_weights(12, local_dir=tmp_path / "ckpt")

    # 3. offline, not anywhere: the error says where to put the file
    with pytest.raises(FileNotFoundError, match=r"put it at .*ckpt/clear_local_16_down_4\.safetensors"):
        clear.download_weights(16, 4, local_dir=tmp_path / "ckpt")

    # 4. offline, in the Hugging Face cache: the real hf_hub_download finds it
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--Huage001--CLEAR"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(released_layout(), repo / "snapshots" / commit / "clear_local_16.safetensors")
    path = clear.download_weights(16, local_dir=tmp_path / "ckpt")
    assert path.endswith("clear_local_16.safetensors") and os.path.isfile(path)
    model = tiny_flux()
    clear.apply_clear(model, radius=16)
    clear.load_clear_weights(model, path)
