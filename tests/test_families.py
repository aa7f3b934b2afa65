"""The model-family registry (clear.families): every family is found from a transformer, a pipeline, a saved
folder and a checkpoint header; a third family added as one file works through apply, distillation and generation;
each released model has one T5 length, used alike by caches, training and inference; whole pipelines of every
family run with CLEAR (SD3.5 with three text encoders and dual attention, FLUX.1-schnell-like without a guidance
embedding, FLUX.2, Qwen-Image), and the FLUX ControlNet uses the transformer's CLEAR weights zero-shot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import clear
import clear.families as families
from clear import inference as inf
from clear.data import PROMPT_EMBEDS
from clear.distill import attention_layers, distill_losses
from clear.encoders import PromptEncoder, plan_cache, run_cache
from clear.families import FAMILIES, family_of, family_of_checkpoint, get_family
from clear.weights import read_header
from tiny_models import (FLUX2_CONFIG, FLUX_CONFIG, QWEN_CONFIG, tiny_flux, tiny_flux2_pipeline,
                         tiny_flux_controlnet_pipeline, tiny_flux_pipeline, tiny_qwenimage_pipeline, tiny_sd3_pipeline,
                         tiny_wan_pipeline)
import toy_family
from toy_family import ToyTransformer2DModel


@pytest.fixture
def with_toy(monkeypatch):
    """The registry with the toy family's one entry added."""
    monkeypatch.setattr(families, "FAMILIES", families.make_table(*FAMILIES.values(), toy_family.FAMILY))
    return toy_family.FAMILY


def tiny_toy(seed=0):
    torch.manual_seed(seed)
    return ToyTransformer2DModel(**FLUX_CONFIG, guidance_embeds=True).eval()


def toy_pipeline(seed=0):
    from diffusers import FluxPipeline

    return FluxPipeline(**{**tiny_flux_pipeline(seed).components, "transformer": tiny_toy(seed)})


# a tiny pipeline of every registered family (a family without one here fails test_every_family_has_a_tiny_pipeline)
PIPELINES = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline, "flux2": tiny_flux2_pipeline,
             "qwenimage": tiny_qwenimage_pipeline, "wan": tiny_wan_pipeline, "toy": toy_pipeline}


def test_every_family_has_a_tiny_pipeline(with_toy):
    assert list(families.FAMILIES) == ["flux", "sd3", "flux2", "qwenimage", "wan", "toy"]
    assert set(PIPELINES) == set(families.FAMILIES)


def test_the_table_refuses_a_second_claim_on_a_name_or_class():
    with pytest.raises(ValueError, match="^name flux claimed by more than one model family"):
        families.make_table(*FAMILIES.values(), get_family("flux"))
    with pytest.raises(ValueError, match="^model class FluxControlNetModel, FluxTransformer2DModel claimed by more"):
        families.make_table(*FAMILIES.values(), get_family("flux").__class__(
            **{**get_family("flux").__dict__, "name": "other"}))
    with pytest.raises(ValueError, match="unknown model family 'toy'; known: flux, sd3, flux2, qwenimage"):
        get_family("toy")


@pytest.mark.parametrize("name", ["flux", "sd3", "flux2", "qwenimage", "wan", "toy"])
def test_family_of_transformer_pipeline_folder_and_checkpoint(name, with_toy, tmp_path):
    pipe = PIPELINES[name]()
    family = get_family(name)
    assert family_of(pipe.transformer) is family and family_of(pipe) is family
    assert clear.model_family(pipe.transformer) == name and inf.pipeline_family(pipe) is family
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert family_of(str(tmp_path / "pipe")) is family and family_of(tmp_path / "pipe") is family
    assert family_of(index) is family
    assert families.resolve_family("auto", tmp_path / "pipe") is family

    clear.apply_clear(pipe.transformer, radius=2)
    path = clear.save_clear_weights(pipe.transformer, tmp_path / "clear_local_2.safetensors")
    assert family_of_checkpoint(*read_header(path)) == name == inf.checkpoint_family(path)
    # without metadata, the block names say FLUX (single-stream blocks, the released files; FLUX.2's too) and Wan
    # (blocks); SD3's and Qwen-Image's blocks are shared
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(path), bare)
    assert inf.checkpoint_family(bare) == {"sd3": None, "qwenimage": None, "wan": "wan"}.get(name, "flux")


def test_bare_checkpoints_and_unknown_models():
    assert family_of_checkpoint({}, ["single_transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.x"]) == "flux"
    assert family_of_checkpoint({}, ["transformer_blocks.0.attn.to_q.weight"]) is None  # SD3's, or any family's
    assert family_of_checkpoint({"clear.family": "toy"}, []) == "toy"  # as written, registered or not
    with pytest.raises(TypeError, match="CLEAR does not support Linear; supported: Flux2Transformer2DModel, "
                                        "FluxControlNetModel, FluxTransformer2DModel, QwenImageTransformer2DModel, "
                                        "SD3Transformer2DModel"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot tell the model family of this config: it names none of"):
        family_of({"_class_name": "FluxPipeline", "transformer": ["diffusers", "UNet2DConditionModel"]})


def test_toy_transformer_without_its_family_entry_is_flux():
    """The registry entry is what makes the toy model its own family: without it, its MRO says FLUX."""
    assert family_of(tiny_toy()) is get_family("flux")


# ------------------------------------------------------------------------------------------
# a third family through apply, distillation and generation
# ------------------------------------------------------------------------------------------

def test_toy_family_applies_clear(with_toy):
    """CLEAR on the toy model is FLUX's CLEAR on the same weights, with the toy spec's training length as L0."""
    from tiny_models import flux_inputs

    toy, ref = tiny_toy(), tiny_flux(guidance_embeds=True)
    inputs = flux_inputs(8, 12, guidance=True)
    with torch.no_grad():
        dense = ref(**inputs)[0]
    core = clear.apply_clear(toy, radius=2, backend="dense", proportional_attention=True)
    clear.apply_clear(ref, radius=2, backend="dense", proportional_attention=True)
    assert toy.clear_state.family.name == "toy" and toy.clear_state.spec.name == "Toy-1"
    assert core.training_tokens == 8 * 8 + 16 and ref.clear_state.core.training_tokens == 64 * 64 + 512
    for r in (toy, ref):
        r.clear_state.core.proportional_attention = False  # same scale: compare the attention pattern
    with torch.no_grad():
        got, want = toy(**inputs)[0], ref(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - dense).abs().max() > 1e-4  # the window is local: CLEAR changed the output
    assert toy._repeated_blocks == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]


def test_toy_family_distills(with_toy):
    """One distillation step on the toy family: its default L_attn layers, the FLUX inputs, the same losses and
    gradients as FLUX on the same weights."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([300.0, 700.0])
    prompt, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    out = {}
    for name, make in (("toy", tiny_toy), ("flux", lambda: tiny_flux(guidance_embeds=True))):
        teacher = make().requires_grad_(False)
        student = make()
        clear.apply_clear(student, radius=2, backend="dense")
        params = clear.clear_state_dict_keys(student)
        student.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        layers = attention_layers(student)
        assert layers == ["single_transformer_blocks.1.attn"]
        losses = distill_losses(student, teacher, x0, noise, timesteps, timesteps / 1000, prompt, pooled, layers)
        losses.total.backward()
        out[name] = (losses.items(), {k: p.grad for k, p in params.items()})
    assert out["toy"][0] == pytest.approx(out["flux"][0], rel=1e-6) and out["toy"][0]["loss_attn"] > 0
    for k, grad in out["flux"][1].items():
        torch.testing.assert_close(out["toy"][1][k], grad)


def test_toy_family_generates(with_toy):
    """clear.inference.generate on a pipeline holding the toy transformer: the toy spec's defaults, and the image of
    FLUX with the same weights and settings."""
    toy, flux = toy_pipeline(), tiny_flux_pipeline()
    for p in (toy, flux):
        p.set_progress_bar_config(disable=True)
        for m in p.components.values():
            if isinstance(m, torch.nn.Module):
                m.eval()  # the tiny T5 is built in train mode: its dropout would draw random numbers
        inf.apply_to_pipeline(p, radius=2, backend="dense")
    assert inf.default_settings(toy) == dict(steps=3, guidance=2.0, max_sequence_length=16)
    assert inf.model_name(toy.transformer) == "Toy-1" and inf.size_rules(toy) == (4, None)
    got = inf.generate(toy, "a red cat", 16, 24)
    want = inf.generate(flux, "a red cat", 16, 24, steps=3, guidance=2.0, max_sequence_length=16)
    assert got.settings["steps"] == 3 and got.settings["max_sequence_length"] == 16
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(want.image))


# ------------------------------------------------------------------------------------------
# one T5 length per released model
# ------------------------------------------------------------------------------------------

def test_specs_recognise_the_released_models():
    from clear.mini import teacher as T

    flux, sd3 = get_family("flux"), get_family("sd3")
    assert flux.spec(T.TRANSFORMER_CONFIG).name == "CLEAR-mini"
    mini = flux.spec(T.TRANSFORMER_CONFIG)
    assert (mini.steps, mini.guidance, mini.max_sequence_length) == (T.STEPS, T.GUIDANCE, T.MAX_SEQUENCE_LENGTH)
    assert mini.training_tokens == (T.SIZE // 4) ** 2 + T.MAX_SEQUENCE_LENGTH  # 16x16 tokens at 64 px + 32
    dev, schnell = flux.spec({"guidance_embeds": True}), flux.spec({"guidance_embeds": False})
    assert (dev.name, dev.defaults()) == ("FLUX.1-dev", dict(steps=28, guidance=3.5, max_sequence_length=512))
    assert (schnell.name, schnell.defaults()) == ("FLUX.1-schnell", dict(steps=4, guidance=0.0, max_sequence_length=256))
    assert dev.training_tokens == schnell.training_tokens == 64 * 64 + 512  # FLUX.1's L0, dev and schnell alike
    assert clear.ClearAttention(None).training_tokens == dev.training_tokens  # a ClearAttention made by hand
    assert [sd3.spec(c).name for c in ({"dual_attention_layers": (0,)}, {"qk_norm": "rms_norm"}, {})] == [
        "SD3.5-Medium", "SD3.5-Large", "SD3-Medium"]
    assert {s.training_tokens for s in sd3.specs} == {64 * 64 + 77 + 256}
    for family in FAMILIES.values():
        assert family.specs[-1].recognise({}), f"{family.name}: its last spec must take any config"


def test_ntk_factor_follows_the_family_rope():
    assert get_family("flux").resolve_ntk_factor(None) == 10.0 and get_family("flux").resolve_ntk_factor(1) == 1.0
    assert get_family("sd3").resolve_ntk_factor(None) is None and get_family("sd3").resolve_ntk_factor(1) is None
    with pytest.raises(ValueError, match="ntk_factor=4: sd3 models have no RoPE"):
        get_family("sd3").resolve_ntk_factor(4)


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("schnell")
    tiny_flux_pipeline(guidance_embeds=False).save_pretrained(root / "pipe")
    (root / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(root / "data" / "0001.jpg")
    (root / "data" / "0001.json").write_text(json.dumps({"prompt": "a red cat"}))
    return root, FluxPipeline.from_pretrained(root / "pipe")


def test_schnell_caches_training_and_inference_use_256(schnell_dir, tiny_flux_pipeline_dir):
    """FLUX.1-schnell's T5 length is 256 everywhere: the prompt cache, the encoders of training and data generation
    (the model's spec) and inference's defaults; FLUX.1-dev's is 512."""
    root, pipe = schnell_dir
    assert inf.default_settings(pipe)["max_sequence_length"] == 256
    assert PromptEncoder(str(root / "pipe")).max_sequence_length == 256
    assert PromptEncoder(tiny_flux_pipeline_dir).max_sequence_length == 512
    assert get_family("flux").model_spec(str(root / "pipe")).max_sequence_length == 256
    job = plan_cache(PROMPT_EMBEDS, str(root / "pipe"), root / "data", root / "cache")
    assert job.max_sequence_length == 256
    report = run_cache(job, progress=False)
    assert report.written == 1
    from safetensors import safe_open

    with safe_open(str(root / "cache" / "prompt_embeds" / "0001.safetensors"), framework="pt") as f:
        assert f.metadata()["max_sequence_length"] == "256"
        assert f.get_tensor("prompt_embeds").shape == (256, FLUX_CONFIG["joint_attention_dim"])


def test_the_registry_imports_no_diffusers_model():
    """Command lines build their --model_family choices from the registry: importing it stays light (torch, not
    every diffusers transformer); diffusers' FLUX modules load when a processor or NTK RoPE first runs."""
    code = ("import sys, clear.families as f; print(list(f.FAMILIES)); "
            "print(any(m.startswith('diffusers.models') for m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(clear.__file__).parent.parent)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["['flux', 'sd3', 'flux2', 'qwenimage', 'wan']", "False"]


# ------------------------------------------------------------------------------------------
# whole pipelines of every family with CLEAR (saved and reloaded), and the FLUX ControlNet
# ------------------------------------------------------------------------------------------

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
SAVED_PIPELINES = {
    "sd3": (_sd3_pipeline, {}, ".attn2"),
    "flux": (_schnell_pipeline, dict(guidance_scale=0.0), "single_transformer_blocks."),
    "flux2": (_flux2_pipeline, dict(prompt=None, prompt_embeds=_embeds(FLUX2_CONFIG["joint_attention_dim"])[0]),
              "single_transformer_blocks."),
    "qwenimage": (_qwenimage_pipeline, dict(
        prompt=None, prompt_embeds=_embeds(QWEN_CONFIG["joint_attention_dim"])[0],
        prompt_embeds_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        negative_prompt_embeds=_embeds(QWEN_CONFIG["joint_attention_dim"])[1], true_cfg_scale=4.0),
        "transformer_blocks.1.attn"),
}


@pytest.mark.parametrize("family", [f for f in clear.families.FAMILIES if not clear.families.FAMILIES[f].video])
def test_pipeline_end_to_end(family, tmp_path):  # video families (Wan): tests/test_wan_pipelines.py
    make, extra, module = SAVED_PIPELINES[family]
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
    extra = load_file(path)
    extra["transformer_blocks.7.attn.to_q.weight"] = extra["transformer_blocks.0.attn.to_q.weight"].clone()
    save_file(extra, tmp_path / "clear_local_2.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys: transformer_blocks\.7\.attn\.to_q\.weight"):
        clear.load_clear_weights(pipe.transformer, tmp_path / "clear_local_2.safetensors")
