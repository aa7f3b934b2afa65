"""Inference: scripts/generate.py end to end, the SDEdit high-resolution path, its options
(NTK RoPE, proportional attention, fixed shift) against direct computations, pipelines
(ControlNet, schnell), early errors, resolving once and the mask picture; and no silent wrong output:
non-finite values stop with a message and no PNG, every check that needs no weights runs before they load,
messages name local paths, the offline Hub and the fix, and --help is fast. Scenarios every
family shares run on each (``family``: the tiny FLUX.1-dev-like and SD3.5-Medium-like
pipelines); SD3-only ones are in tests/test_inference_sd3.py. CPU, tiny pipelines."""

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
from scripts_loader import cli_error, load_script
import torch
import torch.nn.functional as F
from PIL import Image

import clear
import clear.inference as inf
import clear.visualize as vis
import clear.weights as weights
from clear.families import get_family
from clear.families.base import check_size as size_rule
from clear.attention import pool_tokens
from clear.geometry import TokenLayout, Window, allowed_mask
from tiny_models import TINY_ARGS, clear_checkpoint, load_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent

# What differs per family in the shared scenarios: classes, and the defaults of the tiny pipelines' models
# (FLUX.1-dev-like: guidance 3.5; SD3.5-Medium-like: 4.5)
FAMILY = {
    "flux": dict(pipeline="FluxPipeline", img2img="FluxImg2ImgPipeline", processor="FluxClearAttnProcessor",
                 guidance=3.5),
    "sd3": dict(pipeline="StableDiffusion3Pipeline", img2img="StableDiffusion3Img2ImgPipeline",
                processor="SD3ClearAttnProcessor", guidance=4.5),
}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_flux_pipeline_dir):
    return load_tiny_pipeline(tiny_flux_pipeline_dir)


@pytest.fixture
def fresh_pipe(tiny_flux_pipeline_dir):
    return load_tiny_pipeline(tiny_flux_pipeline_dir)


@pytest.fixture(params=sorted(FAMILY))
def family(request):
    return request.param


@pytest.fixture
def family_dir(family, request):
    """The family's tiny pipeline, saved (tests/conftest.py)."""
    return request.getfixturevalue(f"tiny_{family}_pipeline_dir")


@pytest.fixture
def family_pipe(family_dir):
    return load_tiny_pipeline(family_dir)


@pytest.fixture
def no_loading(monkeypatch):
    """Records every attempt to read a pipeline's config or weights (there must be none)."""
    from diffusers import DiffusionPipeline, FluxPipeline

    calls = []

    def record(name):
        def fail(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called before the settings were checked")
        return fail

    monkeypatch.setattr(FluxPipeline, "from_pretrained", record("FluxPipeline.from_pretrained"))
    monkeypatch.setattr(DiffusionPipeline, "load_config", record("DiffusionPipeline.load_config"))
    return calls


def _eval(pipe):
    """Pipelines built in memory (not from_pretrained) have T5 in training mode: dropout on."""
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def record_forwards(transformer, log):
    """A pre-hook logging, per transformer forward, what it runs with: the token grid, the timestep,
    the attention processors, the NTK factor of its positions and its CLEAR state."""

    def hook(module, args, kwargs):
        state = getattr(module, "clear_state", None)
        if "img_ids" in kwargs:  # FLUX: the positions of the packed latents
            grid = clear.geometry.grid_from_ids(kwargs["img_ids"])
        else:  # SD3: latents [B, C, H, W], patch x patch pixels of them per token
            h, w = kwargs["hidden_states"].shape[-2:]
            grid = (h // module.config.patch_size, w // module.config.patch_size)
        log.append(dict(grid=grid, timestep=float(kwargs["timestep"][0]),
                        processors={type(p).__name__ for p in module.attn_processors.values()},
                        ntk=getattr(module.pos_embed, "ntk_factor", 1.0), radius=state.radius if state else "off",
                        proportional=state.core.proportional_attention if state else False))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------
# generate.py end to end
# ------------------------------------------------------------------------------------------


def test_generate_cli_writes_png_with_settings(generate_cli, tiny_flux_pipeline_dir, tmp_path):
    out = tmp_path / "img.png"
    written = generate_cli.main(["--model", tiny_flux_pipeline_dir, "--prompt", "a red house", *TINY_ARGS,
                                 "--variant", "clear_local_2_down_2", "--checkpoint", "none", "--seed", "7",
                                 "--out", str(out)])
    assert written == {"image": str(out)}
    im = Image.open(out)
    assert im.format == "PNG" and im.size == (48, 32)  # width x height
    text = im.text
    settings = json.loads(text["clear:settings"])
    assert settings["prompt"] == "a red house" and settings["seed"] == 7 and settings["steps"] == 2
    assert settings["radius"] == 2 and settings["down_factor"] == 2 and settings["checkpoint"] == "none"
    assert (settings["height"], settings["width"]) == (32, 48) and settings["attention"] == "CLEAR r=2 df=2"
    assert text["clear:prompt"] == "a red house" and text["Software"].startswith("clear ")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_cli_compare_and_a_checkpoint_of_the_family(family, family_dir, generate_cli, tmp_path):
    parser = generate_cli.build_parser()
    args = generate_cli.resolve_args(parser.parse_args(
        ["--model", family_dir, "--prompt", "a red house", *TINY_ARGS, "--radius", "100", "--checkpoint", "none",
         "--compare", "--seed", "5", "--out", str(tmp_path / "cmp.png")]))
    assert args.family.name == family and args.ntk_factor is None
    pipe = generate_cli.build_pipeline(args)
    assert type(pipe).__name__ == FAMILY[family]["pipeline"]
    log = []
    hook = record_forwards(pipe.transformer, log)
    try:
        written = generate_cli.run(args, pipe)
    finally:
        hook.remove()
    assert set(written) == {"image", "original", "compare"}
    # 2 steps of the original model, then 2 with CLEAR on every attention layer (SD3: joint and attn2)
    processor = FAMILY[family]["processor"]
    assert [e["radius"] for e in log] == ["off", "off", 100, 100]
    assert processor not in log[0]["processors"] and log[2]["processors"] == {processor}
    assert all(e["grid"] == (8, 12) for e in log)
    im = Image.open(written["image"])
    assert im.size == (48, 32) and Image.open(written["original"]).size == (48, 32)
    # radius 100 covers the 8x12 token grid: CLEAR is the original model, bit for bit
    assert np.array_equal(_pixels(written["image"]), _pixels(written["original"]))
    settings = json.loads(im.text["clear:settings"])
    # the model's defaults (guidance) unless given
    assert settings["guidance"] == FAMILY[family]["guidance"] and settings["steps"] == 2 and settings["seed"] == 5
    assert settings["attention"] == "CLEAR r=100" and settings["max_sequence_length"] == 16
    grid = Image.open(written["compare"])
    assert grid.width >= 2 * 48 and grid.height > 32  # two panels side by side under their labels
    meta = json.loads(grid.text["clear:settings"])
    assert meta["labels"][0].startswith("original:") and meta["labels"][1].startswith("CLEAR r=100:")
    assert meta["original_seconds"] > 0 and meta["clear_seconds"] > 0
    # the original panel is pasted unchanged into the grid
    orig = _pixels(written["original"])
    g = np.asarray(grid.convert("RGB")).astype(int)
    found = [(y, x) for y in range(g.shape[0] - 31) for x in range(0, 8)
             if np.array_equal(g[y:y + 32, x:x + 48], orig)]
    assert found

    # a small window with trained (here: perturbed) weights of the family changes the image; the file is loaded
    ckpt = clear_checkpoint(tmp_path / f"{family}_r2.safetensors", radius=2, family=family)
    out = generate_cli.main(["--model", family_dir, "--prompt", "a red house", *TINY_ARGS, "--radius", "2",
                             "--seed", "5", "--checkpoint", ckpt, "--out", str(tmp_path / "r2.png")])
    local = Image.open(out["image"])
    assert local.size == (48, 32) and json.loads(local.text["clear:settings"])["checkpoint"] == ckpt
    assert np.abs(_pixels(out["image"]) - _pixels(written["original"])).max() > 0


def test_released_checkpoint_from_ckpt_dir_is_loaded(generate_cli, tiny_flux_pipeline_dir, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    clear_checkpoint(ckpt_dir / "clear_local_16.safetensors", radius=16)  # what download_weights would have put there
    base = ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "16"]
    trained = generate_cli.main([*base, "--ckpt_dir", str(ckpt_dir), "--out", str(tmp_path / "t.png")])
    untrained = generate_cli.main([*base, "--checkpoint", "none", "--out", str(tmp_path / "u.png")])
    assert Image.open(trained["image"]).text["clear:checkpoint"] == str(ckpt_dir / "clear_local_16.safetensors")
    assert np.abs(_pixels(trained["image"]) - _pixels(untrained["image"])).max() > 0


def test_size_errors_come_before_any_heavy_work(family, family_dir, generate_cli, tmp_path, forbid_loading):
    base = ["--model", family_dir, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    # 4 pixels per token in both tiny pipelines (VAE factor 2 x patch 2)
    with pytest.raises(ValueError, match=r"height=30 is not a positive multiple of 4"):
        generate_cli.main([*base, "--height", "30", "--width", "48", "--checkpoint", "none"])
    with pytest.raises(ValueError, match=r"not divisible by down_factor=4.*multiples of 16"):
        generate_cli.main([*base, "--height", "32", "--width", "40", "--radius", "2", "--down_factor", "4",
                           "--checkpoint", "none"])
    with pytest.raises(ValueError, match=r"multiple of 4"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--checkpoint", "none", "--upscale", "64x90"])


def test_an_upscale_stage_must_be_larger_than_the_image_before(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                               forbid_loading):
    """`--upscale 4` (a factor, as people type it) is a 4x4-pixel stage: refused before anything loads, with the
    syntax; the factor forms 2x / x2 scale the image before each stage."""
    base = ["--model", tiny_flux_pipeline_dir, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png"),
            "--height", "32", "--width", "48", "--checkpoint", "none"]
    for upscale, stage in (("4", "1, 4x4 pixels"), ("64x96,64x96", "2, 64x96 pixels")):
        with pytest.raises(ValueError, match=rf"upscaling stage {stage}, is no larger than the image before it "
                                             r"\(\d+x\d+\): stages are sizes HEIGHTxWIDTH .*--upscale 2x,2x"):
            generate_cli.main([*base, "--upscale", upscale])
    args = generate_cli.resolve_args(generate_cli.build_parser().parse_args([*base, "--upscale", "2x,x1.5"]))
    assert args.sizes == [(64, 96), (96, 144)] and args.plan.sizes == ((64, 96), (96, 144))
    with pytest.raises(ValueError, match="no larger than the image before it"):
        inf.plan_generation(args.plan.info, (32, 48), [(32, 48)])  # the library refuses it too


def test_errors_come_before_any_heavy_work(generate_cli, tiny_flux_pipeline_dir, tmp_path, forbid_loading):
    base = ["--model", tiny_flux_pipeline_dir, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]

    ck = clear_checkpoint(tmp_path / "mine.safetensors", radius=8, down_factor=2)
    with pytest.raises(ValueError, match=r"radius=8 but the chosen variant is clear_local_16_down_2.*--radius 8"):
        generate_cli.main([*base, "--height", "32", "--width", "32", "--radius", "16", "--down_factor", "2",
                           "--checkpoint", ck])
    with pytest.raises(ValueError, match=r"down_factor=2 but the chosen variant is clear_local_8 "):
        generate_cli.main([*base, "--height", "32", "--width", "32", "--variant", "clear_local_8", "--checkpoint", ck])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate_cli.main([*base, "--checkpoint", str(tmp_path / "nope.safetensors")])
    with pytest.raises(ValueError, match="contradicts --variant"):
        generate_cli.main([*base, "--variant", "clear_local_16", "--radius", "8", "--checkpoint", "none"])
    with pytest.raises(ValueError, match="no released CLEAR weights for radius=12"):
        generate_cli.main([*base, "--radius", "12"])

    # no network, no file: the error says where to put it
    with pytest.raises(FileNotFoundError, match=r"put it at .*ckpt_empty/clear_local_16_down_4\.safetensors"):
        generate_cli.main([*base, "--variant", "clear_local_16_down_4", "--ckpt_dir", str(tmp_path / "ckpt_empty")])

    # SD3 pipelines are accepted (tests/test_inference_sd3.py); other families are not
    for name, cls, denoiser, message in [
        ("sdxl", "StableDiffusionXLPipeline", ["unet", ["diffusers", "UNet2DConditionModel"]],
         "is a StableDiffusionXLPipeline.*CLEAR inference supports FLUX.1 and SD3/SD3.5 pipelines"),
        ("pixart", "PixArtSigmaPipeline", ["transformer", ["diffusers", "PixArtTransformer2DModel"]],
         r"is a PixArtSigmaPipeline \(transformer: PixArtTransformer2DModel\); CLEAR inference supports")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": cls, denoiser[0]: denoiser[1]}))
        with pytest.raises(ValueError, match=message):
            generate_cli.main([*base, "--model", str(tmp_path / name), "--checkpoint", "none"])
    with pytest.raises(ValueError, match="could not read the pipeline config"):
        generate_cli.main([*base, "--model", str(tmp_path), "--checkpoint", "none"])


# ------------------------------------------------------------------------------------------
# High resolution (SDEdit)
# ------------------------------------------------------------------------------------------


def _upscale_timesteps(family, shift):
    """The timesteps the transformer sees in the last 2 steps of a 4-step img2img schedule with a fixed
    ``shift`` (strength 0.5). FLUX's img2img passes sigmas from 1 to 1/4 and the transformer gets the
    sigma; SD3's passes none: diffusers spaces them from 1 to the shifted sigma_min, then shifts
    (timesteps = 1000 sigma)."""
    if family == "flux":
        sigmas = np.linspace(1.0, 1 / 4, 4)[2:]
        return shift * sigmas / (1 + (shift - 1) * sigmas)
    sigma_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    sigmas = np.linspace(1.0, sigma_min, 4)[2:]
    return 1000 * shift * sigmas / (1 + (shift - 1) * sigmas)


def test_highres_two_non_square_stages(family, family_pipe):
    pipe = family_pipe
    original_pe, scheduler_shift = pipe.transformer.pos_embed, pipe.scheduler.config.shift
    img2img_cls = getattr(diffusers, FAMILY[family]["img2img"])
    real_call = img2img_cls.__call__
    img2img_calls = []

    def spy(self, *a, **k):
        img2img_calls.append((self.transformer is pipe.transformer, self.vae is pipe.vae, k["height"], k["width"]))
        return real_call(self, *a, **k)

    # FLUX: NTK x10 and the default fixed shift 3; SD3 (no RoPE) a fixed shift 2 (its scheduler's: 3)
    options, shift, ntk = (dict(ntk_factor=10), 3.0, 10.0) if family == "flux" else (dict(shift=2.0), 2.0, 1.0)
    log = []
    hook = record_forwards(pipe.transformer, log)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(img2img_cls, "__call__", spy)
            stages = inf.generate_highres(pipe, "a small blue plane", sizes=[(48, 64), (64, 96)], base_size=(32, 48),
                                          clear=inf.ClearSpec(2, 2), strength=0.5, steps=2, upscale_steps=4, seed=1,
                                          max_sequence_length=16, progress=False, **options)
    finally:
        hook.remove()

    assert [(s.kind, s.height, s.width) for s in stages] == [("base", 32, 48), ("upscale", 48, 64),
                                                             ("upscale", 64, 96)]
    assert [s.image.size for s in stages] == [(48, 32), (64, 48), (96, 64)]
    assert stages[1].source is stages[0].image and stages[2].source is stages[1].image
    # diffusers' img2img pipeline of the family on the very same components, once per stage
    assert img2img_calls == [(True, True, 48, 64), (True, True, 64, 96)]
    # base: the original model, plain positions; upscaling: CLEAR r=2 df=2, proportional attention, FLUX's NTK;
    # 2 steps each
    assert [(e["grid"], e["radius"], e["proportional"], e["ntk"]) for e in log] == (
        [((8, 12), "off", False, 1.0)] * 2 + [((12, 16), 2, True, ntk)] * 2 + [((16, 24), 2, True, ntk)] * 2)
    # the fixed shift: strength 0.5 runs the last 2 steps of a 4-step schedule
    np.testing.assert_allclose([e["timestep"] for e in log[2:4]], _upscale_timesteps(family, shift), rtol=1e-5)
    np.testing.assert_allclose([e["timestep"] for e in log[4:]], _upscale_timesteps(family, shift), rtol=1e-5)
    # everything is put back: the very same pos_embed object, the plain softmax scale, the pipeline's scheduler
    assert pipe.transformer.pos_embed is original_pe
    assert pipe.transformer.clear_state.core.proportional_attention is False
    assert pipe.scheduler.config.shift == scheduler_shift and (family != "sd3" or scheduler_shift == 3.0)
    settings = stages[2].result.settings
    assert settings["shift"] == shift and settings["strength"] == 0.5 and settings["proportional_attention"] is True
    assert settings["source_size"] == "48x64" and settings["guidance"] == FAMILY[family]["guidance"]
    # SD3: no RoPE to scale, so NTK is not applied (and the settings say so)
    assert settings["ntk_factor"] == (10.0 if family == "flux" else None)


def test_highres_cli_writes_every_stage(family, family_dir, tmp_path):
    out = tmp_path / "hr.png"
    last = {"flux": "64x48", "sd3": "64x96"}[family]
    written = load_script("generate_highres").main(["--model", family_dir, *TINY_ARGS, "--radius", "3",
                                                    "--checkpoint", "none", "--upscale", f"48x32,{last}",
                                                    "--upscale_steps", "3", "--vae_tiling", "on", "--out", str(out)])
    assert Image.open(written["stage0"]).size == (48, 32)
    assert Image.open(written["stage1"]).size == (32, 48)
    final = Image.open(written["image"])
    h, w = map(int, last.split("x"))
    assert final.size == (w, h)
    settings = json.loads(final.text["clear:settings"])
    assert settings["stages"] == 3 and settings["source_size"] == "48x32" and settings["vae_tiling"] is True
    assert settings["proportional_attention"] is True and settings["attention"] == "CLEAR r=3"
    assert settings["ntk_factor"] == (10.0 if family == "flux" else None)


def test_vae_tiling_decided_by_the_latent_size(tiny_pipe):
    """VAE tiling (tiling=None) is on from VAE_TILING_LATENTS latent cells: FLUX's 8x VAE from 2048² pixels, the
    mini teacher's 2x VAE from 512² pixels; a threshold given or tiling given says otherwise."""
    from types import SimpleNamespace

    flux8, mini2 = SimpleNamespace(vae_scale_factor=8), SimpleNamespace(vae_scale_factor=2)
    assert inf.VAE_TILING_LATENTS == 256 * 256
    assert inf.wants_vae_tiling(flux8, 2048, 2048) and not inf.wants_vae_tiling(flux8, 2048, 2040)
    assert inf.wants_vae_tiling(mini2, 512, 512) and not inf.wants_vae_tiling(mini2, 256, 256)
    assert inf.wants_vae_tiling(flux8, 1024, 1024, tiling_latents=128 * 128)
    assert not inf.wants_vae_tiling(flux8, 4096, 4096, tiling=False) and inf.wants_vae_tiling(mini2, 8, 8, tiling=True)
    assert inf.wants_vae_tiling(mini2, 8, 8, tiling_latents=0)  # 0: always
    assert inf.plan_generation(tiny_pipe, (32, 48), [(64, 96)], tiling_latents=7).tiling_latents == 7
    with pytest.raises(ValueError, match="tiling_latents must be >= 0"):
        inf.plan_generation(tiny_pipe, (32, 48), [(64, 96)], tiling_latents=-1)
    parser = load_script("generate_highres").build_parser()
    assert parser.parse_args([]).vae_tiling_latents == inf.VAE_TILING_LATENTS


def test_highres_cli_vae_tiling_threshold(tiny_flux_pipeline_dir, tmp_path):
    """--vae_tiling_latents reaches the plan: 0 tiles every stage, the default none of these small ones."""
    seen = {}
    for latents in ("0", None):
        argv = ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "3", "--checkpoint", "none",
                "--upscale", "48x32", "--upscale_steps", "2", "--out", str(tmp_path / f"{latents}.png")]
        written = load_script("generate_highres").main(argv + (["--vae_tiling_latents", latents] if latents else []))
        seen[latents] = json.loads(Image.open(written["image"]).text["clear:settings"])["vae_tiling"]
    assert seen == {"0": True, None: False}


@pytest.mark.parametrize("tiling_latents, on", [(32 * 48, True), (32 * 48 + 1, False)])
def test_upscale_tiles_the_vae_above_the_threshold_only(tiny_pipe, tiling_latents, on):
    """A 64 x 96 stage of the tiny FLUX pipeline (VAE factor 2: 32 x 48 latent cells): the VAE encodes and decodes
    tiled exactly when the cells reach the threshold, through generate_highres's plan too; afterwards the VAE
    is untiled again."""
    seen = []
    vae = tiny_pipe.vae
    real_encode, real_decode = type(vae).encode, type(vae).decode

    def encode(self, *a, **k):
        seen.append(("encode", self.use_tiling))
        return real_encode(self, *a, **k)

    def decode(self, *a, **k):
        seen.append(("decode", self.use_tiling))
        return real_decode(self, *a, **k)

    base = Image.new("RGB", (48, 32), (200, 40, 40))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(vae), "encode", encode)
        mp.setattr(type(vae), "decode", decode)
        res = inf.upscale(tiny_pipe, base, "a cat", 64, 96, strength=0.5, steps=2, max_sequence_length=16,
                          tiling_latents=tiling_latents)
        stages = inf.generate_highres(tiny_pipe, "a cat", [(64, 96)], base_size=(32, 48), base_image=base,
                                      strength=0.5, steps=2, max_sequence_length=16, progress=False,
                                      tiling_latents=tiling_latents)
    assert res.settings["vae_tiling"] is on and stages[-1].result.settings["vae_tiling"] is on
    assert seen == [("encode", on), ("decode", on)] * 2
    assert vae.use_tiling is False


def test_tiled_vae_decode_is_close_to_untiled():
    """diffusers' own tiling on the mini teacher's trained VAE (ckpt/mini/vae: 32-latent tiles, a quarter
    overlapped) at 128 px, where the 64 x 64 latents need 9 tiles: the image decoded tiled is within 30 dB PSNR
    of the untiled one and as close to the scene. (A random-weight VAE is no test of this: its group norms
    and mid-block attention see the whole image, so its tiles differ.)"""
    from diffusers import AutoencoderKL

    from clear.mini import scenes as S
    from clear.mini.teacher import MINI_DIR, images_tensor, psnr

    vae = AutoencoderKL.from_pretrained(MINI_DIR / "vae").eval()
    x = images_tensor([S.render(sc, 128) for sc in S.held_out_scenes(2, seed=4)])
    tiles = []
    real = type(vae).tiled_decode
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(vae), "tiled_decode", lambda self, z, *a, **k: tiles.append(z.shape) or real(self, z, *a, **k))
        z = vae.encode(x).latent_dist.mode()
        plain = vae.decode(z).sample
        with inf.vae_tiling(vae, True):
            tiled = vae.decode(z).sample
    assert tiles == [z.shape] and z.shape[-1] > vae.tile_latent_min_size and not vae.use_tiling
    assert not torch.equal(tiled, plain)  # the tiles were decoded apart
    assert psnr(tiled, plain) > 30
    assert psnr(tiled, x) > psnr(plain, x) - 1.0


def test_ntk_rope_matches_direct_computation(flux):
    ids = torch.zeros(5, 3)  # text ids are all zero
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(9.0), indexing="ij")
    ids = torch.cat([ids, torch.stack([torch.zeros(54), rows.flatten(), cols.flatten()], 1)])
    plain_cos, plain_sin = flux.pos_embed(ids)
    original = flux.pos_embed

    def direct(factor):
        cos, sin = [], []
        for axis, dim in enumerate(flux.config.axes_dims_rope):
            inv = 1.0 / (10000.0 * factor) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angles = ids[:, axis].double()[:, None] * inv[None]
            cos.append(angles.cos().repeat_interleave(2, 1))
            sin.append(angles.sin().repeat_interleave(2, 1))
        return torch.cat(cos, 1).float(), torch.cat(sin, 1).float()

    torch.testing.assert_close((plain_cos, plain_sin), direct(1.0))
    with inf.ntk_rope(flux, 10):
        assert isinstance(flux.pos_embed, inf.NTKFluxPosEmbed)
        cos, sin = flux.pos_embed(ids)
    torch.testing.assert_close((cos, sin), direct(10.0))
    assert (cos - plain_cos).abs().max() > 0.02  # a real change, not rounding
    assert flux.pos_embed is original
    inf.set_ntk_rope(flux, 4)
    torch.testing.assert_close(flux.pos_embed(ids), direct(4.0))
    inf.set_ntk_rope(flux, 1)
    assert type(flux.pos_embed) is type(original)
    torch.testing.assert_close(flux.pos_embed(ids), direct(1.0))


def test_proportional_attention_scale_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout(7, 6, 10)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    core = clear.ClearAttention(None, proportional_attention=True, backend="dense")
    training_tokens = 64 * 64 + 512  # a ClearAttention made by hand: FLUX.1-dev's L0 (1024^2, T5 512)
    scale = math.sqrt(math.log(layout.seq_len) / math.log(training_tokens) / 16)
    assert core.scale(layout, 16) == pytest.approx(scale) and scale != pytest.approx(1 / 4)

    def sdpa(s, mask=None):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, scale=s).transpose(1, 2)

    torch.testing.assert_close(core(q, k, v, layout), sdpa(scale))
    local = clear.ClearAttention(3, proportional_attention=True, backend="dense")
    torch.testing.assert_close(local(q, k, v, layout), sdpa(scale, allowed_mask(layout, Window(3))))
    assert (core(q, k, v, layout) - sdpa(0.25)).abs().max() > 1e-3


def test_proportional_attention_context_on_original_and_clear_models(fresh_pipe):
    pipe = fresh_pipe
    with inf.proportional_attention(pipe):  # the original model gets full-attention CLEAR for the block
        assert pipe.transformer.clear_state.radius is None
        assert pipe.transformer.clear_state.core.proportional_attention
    assert pipe.transformer.clear_state is None
    inf.apply_to_pipeline(pipe, 2)
    core = pipe.transformer.clear_state.core
    with inf.proportional_attention(pipe):
        assert core.proportional_attention
    assert not core.proportional_attention and pipe.transformer.clear_state.radius == 2


def test_proportional_scale_release_formula_for_down_sampled_variants():
    layout = TokenLayout(7, 8, 12)
    n, l0, d = layout.seq_len, 64 * 64 + 512, 16
    release = math.sqrt(math.log(10 * n, l0) / d)
    plain = math.sqrt(math.log(n, l0) / d)
    assert clear.ClearAttention(3, 2, proportional_attention=True).scale(layout, d) == pytest.approx(release, 1e-12)
    assert clear.ClearAttention(3, 2, proportional_attention="release").scale(layout, d) == pytest.approx(release)
    assert clear.ClearAttention(3, 2, proportional_attention="plain").scale(layout, d) == pytest.approx(plain, 1e-12)
    assert clear.ClearAttention(3, 1, proportional_attention=True).scale(layout, d) == pytest.approx(plain, 1e-12)
    assert clear.ClearAttention(3, 2, proportional_attention=False).scale(layout, d) == 0.25
    with pytest.raises(ValueError, match="proportional_attention must be one of"):
        clear.ClearAttention(3, 2, proportional_attention="yes")
    # FLUX.1 at 4096² with df = 4: the two formulas are ~10% apart
    big = TokenLayout(512, 256, 256)
    ratio = clear.ClearAttention(16, 4, proportional_attention=True).scale(big, 128) / \
        clear.ClearAttention(16, 4, proportional_attention="plain").scale(big, 128)
    assert ratio == pytest.approx(math.sqrt(math.log(10 * big.seq_len) / math.log(big.seq_len)))
    assert 1.09 < ratio < 1.11
    # and the attention output is SDPA with that scale over [keys | pooled keys]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 2, d, generator=g) for _ in range(3))
    sw = torch.rand(1, 1, 1, 2, 1, 2, 1, generator=g)
    img = layout.image_slice
    kk = torch.cat([k, pool_tokens(k[:, img], 8, 12, sw)], 1)
    vv = torch.cat([v, pool_tokens(v[:, img], 8, 12, sw)], 1)
    mask = allowed_mask(layout, Window(3, 2))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask,
                                         scale=release).transpose(1, 2)
    core = clear.ClearAttention(3, 2, backend="dense", proportional_attention=True)
    torch.testing.assert_close(core(q, k, v, layout, sw), ref)


def test_highres_upscaling_uses_the_chosen_proportional_formula(tiny_flux_pipeline_dir):
    pipe = load_tiny_pipeline(tiny_flux_pipeline_dir)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a: seen.append(m.clear_state.core.proportional_attention if m.clear_state else None))
    for formula in (True, "plain"):
        inf.generate_highres(pipe, "a cat", [(48, 64)], (32, 48), clear=inf.ClearSpec(2, 2), steps=2, upscale_steps=2,
                             strength=0.5, proportional=formula, max_sequence_length=16, progress=False,
                             base_image=Image.new("RGB", (48, 32)))
    assert seen == [True, "plain"]
    assert pipe.transformer.clear_state.core.proportional_attention is False  # put back


def test_fixed_shift_scheduler_matches_direct_computation(tiny_pipe):
    sched = inf.fixed_shift_scheduler(tiny_pipe.scheduler, 3.0)
    assert not sched.config.use_dynamic_shifting and tiny_pipe.scheduler is not sched
    sigmas = np.linspace(1.0, 1 / 8, 8)
    sched.set_timesteps(sigmas=sigmas, mu=9.9)  # mu (resolution-dependent) is ignored
    expected = 3.0 * sigmas / (1 + 2.0 * sigmas)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-6)


def test_img2img_pipeline_shares_components_without_casting(family, family_pipe):
    pipe = family_pipe
    shift = pipe.scheduler.config.shift
    pipe.vae.to(torch.float64)
    img2img = inf.img2img_pipeline(pipe, inf.fixed_shift_scheduler(pipe.scheduler, 2.0))
    assert type(img2img).__name__ == FAMILY[family]["img2img"]
    assert img2img.transformer is pipe.transformer and img2img.vae is pipe.vae
    assert all(img2img.components[k] is v for k, v in pipe.components.items()
               if k in img2img.components and k != "scheduler")  # every text encoder too (SD3: text_encoder_3)
    assert pipe.vae.dtype == torch.float64  # from_pipe(dtype=float32 default) would have cast it
    assert img2img.scheduler.config.shift == 2.0 and pipe.scheduler.config.shift == shift
    assert family != "sd3" or shift == 3.0
    assert inf.img2img_pipeline(pipe).scheduler is pipe.scheduler  # no scheduler given: the pipeline's own


# ------------------------------------------------------------------------------------------
# Pipelines: ControlNet, schnell
# ------------------------------------------------------------------------------------------


def test_controlnet_pipeline_one_line(tmp_path):
    from tiny_models import tiny_flux_controlnet_pipeline

    pipe = tiny_flux_controlnet_pipeline()
    _eval(pipe)
    control = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    kw = dict(prompt="a dog", control_image=control, height=32, width=48, num_inference_steps=2,
              max_sequence_length=16, output_type="np")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    inf.apply_to_pipeline(pipe, radius=100)  # covers the grid: nothing may change
    assert pipe.transformer.clear_state is not None and pipe.controlnet.clear_state is not None
    np.testing.assert_allclose(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, ref, atol=1e-5)

    ckpt = clear_checkpoint(tmp_path / "clear_local_2_down_2.safetensors", radius=2, down_factor=2)
    inf.apply_to_pipeline(pipe, radius=2, down_factor=2, checkpoint=ckpt)
    assert pipe.controlnet.clear_state.radius == 2 and pipe.transformer.clear_state.down_factor == 2
    from safetensors.torch import load_file

    weights = load_file(ckpt)
    for model in (pipe.transformer, pipe.controlnet):  # the ControlNet takes the transformer's first blocks
        torch.testing.assert_close(model.get_parameter("transformer_blocks.0.attn.to_q.weight"),
                                   weights["transformer_blocks.0.attn.to_q.weight"])
    local = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert local.shape == ref.shape and np.isfinite(local).all() and np.abs(local - ref).max() > 1e-4
    with inf.ntk_rope(pipe, 10):
        assert isinstance(pipe.controlnet.pos_embed, inf.NTKFluxPosEmbed)
    inf.remove_from_pipeline(pipe)
    assert pipe.transformer.clear_state is None and pipe.controlnet.clear_state is None


def test_schnell_zero_shot_with_dev_weights(tmp_path):
    from tiny_models import tiny_flux_pipeline

    dev_ckpt = clear_checkpoint(tmp_path / "dev_r2.safetensors", radius=2)  # made on a guidance-embedding "dev"
    pipe = tiny_flux_pipeline(guidance_embeds=False)
    _eval(pipe)
    assert inf.default_settings(pipe) == dict(steps=4, guidance=0.0, max_sequence_length=256)
    inf.apply_to_pipeline(pipe, 2, checkpoint=dev_ckpt)
    from safetensors.torch import load_file

    for k, t in load_file(dev_ckpt).items():
        torch.testing.assert_close(pipe.transformer.get_parameter(k), t)
    res = inf.generate(pipe, "a cat", 32, 48, steps=2, max_sequence_length=16)
    assert res.image.size == (48, 32) and res.settings["guidance"] == 0.0 and res.settings["radius"] == 2


# ------------------------------------------------------------------------------------------
# Resolving once: the family and the size rules are read once, every size is checked once
# ------------------------------------------------------------------------------------------

RESOLVERS = ("pipeline_family", "size_rules", "model_spec", "resolve_ntk_factor", "check_size")


def count_calls(monkeypatch, names=RESOLVERS) -> dict:
    """Counts the calls of clear.inference's functions ``names``, wherever in the package they are called from."""
    counts = dict.fromkeys(names, 0)
    modules = [m for n, m in sys.modules.items() if n == "clear.inference" or n.startswith("clear.inference.")]
    for name in names:
        original = getattr(inf, name)

        def counted(*a, _name=name, _original=original, **k):
            counts[_name] += 1
            return _original(*a, **k)

        patched = [m for m in modules if getattr(m, name, None) is original]
        assert len(patched) >= 2, (name, patched)  # defined in one module, called from another
        for m in patched:
            monkeypatch.setattr(m, name, counted)
    return counts


def test_two_stage_highres_resolves_the_family_once_and_checks_each_size_once(family, family_pipe, monkeypatch):
    counts = count_calls(monkeypatch)
    stages = inf.generate_highres(family_pipe, "a cat", [(48, 64), (64, 96)], (32, 48), clear=inf.ClearSpec(2, 2),
                                  steps=1, upscale_steps=2, strength=0.5, max_sequence_length=16, progress=False)
    assert [s.image.size for s in stages] == [(48, 32), (64, 48), (96, 64)]
    assert stages[-1].result.settings["radius"] == 2 and stages[0].result.settings["attention"] == "original"
    # one description of the pipeline, the base size and the two stages checked once each
    assert counts == dict(pipeline_family=1, size_rules=1, model_spec=1, resolve_ntk_factor=1, check_size=3)
    # a description the caller already has: nothing is resolved again
    info = inf.describe_pipeline(family_pipe)
    assert info.family.name == family and info.pixels_per_token == 4 and info.clear.radius == 2
    assert info.max_grid == (None if family == "flux" else 32) and info.guidance == FAMILY[family]["guidance"]
    counts.update(dict.fromkeys(counts, 0))
    inf.generate(family_pipe, "a cat", 32, 48, steps=1, max_sequence_length=16, info=info)
    assert counts == dict(pipeline_family=0, size_rules=0, model_spec=0, resolve_ntk_factor=0, check_size=1)


def test_cli_resolves_the_family_once_and_checks_each_size_once(family, family_dir, generate_cli, tmp_path,
                                                                monkeypatch):
    counts = count_calls(monkeypatch)
    written = generate_cli.main(["--model", family_dir, *TINY_ARGS, "--radius", "2", "--down_factor", "2",
                                 "--checkpoint", "none", "--upscale", "48x64,64x96", "--upscale_steps", "2",
                                 "--strength", "0.5", "--out", str(tmp_path / "hr.png")])
    assert Image.open(written["image"]).size == (96, 64) and set(written) == {"stage0", "stage1", "image"}
    # read from the configs before loading, passed to the loading and to every stage: once each
    assert counts == dict(pipeline_family=1, size_rules=1, model_spec=1, resolve_ntk_factor=1, check_size=3)


def test_plan_resolves_defaults_and_swaps_only_the_clear_it_was_checked_for(tiny_flux_pipeline_dir):
    spec = inf.ClearSpec(2, 2)
    plan = inf.plan_generation(tiny_flux_pipeline_dir, (32, 48), [(48, 64)], clear=spec, upscale_steps=8)
    assert plan.info == inf.describe_pipeline(tiny_flux_pipeline_dir) and plan.info.model == "FLUX.1-dev"
    assert (plan.steps, plan.upscale_steps, plan.guidance, plan.max_sequence_length) == (28, 8, 3.5, 512)
    assert plan.ntk_factor == 10.0 and plan.sizes == ((48, 64),) and plan.clear is spec
    assert inf.plan_generation(plan.info, (32, 48)).ntk_factor is None  # no upscaling stage: no NTK
    assert plan.with_clear(None).clear is None and plan.with_clear(None).sizes == plan.sizes
    assert plan.with_clear(inf.ClearSpec(2, 2, "w.safetensors")).clear.checkpoint == "w.safetensors"
    with pytest.raises(ValueError, match=r"checked for CLEAR r=2 df=2 on a pipeline with original, not for "
                                         r"CLEAR r=2 df=4: make a new plan"):
        plan.with_clear(inf.ClearSpec(2, 4))
    with pytest.raises(ValueError, match="not divisible by down_factor=4"):  # a new plan checks for its window
        inf.plan_generation(plan.info, (32, 48), [(48, 40)], clear=inf.ClearSpec(2, 4))


# ------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------


def test_training_and_inference_share_one_size_rule(tiny_sd3_pipeline_dir):
    """The family's check (training resolution, data generation) is the inference check, with the flag's name:
    the same grid, table and down-factor errors (tiny SD3: 4 pixels per token, a table of 32 tokens)."""
    family, info = get_family("sd3"), inf.describe_pipeline(tiny_sd3_pipeline_dir)
    assert inf.check_size is size_rule
    for pixels, down_factor in ((30, 1), (132, 1), (36, 2)):
        with pytest.raises(ValueError) as inference:
            info.check_size(pixels, pixels, down_factor, max_pixels=None)
        with pytest.raises(ValueError) as training:
            family.check_size(tiny_sd3_pipeline_dir, pixels, down_factor, name="--resolution")
        assert str(training.value) == str(inference.value).replace("height", "--resolution").replace(
            "--resolution and width", "--resolution"), (str(training.value), str(inference.value))
    family.check_size(tiny_sd3_pipeline_dir, 128, 2)


def test_sizes_and_checks():
    assert inf.parse_sizes("2048x4096, 4096X8192") == [(2048, 4096), (4096, 8192)]
    assert inf.parse_sizes("1024,2048x512") == [(1024, 1024), (2048, 512)]  # N: a square
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        inf.parse_sizes("2048*4096")
    assert inf.parse_sizes("2x, x1.5", base=(512, 768)) == [(1024, 1536), (1536, 2304)]  # factors of the one before
    with pytest.raises(ValueError, match="'2x' is a factor: it needs the size of the first image"):
        inf.parse_sizes("2x")
    with pytest.raises(ValueError, match="'0x' is not a size .* or a factor like 2x"):
        inf.parse_sizes("0x", base=(512, 512))
    inf.check_size(1024, 1536)
    with pytest.raises(ValueError, match="width=1000 is not a positive multiple of 16.*e.g. 992"):
        inf.check_size(1024, 1000)
    with pytest.raises(ValueError, match="multiples of 64"):
        inf.check_size(1024, 1040, down_factor=4)


def test_mask_picture_matches_allowed_mask(tmp_path):
    h, w, r, df, t = 8, 12, 3, 2, 5
    query = (2, 9)
    pic = vis.draw_mask(h, w, r, df, text_len=t, query=query, cell=10)
    row = allowed_mask(TokenLayout(t, h, w), Window(r, df))[t + query[0] * w + query[1]]
    for i in range(h):
        for j in range(w):
            want = vis.QUERY if (i, j) == query else (vis.SEEN if row[t + i * w + j] else vis.UNSEEN)
            assert vis.cell_color(pic, "image", i, j) == want, (i, j)
    for i in range(h // df):
        for j in range(w // df):
            assert vis.cell_color(pic, "pooled", i, j) == vis.SEEN
    assert all(vis.cell_color(pic, "text", 0, j) == vis.SEEN for j in range(t))
    assert pic.seen == int(row.sum()) and pic.total == t + h * w + (h // df) * (w // df)
    assert vis.cell_color(pic, "image", 2, 5) == vis.UNSEEN  # dx = 4 >= r
    assert vis.cell_color(pic, "image", 2, 7) == vis.SEEN  # dx = 2 < r
    path = pic.save(tmp_path / "mask.png")
    assert Image.open(path).size == pic.image.size and Image.open(path).text["clear:seen"] == str(pic.seen)
    with pytest.raises(ValueError, match="outside"):
        vis.draw_mask(h, w, r, query=(8, 0))


# ------------------------------------------------------------------------------------------
# Non-finite values: an error, never a black PNG
# ------------------------------------------------------------------------------------------


def test_nan_checkpoint_and_nan_guidance_exit_with_a_message_and_no_png(generate_cli, tiny_flux_pipeline_dir,
                                                                        tmp_path, monkeypatch):
    nan_file = clear_checkpoint(tmp_path / "nan.safetensors", fill=float("nan"))
    out = tmp_path / "out" / "img.png"
    msg = cli_error(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "2",
                                  "--checkpoint", nan_file, "--out", str(out)], monkeypatch)
    assert "holds NaN or inf values in" in msg and "transformer_blocks.0.attn.to_k.bias" in msg
    assert not out.parent.exists() or not list(out.parent.iterdir())

    msg = cli_error(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "2",
                                  "--checkpoint", "none", "--guidance", "nan", "--out", str(out)], monkeypatch)
    assert msg == "error: guidance=nan is not a finite number; pass e.g. 3.5 (or leave it out for the model's default)"
    assert not out.exists()


def test_weights_that_blow_up_stop_generation_without_a_png(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                            monkeypatch):
    """Finite weights whose attention logits overflow (1e30): NaN latents after the first step."""
    huge = clear_checkpoint(tmp_path / "clear_local_2.safetensors", fill=1e30)
    out = tmp_path / "img.png"
    calls = []
    original_build = generate_cli.build_pipeline

    def build(args):  # count denoising steps: the run stops at the first one
        pipe = original_build(args)
        pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
        return pipe

    monkeypatch.setattr(generate_cli, "build_pipeline", build)
    msg = cli_error(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "2", "--checkpoint", huge,
                                  "--out", str(out)], monkeypatch)
    assert "NaN/inf values" in msg and "after denoising step 1 " in msg and "no image is returned" in msg
    assert len(calls) == 1  # stopped after step 1 of 2
    assert list(tmp_path.iterdir()) == [tmp_path / "clear_local_2.safetensors"]  # no PNG, no temporary file


def test_decoded_image_with_nan_is_refused():
    class Pipe:
        numpy_to_pil = staticmethod(lambda a: ["pil"])

    images = np.full((1, 4, 4, 3), 0.5, dtype=np.float32)
    assert inf.finite_image(Pipe(), images) == "pil"
    images[0, 1, 2, 0] = np.nan
    images[0, 3, 3, 1] = np.inf
    with pytest.raises(inf.NonFiniteImageError, match=r"the decoded image holds 2 NaN/inf values of 48"):
        inf.finite_image(Pipe(), images)


# ------------------------------------------------------------------------------------------
# Every check that needs no weights runs before they load
# ------------------------------------------------------------------------------------------


def test_settings_refused_before_anything_loads(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch,
                                                no_loading):
    base = ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--checkpoint", "none"]
    out = ["--out", str(tmp_path / "x.png")]
    cases = [
        (["--radius", "0"], r"--radius 0 --down_factor 1: radius must be a finite positive number of tokens"),
        (["--radius", "-5"], r"--radius -5 --down_factor 1: radius must be a finite positive number of tokens"),
        (["--steps", "0"], r"steps=0: the number of denoising steps must be a whole number >= 1"),
        (["--upscale", "64x96", "--upscale_steps", "0"], r"upscale_steps=0: the number of denoising steps"),
        (["--guidance", "inf"], r"guidance=inf is not a finite number"),
        (["--upscale", "64x96", "--strength", "0.2", "--upscale_steps", "3"],
         r"strength=0.2 with 3 steps leaves no denoising step; use steps >= 5"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            generate_cli.main([*base, *extra, *out])
    assert no_loading == [] and not (tmp_path / "x.png").exists()


def test_late_or_silent_settings_are_refused_before_anything_loads(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                                   forbid_loading):
    """Settings that used to be accepted silently (0 text tokens became the default, an infinite radius a label
    "CLEAR r=inf") or to fail only after the base image (NTK factor 0, shift NaN) or after loading (100000 text
    tokens): each one line naming the fix, before the pipeline loads (its configs are read: the limits are the
    model family's)."""
    base = ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--checkpoint", "none", "--radius", "2"]
    out = ["--out", str(tmp_path / "x.png")]
    cases = [
        (["--max_sequence_length", "0"], r"^max_sequence_length=0: the number of text tokens must be a whole number "
                                         r">= 1 \(leave it out for the model's default\)$"),
        (["--max_sequence_length", "100000"], r"^max_sequence_length=100000: flux pipelines take at most 512 text "
                                              r"tokens; pass at most 512 \(or leave it out for the model's default\)$"),
        (["--radius", "inf"], r"^--radius inf --down_factor 1: radius must be a finite positive number of tokens or "
                              r"None \(full attention\), got inf"),
        (["--upscale", "64x96", "--ntk_factor", "0"], r"^ntk_factor=0: the NTK factor scales RoPE's base and must be "
                                                      r"a finite number > 0 \(1 = off\)"),
        (["--upscale", "64x96", "--ntk_factor", "nan"], r"^ntk_factor=nan: the NTK factor"),
        (["--upscale", "64x96", "--shift", "nan"], r"^shift=nan: the scheduler shift of the upscaling stages must be "
                                                   r"a finite number > 0 \(the release uses 3\), or 'dynamic'$"),
        (["--upscale", "64x96", "--shift", "0"], r"^shift=0: the scheduler shift"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            generate_cli.main([*base, *extra, *out])
    assert not (tmp_path / "x.png").exists()
    from clear.commands import generate_eval_set

    with pytest.raises(ValueError, match=r"^max_sequence_length=0: the number of text tokens"):  # evaluation sets too
        generate_eval_set.preflight(tiny_flux_pipeline_dir, 32, 48, max_sequence_length=0)
    from tiny_models import tiny_flux

    for radius in (float("inf"), float("nan")):  # the library refuses them too
        with pytest.raises(ValueError, match="radius must be a finite positive number"):
            clear.apply_clear(tiny_flux(), radius=radius)
        with pytest.raises(ValueError, match="radius must be a finite positive number"):
            inf.ClearSpec(radius)


def test_a_checkpoint_of_the_wrong_shape_fails_before_the_original_image(generate_cli, tiny_flux_pipeline_dir,
                                                                        tmp_path, monkeypatch):
    """--compare, and upscaling from an original base image, generate with the original model before CLEAR's
    weights load: the file's keys and shapes are checked against the model first, and nothing is generated."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = clear_checkpoint(tmp_path / "good.safetensors", radius=2)
    tensors = load_file(good)
    with safe_open(good, framework="pt") as f:
        metadata = f.metadata()
    key = sorted(k for k in tensors if k.endswith("to_k.weight"))[0]
    tensors[key] = tensors[key][: tensors[key].shape[0] // 2].clone()  # another model width
    wrong = tmp_path / "clear_local_2.safetensors"
    save_file(tensors, str(wrong), metadata=metadata)
    forwards = []
    original_build = generate_cli.build_pipeline

    def build(args):
        pipe = original_build(args)
        pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
        return pipe

    monkeypatch.setattr(generate_cli, "build_pipeline", build)
    out = tmp_path / "out" / "img.png"
    for extra in (["--compare"], ["--upscale", "64x96", "--base", "original"]):
        msg = cli_error(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "2", "--checkpoint",
                                       str(wrong), *extra, "--out", str(out)], monkeypatch)
        assert msg.startswith(f"error: {wrong} has tensors of the wrong shape for this model (another model width?): "
                              f"{key}: file "), msg
        assert forwards == [] and not out.parent.exists()


def test_a_file_saying_radius_none_is_checked_against_the_window(tmp_path):
    """clear.radius = "None" (a full-attention CLEAR's file) is a radius like any other: refused for r=2."""
    from safetensors.torch import load_file, save_file
    from tiny_models import tiny_flux

    path = clear_checkpoint(tmp_path / "x.safetensors", radius=2)
    save_file(load_file(path), path, metadata={"format": "pt", "clear.radius": "None", "clear.down_factor": "1",
                                               "clear.family": "flux"})
    with pytest.raises(ValueError, match=r"is a checkpoint for radius=None \(full attention\) but the chosen variant "
                                         r"is clear_local_2"):
        inf.check_checkpoint(path, 2, 1, "flux")
    model = tiny_flux()
    clear.apply_clear(model, radius=2)
    with pytest.raises(ValueError, match=r"was trained for radius=None \(full attention\) but CLEAR was applied with "
                                         r"radius=2"):
        clear.load_clear_weights(model, path)
    save_file(load_file(path), path, metadata={"clear.radius": "sixteen"})
    with pytest.raises(ValueError, match=r"clear.radius metadata 'sixteen' is not a number"):
        inf.check_checkpoint(path, 2, 1, "flux")


def test_size_bound_refused_with_a_message(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch):
    base = ["--model", tiny_flux_pipeline_dir, "--steps", "2", "--device", "cpu", "--checkpoint", "none",
            "--out", str(tmp_path / "x.png")]
    from diffusers import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    msg = cli_error(generate_cli, [*base, "--height", "100000", "--width", "100000"], monkeypatch)
    assert msg == ("error: 100000x100000 is 10,000,000,000 pixels, more than the bound of 268,435,456 (max_pixels, "
                   "about 16384x16384): that far out, one image's latents, activations and decoded pixels run out "
                   "of memory. Choose a smaller size, or raise the bound (--max_pixels, or max_pixels=) if your "
                   "hardware really holds it")
    with pytest.raises(ValueError, match=r"64x96 is 6,144 pixels, more than the bound of 4,096"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--upscale", "64x96", "--max_pixels", "4096"])
    with pytest.raises(ValueError, match=r"more than the bound of 2,000"):  # the Python API has the same bound
        inf.check_size(32, 64, 4, max_pixels=2000)
    inf.check_size(100_000, 100_000, max_pixels=None)  # an explicit None: no bound


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_refused_before_loading(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch,
                                                  no_loading):
    argv = ["--model", tiny_flux_pipeline_dir, "--height", "32", "--width", "48", "--checkpoint", "none",
            "--out", str(tmp_path / "x.png")]
    msg = cli_error(generate_cli, [*argv, "--device", "cuda"], monkeypatch)
    assert msg.startswith("error: --device cuda: CUDA is not available on this machine (torch ")
    assert "Use --device cpu" in msg
    msg = cli_error(generate_cli, [*argv, "--device", "gpu0"], monkeypatch)
    assert msg.startswith("error: --device 'gpu0' is not a device name")
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):  # the Python API too
        inf.load_pipeline(tiny_flux_pipeline_dir, "cuda:1")
    assert no_loading == []


def test_unwritable_out_refused_before_any_denoising_step(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                          monkeypatch, no_loading):
    base = ["--model", tiny_flux_pipeline_dir, *TINY_ARGS, "--radius", "2", "--checkpoint", "none"]
    folder = tmp_path / "existing.png"
    folder.mkdir()
    msg = cli_error(generate_cli, [*base, "--out", str(folder)], monkeypatch)
    assert msg == (f"error: --out {folder} is an existing folder; pass a file name inside it, "
                   f"e.g. {folder / 'image.png'}")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    msg = cli_error(generate_cli, [*base, "--out", str(a_file / "sub" / "img.png")], monkeypatch)
    assert msg == (f"error: --out {a_file / 'sub' / 'img.png'}: {a_file} is a file, so no folder can be made there; "
                   "choose another path")
    assert no_loading == []  # neither the config nor the weights were read: no pipeline, no denoising step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png", "notes.txt"] and not list(folder.iterdir())
    if os.geteuid() != 0:  # root writes into read-only folders, so only other users can see this refusal
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            msg = cli_error(generate_cli, [*base, "--out", str(ro / "img.png")], monkeypatch)
            assert f"the folder {ro} is not writable" in msg
        finally:
            ro.chmod(0o755)


def test_library_checks_before_the_pipeline_runs(tiny_flux_pipeline_dir):
    pipe = inf.load_pipeline(tiny_flux_pipeline_dir, "cpu", "float32")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    for kwargs, message in [(dict(steps=0), "steps=0"), (dict(guidance=float("nan")), "guidance=nan"),
                            (dict(steps=1.5), "steps=1.5")]:
        with pytest.raises(ValueError, match=message):
            inf.generate(pipe, "a cat", 32, 48, max_sequence_length=16, **kwargs)
    with pytest.raises(ValueError, match="more than the bound of 1,000"):
        inf.generate(pipe, "a cat", 32, 48, max_sequence_length=16, max_pixels=1000)
    with pytest.raises(ValueError, match="upscale_steps=0"):
        inf.generate_highres(pipe, "a cat", [(48, 64)], (32, 48), upscale_steps=0, progress=False)
    with pytest.raises(ValueError, match="radius must be a finite positive number"):
        inf.ClearSpec(0)
    assert calls == []


# ------------------------------------------------------------------------------------------
# Messages: local paths, offline, retries, --help
# ------------------------------------------------------------------------------------------


def test_misspelled_local_model_is_no_such_folder(generate_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flux_dev").mkdir(parents=True)
    argv = ["--height", "32", "--width", "48", "--checkpoint", "none", "--device", "cpu", "--out", "x.png"]
    msg = cli_error(generate_cli, ["--model", "./models/flux-dev", *argv], monkeypatch)
    assert msg == (f"error: --model ./models/flux-dev: no such folder ({tmp_path / 'models' / 'flux-dev'} does not "
                   f"exist; the nearest existing folder is {tmp_path / 'models'}, which holds: flux_dev). Check the "
                   "spelling, or pass a Hub id such as black-forest-labs/FLUX.1-dev")
    msg = cli_error(generate_cli, ["--model", "models/flux-dev", *argv], monkeypatch)  # ./models exists: a path
    assert "--model models/flux-dev: no such folder" in msg
    msg = cli_error(generate_cli, ["--model", str(tmp_path / "nowhere" / "flux"), *argv], monkeypatch)
    assert f"no such folder ({tmp_path / 'nowhere' / 'flux'} does not exist; the nearest existing folder is " \
           f"{tmp_path}, which holds: models)" in msg


def test_offline_hub_id_message_says_hf_auth_login(generate_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = cli_error(generate_cli, ["--model", "someone/not-cached", "--checkpoint", "none", "--device", "cpu"],
                   monkeypatch)
    assert "a Hub id that is not in the local Hugging Face cache, and the Hub is unreachable (HF_HUB_OFFLINE is set)" \
        in msg
    assert "`hf auth login`" in msg and "huggingface-cli" not in msg
    assert list(tmp_path.iterdir()) == []


def test_unresolvable_hub_fails_at_once_without_retries(tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    assert weights.hub_unreachable().startswith("cannot resolve hub.invalid")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG), pytest.raises(FileNotFoundError, match=r"\(cannot resolve hub\.invalid"):
        clear.download_weights(8)
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match=r"a Hub id that is not in the local Hugging "
                                                                      r"Face cache, and the Hub is unreachable "
                                                                      r"\(cannot resolve hub\.invalid"):
        inf.check_model("someone/not-cached")
    assert time.perf_counter() - start < 5  # the hub's retries alone take ~25 s
    assert "Retrying" not in caplog.text + "".join(capfd.readouterr())
    assert list(tmp_path.iterdir()) == []


def test_cached_hub_model_generates_with_the_hub_unreachable(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                             monkeypatch, capfd, caplog):
    """A Hub id in the local cache, no network (host does not resolve), HF_HUB_OFFLINE not set: configs and
    weights come from the cache at once, without the hub's retries."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    repo = Path(constants.HF_HUB_CACHE) / f"models--clear-tests--tiny-flux-{os.getpid()}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    try:
        shutil.copytree(tiny_flux_pipeline_dir, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        out = tmp_path / "img.png"
        start = time.perf_counter()
        with caplog.at_level(logging.DEBUG):
            written = generate_cli.main(["--model", f"clear-tests/tiny-flux-{os.getpid()}", *TINY_ARGS, "--radius", "2",
                                         "--checkpoint", "none", "--out", str(out)])
        assert written == {"image": str(out)} and Image.open(out).size == (48, 32)
        assert time.perf_counter() - start < 60  # the hub's retries: ~25 s for each file read
        assert "Retrying" not in caplog.text + "".join(capfd.readouterr())
    finally:
        shutil.rmtree(repo, ignore_errors=True)


@pytest.mark.parametrize("script", ["generate", "generate_highres"])
def test_help_is_fast_and_imports_nothing_heavy(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"], capture_output=True,
                          text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "--max_pixels" in proc.stdout and "--proportional_formula" in proc.stdout
    assert seconds < 3, f"--help took {seconds:.1f} s"
    probe = ("import importlib.util, json, sys\n"
             f"spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'scripts' / (script + '.py'))!r})\n"
             "m = importlib.util.module_from_spec(spec); sys.path.insert(0, %r); spec.loader.exec_module(m)\n"
             "m.build_parser().parse_args(['--height', '32', '--radius', '0'])\n"
             "print(json.dumps(sorted(k for k in ('torch', 'diffusers', 'transformers', 'safetensors', "
             "'huggingface_hub', 'numpy') if k in sys.modules)))") % str(ROOT / "scripts")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
