"""Whole pipelines of every supported family run with CLEAR (parametrized over the registry): SD3.5 (three text
encoders, dual attention) and FLUX.1-schnell-like (no guidance embedding); FLUX ControlNet (zero-shot with the
transformer's CLEAR weights)."""

import numpy as np
import pytest
import torch
from PIL import Image

import clear
import clear.families
from tiny_models import (FLUX2_CONFIG, QWEN_CONFIG, tiny_flux2_pipeline, tiny_flux_controlnet_pipeline,
                         tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline)

KW = dict(prompt="a small cat", height=32, width=48, num_inference_steps=2, output_type="np", max_sequence_length=16)


def run(pipe, **extra):
    return pipe(**{**KW, **extra}, generator=torch.Generator().manual_seed(0)).images


def _sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    tiny_sd3_pipeline().save_pretrained(tmp_path)
    return StableDiffusion3Pipeline.from_pretrained(tmp_path)


def _schnell_pipeline(tmp_path):
    from diffusers import FluxPipeline

    tiny_flux_pipeline(guidance_embeds=False).save_pretrained(tmp_path)
    pipe = FluxPipeline.from_pretrained(tmp_path)
    assert not pipe.transformer.config.guidance_embeds
    return pipe


def _flux2_pipeline(tmp_path):
    from diffusers import Flux2Pipeline

    tiny_flux2_pipeline().save_pretrained(tmp_path)
    return Flux2Pipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)


def _qwenimage_pipeline(tmp_path):
    from diffusers import QwenImagePipeline

    tiny_qwenimage_pipeline().save_pretrained(tmp_path)
    return QwenImagePipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)


def _embeds(width, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 6, width, generator=g) for _ in range(n)]


# family -> (a saved and reloaded tiny pipeline, its call's extra arguments, attention modules that must run CLEAR):
# SD3.5-like (three text encoders; the image-only attn2 of the dual-attention block runs CLEAR too) and
# FLUX.1-schnell-like (no guidance embedding)
# FLUX.2 and Qwen-Image have no tiny text encoder here: their prompts go in as embeddings (Qwen-Image's padded, with
# true classifier-free guidance)
PIPELINES = {"sd3": (_sd3_pipeline, {}, ".attn2"), "flux": (_schnell_pipeline, dict(guidance_scale=0.0),
                                                            "single_transformer_blocks."),
             "flux2": (_flux2_pipeline, dict(prompt=None, prompt_embeds=_embeds(FLUX2_CONFIG["joint_attention_dim"])[0]),
                       "single_transformer_blocks."),
             "qwenimage": (_qwenimage_pipeline, dict(
                 prompt=None, prompt_embeds=_embeds(QWEN_CONFIG["joint_attention_dim"])[0],
                 prompt_embeds_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
                 negative_prompt_embeds=_embeds(QWEN_CONFIG["joint_attention_dim"])[1], true_cfg_scale=4.0),
                 "transformer_blocks.1.attn")}


@pytest.mark.parametrize("family", list(clear.families.FAMILIES))
def test_pipeline_end_to_end(family, tmp_path):
    make, extra, module = PIPELINES[family]
    pipe = make(tmp_path)
    assert clear.model_family(pipe.transformer) == family
    ref = run(pipe, **extra)
    clear.apply_clear(pipe.transformer, radius=100)  # covers the 8x12 token grid
    np.testing.assert_allclose(run(pipe, **extra), ref, atol=1e-5)
    clear.apply_clear(pipe.transformer, radius=2, down_factor=2)
    local = run(pipe, **extra)
    assert local.shape == (1, 32, 48, 3) and np.isfinite(local).all()
    assert np.abs(local - ref).max() > 1e-4
    assert any(module in name for name in clear.clear_attention_modules(pipe.transformer))


def test_flux_controlnet_pipeline_zero_shot(tmp_path):
    """CLEAR weights trained for the transformer are used unchanged by the ControlNet (the paper's zero-shot claim):
    the ControlNet's attention modules have the same names and shapes as the transformer's first blocks."""
    from diffusers import FluxControlNetPipeline

    tiny_flux_controlnet_pipeline().save_pretrained(tmp_path / "pipe")
    pipe = FluxControlNetPipeline.from_pretrained(tmp_path / "pipe")
    control = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype("uint8"))
    ref = run(pipe, control_image=control)
    for model in (pipe.transformer, pipe.controlnet):
        clear.apply_clear(model, radius=100)
    np.testing.assert_allclose(run(pipe, control_image=control), ref, atol=1e-5)
    for model in (pipe.transformer, pipe.controlnet):
        clear.apply_clear(model, radius=2)
    path = clear.save_clear_weights(pipe.transformer, tmp_path / "clear_local_2.safetensors")
    clear.load_clear_weights(pipe.controlnet, path)  # unexpected keys would fail: the ControlNet has fewer blocks
    local = run(pipe, control_image=control)
    assert np.isfinite(local).all() and np.abs(local - ref).max() > 1e-4


def test_controlnet_extra_blocks_only_skipped_on_purpose(tmp_path):
    """The transformer's file carries blocks the ControlNet lacks: skipped for ControlNets by default, an error when
    asked to be strict; keys the ControlNet does have must all be present."""
    pipe = tiny_flux_controlnet_pipeline()
    for model in (pipe.transformer, pipe.controlnet):
        clear.apply_clear(model, radius=2)
    path = clear.save_clear_weights(pipe.transformer, tmp_path / "clear_local_2.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: .*transformer_blocks\.1\."):
        clear.load_clear_weights(pipe.controlnet, path, ignore_extra_blocks=False)
    clear.load_clear_weights(pipe.controlnet, path)
    t, c = pipe.transformer.transformer_blocks[0].attn, pipe.controlnet.transformer_blocks[0].attn
    assert torch.equal(t.to_q.weight, c.to_q.weight)
    # never skipped for the transformer itself
    from safetensors.torch import load_file, save_file

    extra = load_file(path)
    extra["transformer_blocks.7.attn.to_q.weight"] = extra["transformer_blocks.0.attn.to_q.weight"].clone()
    save_file(extra, tmp_path / "clear_local_2.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: transformer_blocks\.7\.attn\.to_q\.weight"):
        clear.load_clear_weights(pipe.transformer, tmp_path / "clear_local_2.safetensors")
