"""A plan belongs to its forward: two forwards of one CLEAR model at different grids, then ONE backward of
their summed loss, give the gradients of two separate models (each one forward and one backward), with and
without gradient checkpointing (which re-runs every block in the backward: the re-run must see its own
forward's grid, not the latest one). Same token count with different grids (8x8 then 4x16: only the grid
tells them apart) and different token counts; every backend with a backward on CPU; every family, those whose
diffusers forward hands no attention kwargs to its blocks (FLUX.1's ControlNet, Wan) included."""

import pytest
import torch

import clear
from clear import backends
from tiny_models import (flux2_inputs, flux_inputs, qwenimage_inputs, sd3_inputs, tiny_flux, tiny_flux2,
                         tiny_flux_controlnet, tiny_qwenimage, tiny_sd3, tiny_wan, wan_inputs)

# (first grid, second grid) in tokens
GRIDS = {"same tokens": ((8, 8), (4, 16)), "different tokens": ((8, 8), (4, 8))}
CPU_BACKWARD = [n for n in backends.names() if backends.get(n).runs_on("cpu", with_grad=True)]

FAMILIES = {
    "flux": (tiny_flux, lambda h, w, seed: flux_inputs(h, w, batch=1, seed=seed)),
    "sd3": (lambda: tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm"),  # joint + image-only attention
            lambda h, w, seed: sd3_inputs(2 * h, 2 * w, batch=1, seed=seed)),  # latent pixels, patch size 2
    "flux2": (tiny_flux2, lambda h, w, seed: flux2_inputs(h, w, batch=1, seed=seed)),
    "qwenimage": (tiny_qwenimage, lambda h, w, seed: qwenimage_inputs(h, w, batch=1, seed=seed)),
    "controlnet": (tiny_flux_controlnet, lambda h, w, seed: {
        **flux_inputs(h, w, batch=1, seed=seed),
        "controlnet_cond": torch.randn(1, h * w, 16, generator=torch.Generator().manual_seed(seed + 1))}),
    "wan": (tiny_wan, lambda h, w, seed: wan_inputs(2, h, w, batch=1, seed=seed)),  # 2 latent frames of h x w
}


def _clear_model(family, backend, checkpointing, radius=3, down_factor=1):
    model = FAMILIES[family][0]()
    clear.apply_clear(model, radius=radius, down_factor=down_factor, backend=backend)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _loss(model, x):
    out = model(**x)
    if hasattr(out, "controlnet_block_samples"):
        return sum(t.square().mean() for t in (*out.controlnet_block_samples, *out.controlnet_single_block_samples))
    sample = out[0] if isinstance(out, tuple) else out.sample
    return sample.square().mean()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_interleaved_equals_separate(family, backend, grids, checkpointing, down_factor=1):
    """Both forwards, then one backward, against a fresh model per forward; every gradient to 1e-5 of its norm."""
    inputs = [FAMILIES[family][1](h, w, seed) for seed, (h, w) in enumerate(grids)]
    shared = _clear_model(family, backend, checkpointing, down_factor=down_factor)
    sum(_loss(shared, x) for x in inputs).backward()
    got = _grads(shared)
    want = {}
    for x in inputs:
        alone = _clear_model(family, backend, checkpointing, down_factor=down_factor)
        _loss(alone, x).backward()
        for name, g in _grads(alone).items():
            want[name] = want[name] + g if name in want else g
    assert got.keys() == want.keys() and len(got) > 10
    worst = max(((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item() for n in want)
    assert worst <= 1e-5, f"gradients {worst:.2%} off those of two separate models"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointing"])
@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("backend", CPU_BACKWARD)
def test_flux_two_grids_one_backward(backend, grids, checkpointing):
    assert {"dense", "tiled"} <= set(CPU_BACKWARD)  # flex has no backward on CPU
    assert_interleaved_equals_separate("flux", backend, grids, checkpointing)


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
def test_flux_pooled_tokens_two_grids_one_backward_checkpointed(grids):
    assert_interleaved_equals_separate("flux", "tiled", grids, True, down_factor=2)


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("family", ["sd3", "flux2", "qwenimage"])
def test_every_family_two_grids_one_backward_checkpointed(family, grids):
    assert_interleaved_equals_separate(family, "dense", grids, True)


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager", "checkpointing"])
@pytest.mark.parametrize("family", ["controlnet", "wan"])
def test_models_without_attention_kwargs_read_the_forward_in_progress(family, checkpointing, grids):
    """diffusers' FluxControlNetModel and WanTransformer3DModel hand no attention kwargs to their blocks: their
    processors take the forward in progress (right for every call of that forward), and a block that gradient
    checkpointing re-runs in the backward runs with its own forward's plan again (InProgress.replaying)."""
    assert_interleaved_equals_separate(family, "dense", grids, checkpointing)
    model = _clear_model(family, "dense", checkpointing)
    x = FAMILIES[family][1](8, 8, 0)
    _loss(model, x).backward()
    assert model.clear_state.in_progress.plan is None  # nothing of a forward stays after it
    with torch.no_grad():
        _loss(model, x)
    assert model.clear_state.in_progress.plan is None
    if checkpointing:  # remove_clear gives the model its own checkpointing function back
        wrapped = model._gradient_checkpointing_func
        clear.remove_clear(model)
        assert model._gradient_checkpointing_func is wrapped.func
