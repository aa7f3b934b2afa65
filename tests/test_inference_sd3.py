"""Inference on SD3 / SD3.5 pipelines, what only they have: a saved tiny StableDiffusion3Pipeline
(an SD3.5-Medium-like transformer with a dual-attention layer) with a CLEAR checkpoint, the size
limit of SD3's positional table, no RoPE, the per-model defaults and the early errors. The
scenarios every family shares (generate.py end to end, SDEdit with StableDiffusion3Img2ImgPipeline,
resolving once) run on SD3 too, in tests/test_inference.py. CPU, tiny pipeline."""

import json
from types import SimpleNamespace

import pytest
import torch

import clear
import clear.inference as inf
from clear.families.sd3 import SD3ClearAttnProcessor
from tiny_models import clear_checkpoint, load_tiny_pipeline

# the tiny pipeline: VAE factor 2 x patch 2 = 4 pixels per token, pos_embed_max_size 32 -> at most 128 pixels


@pytest.fixture
def sd3_pipe(tiny_sd3_pipeline_dir):
    return load_tiny_pipeline(tiny_sd3_pipeline_dir)


# ------------------------------------------------------------------------------------------
# A CLEAR checkpoint on an SD3 pipeline
# ------------------------------------------------------------------------------------------


def test_apply_to_pipeline_loads_sd3_checkpoint(sd3_pipe, tmp_path):
    from safetensors.torch import load_file

    ckpt = clear_checkpoint(tmp_path / "sd3_r2_df2.safetensors", radius=2, down_factor=2, family="sd3")
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
# Early errors, limits, defaults
# ------------------------------------------------------------------------------------------


def test_sd3_errors_come_before_any_heavy_work(generate_cli, tiny_sd3_pipeline_dir, tmp_path, forbid_loading):
    base = ["--model", tiny_sd3_pipeline_dir, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "x.png")]

    # SD3's positions are a 32x32 table here (pos_embed_max_size): 128 pixels per side at most
    with pytest.raises(ValueError, match=r"132x48 pixels is a 33x12 token grid.*pos_embed_max_size=32.*"
                                         r"at most 128 pixels per side; choose height and width <= 128"):
        generate_cli.main([*base, "--height", "132", "--width", "48", "--checkpoint", "none"])
    with pytest.raises(ValueError, match=r"64x256 pixels .* at most 128 pixels"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--checkpoint", "none", "--upscale",
                           "64x96,64x256"])
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


def test_sd3_model_recognised_and_defaults_per_model(tiny_sd3_pipeline_dir, tmp_path):
    from tiny_models import tiny_sd3

    assert inf.check_model(tiny_sd3_pipeline_dir)["_class_name"] == "StableDiffusion3Pipeline"
    assert inf.pipeline_family(tiny_sd3_pipeline_dir).name == "sd3"
    assert inf.size_rules(tiny_sd3_pipeline_dir) == (4, 32)  # read from vae/ and transformer/ configs only
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
