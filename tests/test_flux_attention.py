"""CLEAR on stock diffusers FLUX models equals diffusers' own attention given the same explicit mask."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

import clear
from clear import backends
from clear.geometry import TokenLayout, Window, allowed_mask
from tiny_models import flux_inputs, tiny_flux, tiny_flux_controlnet

BACKENDS = list(backends.names())  # every registered backend


def masked_reference(model, x, radius, text_len):
    """The unmodified model, every attention layer given CLEAR's boolean mask through diffusers' own processors."""
    height, width = int(x["img_ids"][:, 1].max()) + 1, int(x["img_ids"][:, 2].max()) + 1
    mask = allowed_mask(TokenLayout(text_len, height, width), Window(radius))
    with torch.no_grad():
        return model(**x, joint_attention_kwargs={"attention_mask": mask}).sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width,radius,batch,text_len", [
    (6, 10, 3, 2, 7), (9, 5, 1, 1, 5), (8, 8, 2.5, 3, 7), (5, 12, 4, 2, 1), (9, 5, 20, 2, 4), (16, 16, 5, 1, 8),
])
def test_flux_equals_masked_diffusers(flux, backend, height, width, radius, batch, text_len):
    x = flux_inputs(height, width, text_len=text_len, batch=batch)
    ref = masked_reference(flux, x, radius, text_len)
    clear.apply_clear(flux, radius=radius, backend=backend)
    with torch.no_grad():
        out = flux(**x).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolutions_and_batches_change_freely_in_one_process(flux, backend):
    """No init call, no global state: each forward's img_ids define its layout; the cache stays bounded."""
    core = clear.apply_clear(flux, radius=3, backend=backend)
    core.cache_size = 2
    for (h, w, b, t) in [(6, 10, 2, 7), (9, 5, 1, 3), (6, 10, 1, 7), (4, 14, 3, 2), (9, 5, 2, 3)]:
        x = flux_inputs(h, w, text_len=t, batch=b, seed=h * w)
        with torch.no_grad():
            out = flux(**x).sample
        clear.remove_clear(flux)
        ref = masked_reference(flux, x, 3, t)
        clear.apply_clear(flux, radius=3, backend=backend).cache_size = 2
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # one model applied once, many layouts: the plan cache is bounded
    core = clear.apply_clear(flux, radius=3, backend=backend)
    core.cache_size = 2
    for (h, w) in [(6, 10), (9, 5), (4, 14), (5, 5)]:
        with torch.no_grad():
            flux(**flux_inputs(h, w, batch=1))
    assert len(core._plans) == 2


def test_radius_covering_the_grid_equals_unmodified_model(flux):
    x = flux_inputs(6, 9)
    with torch.no_grad():
        ref = flux(**x).sample
    for backend in BACKENDS:
        clear.apply_clear(flux, radius=12, backend=backend)  # 5^2 + 8^2 = 89 < 144
        with torch.no_grad():
            out = flux(**x).sample
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        clear.remove_clear(flux)


def test_remove_clear_restores_bit_for_bit(flux):
    x = flux_inputs(6, 10)
    before = dict(flux.attn_processors)
    with torch.no_grad():
        ref = flux(**x).sample
    clear.apply_clear(flux, radius=2, down_factor=2)
    with torch.no_grad():
        changed = flux(**x).sample
    assert not torch.allclose(changed, ref)
    clear.remove_clear(flux)
    assert all(flux.attn_processors[k] is v for k, v in before.items())
    assert not any("processor" in k for k in flux.state_dict())
    assert not flux._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(flux(**x).sample, ref)
    with pytest.raises(ValueError, match="no CLEAR"):
        clear.remove_clear(flux)


def test_apply_twice_replaces_configuration(flux):
    clear.apply_clear(flux, radius=2)
    clear.apply_clear(flux, radius=3, down_factor=2)
    assert flux.clear_state.radius == 3 and len(flux._forward_pre_hooks) == 1
    clear.remove_clear(flux)
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in flux.attn_processors.values())


# ------------------------------------------------------------------------------------------
# Down-sampled key/value tokens against an independent reference
# ------------------------------------------------------------------------------------------


class PooledReferenceProcessor:
    """Written from the paper, independently of clear/: FLUX attention whose keys/values are
    [text | image | pooled], pooled[i, j] = sum_{a,b} w[a, b] * x[i*df + a, j*df + b] (after norm and RoPE)."""

    def __init__(self, weight, height, width, radius):
        self.w, self.h, self.wd, self.r = weight.reshape(weight.shape[3], weight.shape[5]), height, width, radius

    def pool(self, x):  # x: [B, heads, N, D] image tokens, row-major
        df = self.w.shape[0]
        b, nh, _, d = x.shape
        grid = x.reshape(b, nh, self.h, self.wd, d)
        out = torch.zeros(b, nh, self.h // df, self.wd // df, d)
        for a in range(df):
            for c in range(df):
                out += self.w[a, c] * grid[:, :, a::df, c::df]
        return out.reshape(b, nh, -1, d)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(t):
            return t.unflatten(-1, (attn.heads, -1))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        n = self.h * self.wd
        t = q.shape[2] - n
        k = torch.cat([k, self.pool(k[:, :, t:])], 2)
        v = torch.cat([v, self.pool(v[:, :, t:])], 2)
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                dy, dx = i // self.wd - j // self.wd, i % self.wd - j % self.wd
                mask[t + i, t + j] = dy * dy + dx * dx < self.r**2
        mask[:t, q.shape[2]:] = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width,radius,df", [(6, 10, 3, 2), (8, 4, 2, 4), (9, 6, 1.5, 3), (4, 6, 50, 2)])
def test_down_sampled_variant_equals_independent_reference(backend, height, width, radius, df):
    model = tiny_flux()
    x = flux_inputs(height, width)
    clear.apply_clear(model, radius=radius, down_factor=df, backend=backend)
    g = torch.Generator().manual_seed(3)
    weights = {}
    for name, attn in clear.clear_attention_modules(model).items():
        with torch.no_grad():
            attn.processor.spatial_weight.copy_(torch.rand(1, 1, 1, df, 1, df, 1, generator=g))
        weights[name] = attn.processor.spatial_weight.detach().clone()
    with torch.no_grad():
        out = model(**x).sample
    clear.remove_clear(model)
    model.set_attn_processor({f"{n}.processor": PooledReferenceProcessor(w, height, width, radius)
                              for n, w in weights.items()})
    with torch.no_grad():
        ref = model(**x).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_down_factor_must_divide_grid(flux):
    clear.apply_clear(flux, radius=4, down_factor=4)
    with pytest.raises(ValueError, match="not divisible by down_factor=4"):
        flux(**flux_inputs(6, 10))


def test_gradients_reach_attention_parameters_and_spatial_weight(flux):
    clear.apply_clear(flux, radius=2, down_factor=2, backend="dense")
    flux.train()
    x = flux_inputs(6, 8)
    flux(**x).sample.square().mean().backward()
    params = clear.clear_state_dict_keys(flux)
    assert len(params) == 2 * (4 * 2) + 2 * (3 * 2) + 4  # to_q/k/v/out.0 x (w, b) double; q/k/v single; 4 spatial
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


def test_auto_backend_without_measurements_is_flex_on_cuda_and_dense_elsewhere(flux, monkeypatch):
    from clear import backends
    from clear.backends import Call
    from clear.geometry import TokenLayout

    monkeypatch.setattr(backends, "measurements", lambda device: ())
    core = clear.apply_clear(flux, radius=2)
    assert core.backend == "auto" and core.plan(TokenLayout(7, 4, 4), torch.device("cpu")).backend == "dense"
    assert backends.decide(core.backend, Call("cuda", 16, 7, radius=2)) == ("flex", "the table's rule for cuda "
                                                                                    "(from 0 image tokens)")


def test_fused_projections(flux):
    x = flux_inputs(6, 10)
    ref = masked_reference(flux, x, 3, 7)
    flux.fuse_qkv_projections()
    clear.apply_clear(flux, radius=3, backend="flex")
    with torch.no_grad():
        out = flux(**x).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_explicit_attention_mask_is_rejected(flux):
    clear.apply_clear(flux, radius=3)
    x = flux_inputs(4, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        flux(**x, joint_attention_kwargs={"attention_mask": torch.ones(4, 4, dtype=torch.bool)})


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TypeError, match="does not support Linear"):
        clear.apply_clear(torch.nn.Linear(2, 2), radius=3)


def test_proportional_attention_scale(flux):
    core = clear.apply_clear(flux, radius=3, proportional_attention=True)
    at_training = TokenLayout(512, 64, 64)
    assert core.scale(at_training, 128) == pytest.approx(128**-0.5)
    big = TokenLayout(512, 256, 256)
    assert core.scale(big, 128) == pytest.approx((torch.log(torch.tensor(256.0**2 + 512)) /
                                                  torch.log(torch.tensor(4608.0)) / 128).sqrt().item())
    # it changes the output, and equals SDPA with that scale
    x = flux_inputs(6, 10)
    with torch.no_grad():
        out = flux(**x).sample
    clear.apply_clear(flux, radius=3, proportional_attention=False)
    with torch.no_grad():
        plain = flux(**x).sample
    assert not torch.allclose(out, plain)


class MaskedFluxProcessor:
    """diffusers' own FluxAttnProcessor, always given one explicit mask (FluxControlNetModel does not pass
    joint_attention_kwargs to its blocks, so the mask cannot travel that way)."""

    def __init__(self, mask):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.inner, self.mask = FluxAttnProcessor(), mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, image_rotary_emb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_controlnet_matches_its_oracle(backend):
    cn = tiny_flux_controlnet()
    x = flux_inputs(6, 10)
    x["controlnet_cond"] = torch.randn(2, 60, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = cn(**x)
    originals = dict(cn.attn_processors)
    cn.set_attn_processor(MaskedFluxProcessor(allowed_mask(TokenLayout(7, 6, 10), Window(3))))
    with torch.no_grad():
        ref = cn(**x)
    cn.set_attn_processor(originals)
    clear.apply_clear(cn, radius=3, backend=backend)
    with torch.no_grad():
        out = cn(**x)
    samples = lambda o: o.controlnet_block_samples + o.controlnet_single_block_samples  # noqa: E731
    assert not torch.allclose(samples(plain)[-1], samples(ref)[-1])  # the mask matters
    for a, b in zip(samples(out), samples(ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a second resolution through the same ControlNet
    x = flux_inputs(4, 6, batch=1)
    x["controlnet_cond"] = torch.randn(1, 24, 16)
    with torch.no_grad():
        out = cn(**x)
    clear.remove_clear(cn)
    cn.set_attn_processor(MaskedFluxProcessor(allowed_mask(TokenLayout(7, 4, 6), Window(3))))
    with torch.no_grad():
        ref = cn(**x)
    for a, b in zip(samples(out), samples(ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
