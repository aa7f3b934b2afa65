"""CLEAR on stock diffusers SD3 / SD3.5 models equals the unmodified model with the same boolean mask in every
attention processor (diffusers' JointAttnProcessor2_0 ignores masks, so the reference processor is written here)."""

import pytest
import torch
import torch.nn.functional as F

import clear
from clear.geometry import TokenLayout, Window, allowed_mask
from tiny_models import sd3_inputs, tiny_flux, tiny_sd3


class MaskedJointReference:
    """SD3 joint attention ([image | text], no RoPE) and image-only attn2, with CLEAR's mask over the grid."""

    def __init__(self, height, width, radius):
        self.h, self.w, self.r = height, width, radius

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b = hidden_states.shape[0]

        def split(t):
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        text = 0
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
            text = encoder_hidden_states.shape[1]
        mask = allowed_mask(TokenLayout(text, self.h, self.w, text_first=False), Window(self.r))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])
        n = hidden_states.shape[1]
        img = attn.to_out[1](attn.to_out[0](out[:, :n]))
        if encoder_hidden_states is None:
            return img
        txt = out[:, n:] if attn.context_pre_only else attn.to_add_out(out[:, n:])
        return img, txt


def reference(model, x, radius):
    h, w = (s // model.config.patch_size for s in x["hidden_states"].shape[-2:])
    originals = dict(model.attn_processors)
    model.set_attn_processor(MaskedJointReference(h, w, radius))
    with torch.no_grad():
        out = model(**x).sample
    model.set_attn_processor(originals)
    return out


CASES = [  # latent height, width (tokens = /2), radius, dual-attention layers
    (12, 20, 2, ()), (18, 10, 1, (0,)), (16, 16, 2.5, (0, 1)), (14, 22, 3, ()), (10, 18, 40, (0,)),
]


@pytest.mark.parametrize("backend", ["dense", "flex"])
@pytest.mark.parametrize("height,width,radius,dual", CASES)
def test_sd3_equals_masked_reference(backend, height, width, radius, dual):
    model = tiny_sd3(dual_attention_layers=dual, qk_norm="rms_norm" if dual else None)
    x = sd3_inputs(height, width)
    ref = reference(model, x, radius)
    clear.apply_clear(model, radius=radius, backend=backend)
    with torch.no_grad():
        out = model(**x).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sd3_radius_covering_grid_and_remove_clear():
    model = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")
    x = sd3_inputs(12, 16)
    with torch.no_grad():
        ref = model(**x).sample
    for backend in ["dense", "flex"]:
        clear.apply_clear(model, radius=20, backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(model(**x).sample, ref, atol=1e-5, rtol=1e-5)
    clear.apply_clear(model, radius=2, down_factor=2)
    with torch.no_grad():
        assert not torch.allclose(model(**x).sample, ref)
    clear.remove_clear(model)
    with torch.no_grad():
        assert torch.equal(model(**x).sample, ref)


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_sd3_down_sampled_dense_equals_flex(backend):
    """The pooled variant on SD3's [image | text] order: flex (tile order) and dense (natural order) agree, and
    uniform pooling weights equal mean pooling done by hand on one layer."""
    model = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")
    x = sd3_inputs(16, 24)
    outs = {}
    for be in ["dense", "flex"]:
        clear.apply_clear(model, radius=2, down_factor=4, backend=be)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for attn in clear.clear_attention_modules(model).values():
                attn.processor.spatial_weight.copy_(torch.rand(1, 1, 1, 4, 1, 4, 1, generator=g))
            outs[be] = model(**x).sample
    torch.testing.assert_close(outs["dense"], outs["flex"], atol=1e-5, rtol=1e-5)


def test_sd3_attention_core_pooling_against_hand_reference():
    from clear.attention import ClearAttention

    g = torch.Generator().manual_seed(0)
    h, w, t, df = 4, 6, 3, 2
    q, k, v = (torch.randn(1, h * w + t, 2, 8, generator=g) for _ in range(3))
    sw = torch.full((1, 1, 1, df, 1, df, 1), 1 / df**2)
    out = ClearAttention(1.5, df, backend="dense")(q, k, v, TokenLayout(t, h, w, text_first=False), sw)
    img_k = k[:, : h * w].reshape(1, h, w, 2, 8).permute(0, 3, 4, 1, 2).reshape(1, 16, h, w)
    pk = F.avg_pool2d(img_k, df).reshape(1, 2, 8, -1).permute(0, 3, 1, 2)
    img_v = v[:, : h * w].reshape(1, h, w, 2, 8).permute(0, 3, 4, 1, 2).reshape(1, 16, h, w)
    pv = F.avg_pool2d(img_v, df).reshape(1, 2, 8, -1).permute(0, 3, 1, 2)
    mask = allowed_mask(TokenLayout(t, h, w, text_first=False), Window(1.5, df))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat([k, pk], 1).transpose(1, 2),
                                         torch.cat([v, pv], 1).transpose(1, 2), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sd3_gradients_and_checkpoint_family(tmp_path):
    model = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")
    clear.apply_clear(model, radius=2, down_factor=2, backend="dense")
    model.train()
    model(**sd3_inputs(8, 8)).sample.square().mean().backward()
    params = clear.clear_state_dict_keys(model)
    assert any(".attn2." in k for k in params)
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    path = clear.save_clear_weights(model, tmp_path / "sd3.safetensors")
    other = tiny_sd3(seed=3, dual_attention_layers=(0,), qk_norm="rms_norm")
    clear.apply_clear(other, radius=2, down_factor=2)
    clear.load_clear_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(params.values(), clear.clear_state_dict_keys(other).values()))
    flux = tiny_flux()
    clear.apply_clear(flux, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="for a sd3 model, not flux"):
        clear.load_clear_weights(flux, path)
    # a released FLUX file (no metadata) into SD3: the key names give it away
    from safetensors.torch import save_file

    clear.apply_clear(flux, radius=2)
    flux_file = {k: v.detach().clone() for k, v in clear.clear_state_dict_keys(flux).items()}
    save_file(flux_file, tmp_path / "clear_local_2.safetensors")
    clear.apply_clear(other, radius=2)
    with pytest.raises(ValueError, match=r"missing keys: .*attn2.*likely cause: the file is for another model family"):
        clear.load_clear_weights(other, tmp_path / "clear_local_2.safetensors")


def test_sd3_grid_must_fit_patches():
    model = tiny_sd3()
    clear.apply_clear(model, radius=2)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(**sd3_inputs(9, 8))


def test_sd3_proportional_attention_reference_length():
    """Proportional attention is neutral at each model's own training layout (1024²: 64x64 image tokens plus the
    text it was trained with: FLUX.1 512 T5 tokens, dev and schnell alike; SD3 77 CLIP + 256 T5 tokens)."""
    sd3 = clear.apply_clear(tiny_sd3(), radius=4, proportional_attention=True)
    flux = clear.apply_clear(tiny_flux(guidance_embeds=True), radius=4, proportional_attention=True)
    schnell = clear.apply_clear(tiny_flux(), radius=4, proportional_attention=True)
    assert sd3.scale(TokenLayout(77 + 256, 64, 64, text_first=False), 64) == pytest.approx(64**-0.5)
    assert flux.scale(TokenLayout(512, 64, 64), 64) == pytest.approx(64**-0.5)
    assert schnell.scale(TokenLayout(512, 64, 64), 64) == pytest.approx(64**-0.5)
    assert sd3.scale(TokenLayout(333, 128, 128, text_first=False), 64) > 64**-0.5
