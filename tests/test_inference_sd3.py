"""Inference on SD3 / SD3.5 pipelines: scripts/generate.py end to end on a saved tiny
StableDiffusion3Pipeline (an SD3.5-Medium-like transformer with a dual-attention layer), the
SDEdit high-resolution path with StableDiffusion3Img2ImgPipeline, the size limit of SD3's
positional table, the per-model defaults and the early errors. CPU, tiny pipeline."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scripts_loader import load_script
import torch
from PIL import Image

import clear
import clear.inference as inf
from clear.families.sd3 import SD3ClearAttnProcessor

ROOT = Path(__file__).resolve().parent.parent
# the tiny pipeline: VAE factor 2 x patch 2 = 4 pixels per token, pos_embed_max_size 32 -> at most 128 pixels
TINY = ["--height", "32", "--width", "48", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tiny_models import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(str(path))
    return str(path)


@pytest.fixture
def sd3_pipe(sd3_dir):
    pipe = inf.load_pipeline(sd3_dir, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _sd3_checkpoint(path, radius, down_factor=1, seed=3):
    """A CLEAR checkpoint for the tiny SD3 transformer with perturbed (non-original) weights."""
    from tiny_models import tiny_sd3

    model = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")
    clear.apply_clear(model, radius, down_factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return clear.save_clear_weights(model, path)


def _record_attention(transformer, log):
    """A pre-hook logging, per transformer forward, the token grid and the processors in use."""
    patch = transformer.config.patch_size

    def hook(module, args, kwargs):
        state = getattr(module, "clear_state", None)
        procs = {type(p).__name__ for p in module.attn_processors.values()}
        h, w = kwargs["hidden_states"].shape[-2:]
        log.append(dict(grid=(h // patch, w // patch), timestep=float(kwargs["timestep"][0]), processors=procs,
                        radius=state.radius if state else "off",
                        proportional=state.core.proportional_attention if state else False))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------
# generate.py end to end
# ------------------------------------------------------------------------------------------


def test_generate_cli_sd3_compare_and_checkpoint(generate_cli, sd3_dir, tmp_path):
    parser = generate_cli.build_parser()
    args = generate_cli.resolve_args(parser.parse_args(
        ["--model", sd3_dir, "--prompt", "a red house", *TINY, "--radius", "100", "--checkpoint", "none",
         "--compare", "--seed", "5", "--out", str(tmp_path / "cmp.png")]))
    assert args.family.name == "sd3" and args.ntk_factor is None
    pipe = generate_cli.build_pipeline(args)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    log = []
    hook = _record_attention(pipe.transformer, log)
    try:
        written = generate_cli.run(args, pipe)
    finally:
        hook.remove()
    assert set(written) == {"image", "original", "compare"}
    # 2 steps of the original model, then 2 with CLEAR on every SD3 attention layer (joint and attn2)
    assert [e["radius"] for e in log] == ["off", "off", 100, 100]
    assert log[0]["processors"] != {"SD3ClearAttnProcessor"} and log[2]["processors"] == {"SD3ClearAttnProcessor"}
    assert all(e["grid"] == (8, 12) for e in log)
    im = Image.open(written["image"])
    assert im.size == (48, 32) and Image.open(written["original"]).size == (48, 32)
    # radius 100 covers the 8x12 token grid: CLEAR is the original SD3 model, bit for bit
    assert np.array_equal(_pixels(written["image"]), _pixels(written["original"]))
    settings = json.loads(im.text["clear:settings"])
    # SD3.5-Medium-like config: its defaults (guidance 4.5) unless given
    assert settings["guidance"] == 4.5 and settings["steps"] == 2 and settings["seed"] == 5
    assert settings["attention"] == "CLEAR r=100" and settings["max_sequence_length"] == 16
    meta = json.loads(Image.open(written["compare"]).text["clear:settings"])
    assert meta["labels"][0].startswith("original:") and meta["labels"][1].startswith("CLEAR r=100:")

    # a small window with trained (here: perturbed) SD3 weights changes the image; the file is loaded
    ckpt = _sd3_checkpoint(tmp_path / "sd3_r2.safetensors", radius=2)
    out = generate_cli.main(["--model", sd3_dir, "--prompt", "a red house", *TINY, "--radius", "2", "--seed", "5",
                             "--checkpoint", ckpt, "--out", str(tmp_path / "r2.png")])
    local = Image.open(out["image"])
    assert local.size == (48, 32) and json.loads(local.text["clear:settings"])["checkpoint"] == ckpt
    assert np.abs(_pixels(out["image"]) - _pixels(written["original"])).max() > 0


def test_apply_to_pipeline_loads_sd3_checkpoint(sd3_pipe, tmp_path):
    from safetensors.torch import load_file

    ckpt = _sd3_checkpoint(tmp_path / "sd3_r2_df2.safetensors", radius=2, down_factor=2)
    core = inf.apply_to_pipeline(sd3_pipe, radius=2, down_factor=2, checkpoint=ckpt)
    assert core is sd3_pipe.transformer.clear_state.core and core.window.down_factor == 2
    weights = load_file(ckpt)
    assert any(".attn2." in k for k in weights)  # SD3.5-Medium's image-only attention layers too
    for k, t in weights.items():
        torch.testing.assert_close(sd3_pipe.transformer.get_parameter(k), t)
    assert all(isinstance(p, SD3ClearAttnProcessor) for p in sd3_pipe.transformer.attn_processors.values())
    inf.remove_from_pipeline(sd3_pipe)
    assert sd3_pipe.transformer.clear_state is None


# ------------------------------------------------------------------------------------------
# High resolution (SDEdit) with StableDiffusion3Img2ImgPipeline
# ------------------------------------------------------------------------------------------


def test_highres_two_non_square_stages_sd3(sd3_pipe):
    pipe = sd3_pipe
    original_pe = pipe.transformer.pos_embed
    img2img_calls = []
    from diffusers import StableDiffusion3Img2ImgPipeline

    real_call = StableDiffusion3Img2ImgPipeline.__call__

    def spy(self, *a, **k):
        img2img_calls.append((self.transformer is pipe.transformer, self.vae is pipe.vae, k["height"], k["width"]))
        return real_call(self, *a, **k)

    log = []
    hook = _record_attention(pipe.transformer, log)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(StableDiffusion3Img2ImgPipeline, "__call__", spy)
            stages = inf.generate_highres(pipe, "a small blue plane", sizes=[(48, 64), (64, 96)], base_size=(32, 48),
                                          clear=inf.ClearSpec(2, 2), strength=0.5, steps=2, upscale_steps=4, seed=1,
                                          shift=2.0, max_sequence_length=16, progress=False)
    finally:
        hook.remove()

    assert [(s.kind, s.height, s.width) for s in stages] == [("base", 32, 48), ("upscale", 48, 64),
                                                             ("upscale", 64, 96)]
    assert [s.image.size for s in stages] == [(48, 32), (64, 48), (96, 64)]
    assert stages[1].source is stages[0].image and stages[2].source is stages[1].image
    # diffusers' SD3 img2img pipeline on the very same components, once per stage
    assert img2img_calls == [(True, True, 48, 64), (True, True, 64, 96)]
    # base: the original model; upscaling: CLEAR r=2 df=2 with proportional attention; 2 steps each
    assert [(e["grid"], e["radius"], e["proportional"]) for e in log] == (
        [((8, 12), "off", False)] * 2 + [((12, 16), 2, True)] * 2 + [((16, 24), 2, True)] * 2)
    # a 4-step schedule with the fixed shift 2 (the model's scheduler: 3); strength 0.5 runs its last 2 steps.
    # SD3's img2img passes no sigmas: diffusers spaces them from 1 to the shifted sigma_min, then shifts
    # (timesteps = 1000 sigma)
    shift = 2.0
    sigma_min = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
    sigmas = np.linspace(1.0, sigma_min, 4)[2:]
    shifted = 1000 * shift * sigmas / (1 + (shift - 1) * sigmas)
    np.testing.assert_allclose([e["timestep"] for e in log[2:4]], shifted, rtol=1e-5)
    np.testing.assert_allclose([e["timestep"] for e in log[4:]], shifted, rtol=1e-5)
    # no RoPE to scale: NTK is not applied (and says so), the position table is untouched
    settings = stages[2].result.settings
    assert settings["ntk_factor"] is None and settings["proportional_attention"] is True
    assert settings["shift"] == 2.0 and settings["source_size"] == "48x64" and settings["guidance"] == 4.5
    assert pipe.scheduler.config.shift == 3.0  # the pipeline's own scheduler is untouched
    assert pipe.transformer.pos_embed is original_pe
    assert pipe.transformer.clear_state.core.proportional_attention is False


def test_highres_cli_sd3_writes_every_stage(sd3_dir, tmp_path):
    out = tmp_path / "hr.png"
    written = load_script("generate_highres").main(["--model", sd3_dir, *TINY, "--radius", "3", "--checkpoint", "none",
                                                "--upscale", "48x32,64x96", "--upscale_steps", "3",
                                                "--vae_tiling", "on", "--out", str(out)])
    assert Image.open(written["stage0"]).size == (48, 32)
    assert Image.open(written["stage1"]).size == (32, 48)
    final = Image.open(written["image"])
    assert final.size == (96, 64)
    settings = json.loads(final.text["clear:settings"])
    assert settings["stages"] == 3 and settings["source_size"] == "48x32" and settings["vae_tiling"] is True
    assert settings["ntk_factor"] is None and settings["attention"] == "CLEAR r=3"


# ------------------------------------------------------------------------------------------
# Early errors, limits, defaults
# ------------------------------------------------------------------------------------------


def test_sd3_errors_come_before_any_heavy_work(generate_cli, sd3_dir, tmp_path, monkeypatch):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the settings were checked")

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", boom)
    monkeypatch.setattr(FluxPipeline, "from_pretrained", boom)
    base = ["--model", sd3_dir, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]

    # SD3's positions are a 32x32 table here (pos_embed_max_size): 128 pixels per side at most
    with pytest.raises(ValueError, match=r"132x48 pixels is a 33x12 token grid.*pos_embed_max_size=32.*"
                                         r"at most 128 pixels per side; choose height and width <= 128"):
        generate_cli.main([*base, "--height", "132", "--width", "48", "--checkpoint", "none"])
    with pytest.raises(ValueError, match=r"64x256 pixels .* at most 128 pixels"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--checkpoint", "none", "--upscale",
                           "64x96,64x256"])
    with pytest.raises(ValueError, match=r"height=30 is not a positive multiple of 4"):
        generate_cli.main([*base, "--height", "30", "--width", "48", "--checkpoint", "none"])
    # NTK-scaled RoPE cannot be honoured: SD3 has no RoPE
    with pytest.raises(ValueError, match=r"ntk_factor=10: sd3 models have no RoPE"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--checkpoint", "none", "--upscale", "64x96",
                           "--ntk_factor", "10"])
    # the released weights are FLUX.1-dev's; a FLUX file is refused by its header
    with pytest.raises(ValueError, match=r"no released CLEAR weights for sd3 models.*--checkpoint PATH"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--radius", "16"])
    from tiny_models import tiny_flux

    flux = tiny_flux()
    clear.apply_clear(flux, 2)
    flux_ckpt = clear.save_clear_weights(flux, tmp_path / "flux_r2.safetensors")
    with pytest.raises(ValueError, match=r"holds CLEAR weights for a flux model, but the chosen model is a sd3"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--radius", "2", "--checkpoint", flux_ckpt])
    with pytest.raises(ValueError, match=r"--parallel patch supports FLUX.1 pipelines only"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--checkpoint", "none", "--parallel", "patch"])
    # accepted as it is (--ntk_factor 1 is "off", fine for SD3): the pipeline load is the first heavy step
    with pytest.raises(AssertionError, match="loaded before"):
        generate_cli.main([*base, "--height", "128", "--width", "48", "--checkpoint", "none", "--upscale", "64x128",
                           "--ntk_factor", "1"])


def test_size_limit_and_ntk_checked_in_python_api_too(sd3_pipe):
    calls = []
    hook = sd3_pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="at most 128 pixels per side"):
            inf.generate(sd3_pipe, "a cat", 32, 132, steps=1)
        with pytest.raises(ValueError, match="at most 128 pixels per side"):
            inf.generate_highres(sd3_pipe, "a cat", [(64, 96), (160, 96)], base_size=(32, 48), steps=1)
        with pytest.raises(ValueError, match="no RoPE"):
            inf.generate_highres(sd3_pipe, "a cat", [(64, 96)], base_size=(32, 48), steps=1, ntk_factor=4)
        with pytest.raises(TypeError, match="not RoPE"):
            with inf.ntk_rope(sd3_pipe, 4):
                pass
    finally:
        hook.remove()
    assert not calls  # nothing ran
    assert inf.size_rules(sd3_pipe) == (4, 32)


def test_sd3_model_recognised_and_defaults_per_model(sd3_dir, tmp_path):
    from tiny_models import tiny_sd3

    assert inf.check_model(sd3_dir)["_class_name"] == "StableDiffusion3Pipeline"
    assert inf.pipeline_family(sd3_dir).name == "sd3"
    assert inf.size_rules(sd3_dir) == (4, 32)  # read from vae/ and transformer/ configs only
    expected = {  # diffusers docs / model cards; FLUX unchanged
        "SD3-Medium": (tiny_sd3(), dict(steps=28, guidance=7.0, max_sequence_length=256)),
        "SD3.5-Large": (tiny_sd3(qk_norm="rms_norm"), dict(steps=28, guidance=3.5, max_sequence_length=256)),
        "SD3.5-Medium": (tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,)),
                         dict(steps=40, guidance=4.5, max_sequence_length=256)),
    }
    for name, (model, defaults) in expected.items():
        pipe = SimpleNamespace(transformer=model)
        assert inf.model_name(model) == name and inf.default_settings(pipe) == defaults
    # SD3 pipelines the CLEAR core does not cover are still refused (the ControlNet model has no CLEAR processors)
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3ControlNetPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(ValueError, match="is a StableDiffusion3ControlNetPipeline.*supports FLUX.1 and SD3"):
        inf.check_model(str(tmp_path / "cn"))


def test_img2img_pipeline_sd3_shares_components_without_casting(sd3_pipe):
    sd3_pipe.vae.to(torch.float64)
    img2img = inf.img2img_pipeline(sd3_pipe, inf.fixed_shift_scheduler(sd3_pipe.scheduler, 2.0))
    assert type(img2img).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert img2img.transformer is sd3_pipe.transformer and img2img.text_encoder_3 is sd3_pipe.text_encoder_3
    assert sd3_pipe.vae.dtype == torch.float64  # from_pipe would have cast it
    assert img2img.scheduler.config.shift == 2.0 and sd3_pipe.scheduler.config.shift == 3.0
