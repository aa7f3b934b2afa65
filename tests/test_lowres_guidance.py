"""Low-resolution guidance in the SDEdit path (I-Max's projected flow, clear.inference.highres.projected_flow):
the velocity it hands the scheduler against a direct computation (packed FLUX tokens and SD3's latent grid),
off by default and unchanged at weight 0, on through generate_highres and scripts/generate_highres.py on the
tiny pipelines of every family."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scripts_loader import load_script

import clear.inference as inf
from clear.inference.highres import _low_pass, projected_flow

TINY = ["--height", "32", "--width", "48", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu", "--quiet"]


class _Scheduler:
    """What projected_flow reads of a flow-matching scheduler."""

    def __init__(self, sigmas, index):
        self.sigmas = torch.tensor(sigmas)
        self.step_index, self.begin_index = index, 0

    def scale_noise(self, sample, timestep, noise=None):
        return sample


class _Velocity(torch.nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, hidden_states, timestep=None):
        return (self.v.clone(),)


def _direct(x_t_grid, v_grid, ref_grid, sigma, sigma_first, weight, factor):
    h, w = x_t_grid.shape[-2:]

    def low(g):
        return F.interpolate(F.adaptive_avg_pool2d(g, (round(h / factor), round(w / factor))), size=(h, w),
                             mode="bilinear", align_corners=False)

    x0 = x_t_grid - sigma * v_grid
    return v_grid - weight * sigma / sigma_first * (low(ref_grid) - low(x0)) / sigma


@pytest.mark.parametrize("packed", [True, False])
def test_projected_flow_matches_direct_computation(packed):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 4, 8, 12, generator=g)  # [B, C, H, W] latents, as the img2img pipeline noises them
    if packed:  # FLUX: 2x2 latent patches per token, channels (c, dy, dx)
        grid = lambda t: t.transpose(1, 2).reshape(1, 16, 4, 6)  # noqa: E731
        ref_grid = ref.view(1, 4, 4, 2, 6, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 16, 4, 6)
        x_t, v = torch.randn(1, 24, 16, generator=g), torch.randn(1, 24, 16, generator=g)
    else:  # SD3: the latent grid itself
        grid = lambda t: t  # noqa: E731
        ref_grid = ref
        x_t, v = torch.randn(1, 4, 8, 12, generator=g), torch.randn(1, 4, 8, 12, generator=g)
    scheduler = _Scheduler([0.9, 0.6, 0.3, 0.0], 0)
    model = _Velocity(v)
    with projected_flow(model, scheduler, weight=0.8, factor=2):
        scheduler.scale_noise(ref, None)
        first = model(hidden_states=x_t)[0]
        scheduler.step_index = 2
        later = model(hidden_states=x_t)[0]
    torch.testing.assert_close(grid(first), _direct(grid(x_t), grid(v), ref_grid, 0.9, 0.9, 0.8, 2))
    torch.testing.assert_close(grid(later), _direct(grid(x_t), grid(v), ref_grid, 0.3, 0.9, 0.8, 2))
    # everything put back: no hook, the class's scale_noise
    assert torch.equal(model(hidden_states=x_t)[0], v) and "scale_noise" not in vars(scheduler)
    # weight 0: nothing is touched
    with projected_flow(model, scheduler, weight=0.0, factor=2):
        assert "scale_noise" not in vars(scheduler) and torch.equal(model(hidden_states=x_t)[0], v)


def test_projected_flow_state_belongs_to_each_call():
    """Two pipeline calls in one context (run_upscale's untimed warm-up, then the timed call) each get exactly
    the correction a fresh context gives them: the second call's first sigma is its own (0.6), not the warm-up's
    (1.0), and its reference is its own input."""
    g = torch.Generator().manual_seed(1)
    grid = lambda t: t.transpose(1, 2).reshape(1, 16, 4, 6)  # noqa: E731
    refs = [torch.randn(1, 4, 8, 12, generator=g) for _ in range(2)]
    x_t, v = torch.randn(1, 24, 16, generator=g), torch.randn(1, 24, 16, generator=g)
    model = _Velocity(v)

    def call(scheduler, ref, start):  # what an img2img call does: noise its input, then step from ``start``
        scheduler.step_index = None
        scheduler.begin_index = start
        scheduler.scale_noise(ref, None)
        out = []
        for i in range(start, len(scheduler.sigmas) - 1):
            scheduler.step_index = i
            out.append(model(hidden_states=x_t)[0])
        return out

    warm, timed = _Scheduler([1.0, 0.0], 0), _Scheduler([1.0, 0.8, 0.6, 0.3, 0.0], 0)
    with projected_flow(model, warm, weight=0.8, factor=2):
        call(warm, refs[0], 0)
    with projected_flow(model, timed, weight=0.8, factor=2):
        fresh = call(timed, refs[1], 2)
    scheduler = _Scheduler([1.0, 0.0], 0)
    with projected_flow(model, scheduler, weight=0.8, factor=2):
        first = call(scheduler, refs[0], 0)
        scheduler.sigmas = timed.sigmas  # the timed call's schedule (as a new set_timesteps would make it)
        second = call(scheduler, refs[1], 2)
    ref_grid = refs[1].view(1, 4, 4, 2, 6, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 16, 4, 6)
    for got, want, sigma in zip(second, fresh, (0.6, 0.3)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(grid(got), _direct(grid(x_t), grid(v), ref_grid, sigma, 0.6, 0.8, 2))
    assert len(first) == 1 and len(second) == 2


def test_upscale_warmup_leaves_the_guided_image_unchanged(tiny_flux_pipeline_dir):
    """``warmup=True`` runs an untimed 1-step call first inside the same context; the timed call's image is the
    one it makes without the warm-up (before the fix, the warm-up's first sigma, 1, weakened the timed call's
    guidance to sigma_start / 1 of the intended)."""
    pipe = inf.load_pipeline(tiny_flux_pipeline_dir, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    base = inf.generate(pipe, "a cat", 32, 48, steps=2, seed=3, max_sequence_length=16).image
    common = dict(strength=0.6, steps=5, seed=3, max_sequence_length=16, ntk_factor=1, proportional=False,
                  shift=None, lowres_guidance=1.0)
    cold = inf.upscale(pipe, base, "a cat", 64, 96, warmup=False, **common)
    warm = inf.upscale(pipe, base, "a cat", 64, 96, warmup=True, **common)
    assert np.array_equal(np.asarray(warm.image), np.asarray(cold.image))
    off = inf.upscale(pipe, base, "a cat", 64, 96, warmup=False, **dict(common, lowres_guidance=0.0))
    assert not np.array_equal(np.asarray(off.image), np.asarray(cold.image))  # the guidance did act


def test_low_pass_keeps_what_is_coarse():
    flat = torch.full((1, 3, 8, 8), 2.5)
    torch.testing.assert_close(_low_pass(flat, 4), flat)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1
    assert _low_pass(checker[None, None].float(), 2).abs().max() < 1e-6  # the finest pattern is removed


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_generate_highres_guidance_off_by_default_and_on_when_asked(family, request):
    pipe = inf.load_pipeline(request.getfixturevalue(f"tiny_{family}_pipeline_dir"), "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    common = dict(sizes=[(64, 96)], base_size=(32, 48), clear=inf.ClearSpec(2), strength=0.9, steps=2,
                  upscale_steps=6, seed=3, max_sequence_length=16, progress=False)
    base = inf.generate_highres(pipe, "a cat", [], (32, 48), steps=2, seed=3, max_sequence_length=16,
                                progress=False)[0].image
    runs = {w: inf.generate_highres(pipe, "a cat", base_image=base, lowres_guidance=w, **common)[-1]
            for w in (0.0, 1.0)}
    default = inf.generate_highres(pipe, "a cat", base_image=base, **common)[-1]
    assert np.array_equal(np.asarray(default.image), np.asarray(runs[0.0].image))  # off by default
    assert not np.array_equal(np.asarray(runs[1.0].image), np.asarray(runs[0.0].image))
    assert runs[1.0].result.settings["lowres_guidance"] == 1.0 and default.result.settings["lowres_guidance"] == 0.0
    # every upscaling step's velocity was guided: the scheduler got other velocities than the transformer gave
    seen = []
    real_step = type(pipe.scheduler).step

    def spy(self, model_output, *a, **k):
        seen.append(model_output.clone())
        return real_step(self, model_output, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(pipe.scheduler), "step", spy)
        for w in (0.0, 1.0):
            inf.generate_highres(pipe, "a cat", base_image=base, lowres_guidance=w, **common)
    n = len(seen) // 2
    assert len(seen) == 2 * n and n >= 5
    assert all(not torch.allclose(a, b) for a, b in zip(seen[:n], seen[n:]))
    assert "scale_noise" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match="lowres_guidance must be >= 0"):
        inf.generate_highres(pipe, "a cat", base_image=base, lowres_guidance=-1, **common)


def test_highres_cli_lowres_guidance(tiny_flux_pipeline_dir, tmp_path):
    written = load_script("generate_highres").main(["--model", tiny_flux_pipeline_dir, *TINY, "--radius", "3",
                                                    "--checkpoint", "none", "--upscale", "64x96",
                                                    "--lowres_guidance", "0.5", "--out", str(tmp_path / "hr.png")])
    settings = json.loads(Image.open(written["image"]).text["clear:settings"])
    assert settings["lowres_guidance"] == 0.5 and settings["source_size"] == "32x48"
