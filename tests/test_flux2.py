"""The FLUX.2 family (clear/families/flux2.py) on tiny random Flux2Transformer2DModels: CLEAR equals diffusers'
own FLUX.2 processors with an explicit mask (tests/reference_attention.py) for every backend, df 1 and 2, with and
without reference images and with proportional attention; a window covering the grid is the stock model exactly;
pipeline, distillation step, checkpoints and compilation."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import clear
from clear import backends
from clear.distill import attention_layers, distill_losses, freeze_for_distillation
from clear.families import family_of, family_of_checkpoint, get_family
from clear.weights import read_header
from reference_attention import Pattern, ReferenceFlux2Processor, reference_model
from tiny_models import FLUX2_CONFIG, flux2_inputs, tiny_flux, tiny_flux2, tiny_flux2_pipeline

H, W, TEXT = 8, 8, 7


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


def randomize_spatial_weights(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in clear.clear_attention_modules(model).values():
            m.processor.spatial_weight.copy_(torch.rand(m.processor.spatial_weight.shape, generator=g))


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("df,references", [(1, ()), (2, ()), (1, ((4, 6),)), (2, ((4, 4), (2, 6)))])
def test_matches_diffusers_processor_with_a_mask(backend, df, references):
    stock = tiny_flux2()
    model = tiny_flux2()
    clear.apply_clear(model, radius=2.5, down_factor=df, backend=backend)
    if df > 1:
        randomize_spatial_weights(model)
    x = flux2_inputs(H, W, TEXT, references=references)
    refs = sum(h * w for h, w in references)
    ref = reference_model(stock, ReferenceFlux2Processor, Pattern(TEXT, H, W, refs, 2.5, df), model)
    want, got = run(ref, x), run(model, x)
    assert got.shape == (2, H * W + refs, FLUX2_CONFIG["in_channels"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - run(stock, x)).abs().max() > 1e-3  # the window is local: CLEAR changed the output


def test_proportional_attention_uses_flux2_training_length():
    stock, model = tiny_flux2(), tiny_flux2()
    core = clear.apply_clear(model, radius=3, backend="dense", proportional_attention=True)
    assert core.training_tokens == 64 * 64 + 512 and model.clear_state.spec.name == "FLUX.2-dev"
    x = flux2_inputs(H, W, TEXT, references=((4, 4),))
    ref = reference_model(stock, ReferenceFlux2Processor, Pattern(TEXT, H, W, 16, 3, proportional_l0=64 * 64 + 512))
    torch.testing.assert_close(run(model, x), run(ref, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("references", [(), ((4, 6),)])
def test_a_window_covering_the_grid_is_the_stock_model_exactly(references):
    stock, model = tiny_flux2(), tiny_flux2()
    x = flux2_inputs(H, W, TEXT, references=references)
    want = run(stock, x)
    clear.apply_clear(model, radius=H + W, backend="dense")
    assert torch.equal(run(model, x), want)
    clear.remove_clear(model)
    assert torch.equal(run(model, x), want)


def test_grid_reader_and_refusals():
    from clear.families.flux2 import image_grid

    x = flux2_inputs(3, 5, references=((2, 2), (4, 1)))
    assert image_grid(x["img_ids"][0]) == ((3, 5), 8)
    model = tiny_flux2()
    clear.apply_clear(model, radius=2)
    with pytest.raises(NotImplementedError, match="reference KV cache"):
        run(model, {**x, "kv_cache_mode": "extract", "num_ref_tokens": 8})
    with pytest.raises(ValueError, match=r"img_ids must have shape \[tokens, 4\]"):
        run(model, {**x, "img_ids": x["img_ids"][..., :3]})


def test_family_spec_and_checkpoints_by_family(tmp_path):
    model = tiny_flux2()
    family = get_family("flux2")
    assert family_of(model) is family and clear.model_family(model) == "flux2"
    assert family.spec(model.config).name == "FLUX.2-dev"
    assert family.spec({"guidance_embeds": False}).name == "FLUX.2-klein"
    clear.apply_clear(model, radius=2, down_factor=2)
    keys = clear.clear_state_dict_keys(model)
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight" in keys
    assert "single_transformer_blocks.1.attn.to_out.weight" in keys and "transformer_blocks.0.attn.to_q.weight" in keys
    path = clear.save_clear_weights(model, tmp_path / "clear_local_2_down_2.safetensors")
    assert family_of_checkpoint(*read_header(path)) == "flux2"
    other = tiny_flux2(seed=3)
    clear.apply_clear(other, radius=2, down_factor=2)
    clear.load_clear_weights(other, path)
    for k, p in clear.clear_state_dict_keys(other).items():
        assert torch.equal(p, keys[k])
    flux1 = tiny_flux()
    clear.apply_clear(flux1, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="holds CLEAR weights for a flux2 model, not flux"):
        clear.load_clear_weights(flux1, path)
    flux1_path = clear.save_clear_weights(flux1, tmp_path / "flux1.safetensors")
    with pytest.raises(ValueError, match="holds CLEAR weights for a flux model, not flux2"):
        clear.load_clear_weights(other, flux1_path)


def test_distillation_step_and_checkpoint(tmp_path):
    """One step of L_fm + L_distill + L_attn (FLUX.2's default layers: single blocks 1, 5, ...): finite, the
    trained parameters move, and the checkpoint written after it loads back."""
    family = get_family("flux2")
    teacher = tiny_flux2().requires_grad_(False)
    student = tiny_flux2()
    clear.apply_clear(student, radius=2, down_factor=2, backend="dense")
    params = freeze_for_distillation(student)
    layers = attention_layers(student)
    assert layers == ["single_transformer_blocks.1.attn"]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    timesteps = torch.tensor([300.0, 700.0])
    prompt = torch.randn(2, 5, FLUX2_CONFIG["joint_attention_dim"], generator=g)
    guidance = family.training_guidance(teacher.config, 4.0)
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    losses = distill_losses(student, teacher, x0, noise, timesteps, timesteps / 1000, prompt, None, layers,
                            guidance=guidance)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.items().values()) and losses.attn > 0
    losses.total.backward()
    opt.step()
    assert any(not torch.equal(before[k], p) for k, p in params.items())
    path = clear.save_clear_weights(student, tmp_path / "step1.safetensors")
    fresh = tiny_flux2()
    clear.apply_clear(fresh, radius=2, down_factor=2, backend="dense")
    clear.load_clear_weights(fresh, path)
    x = flux2_inputs(H, W, TEXT)
    torch.testing.assert_close(run(fresh, x), run(student, x), atol=0, rtol=0)


def test_tiny_pipeline_generates_with_clear(tmp_path):
    """Flux2Pipeline saved and loaded, text-to-image and with a reference image: a window covering the grid
    gives the stock pipeline's image exactly, a small one another image."""
    from diffusers import Flux2Pipeline
    from PIL import Image

    tiny_flux2_pipeline().save_pretrained(tmp_path / "pipe")
    pipe = Flux2Pipeline.from_pretrained(tmp_path / "pipe", text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert family_of(str(tmp_path / "pipe")).name == "flux2"
    embeds = torch.randn(1, 6, FLUX2_CONFIG["joint_attention_dim"], generator=torch.Generator().manual_seed(0))
    reference = Image.new("RGB", (64, 64), "red")

    def generate(**kw):
        return pipe(prompt_embeds=embeds, height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kw).images

    stock = [generate(), generate(image=[reference])]
    clear.apply_clear(pipe.transformer, radius=100, backend="dense")
    for got, want in zip([generate(), generate(image=[reference])], stock):
        assert got.shape == (1, 32, 32, 3) and (got == want).all()
    clear.apply_clear(pipe.transformer, radius=2)
    local = generate(image=[reference])
    assert local.shape == (1, 32, 32, 3) and abs(local - stock[1]).max() > 1e-4


@pytest.mark.parametrize("backend,df,references,path", [("dense", 1, (), "full"), ("flex", 2, ((4, 4),), "full"),
                                                     ("dense", 2, ((4, 4),), "regional")])
def test_compiles_fullgraph_without_graph_breaks(backend, df, references, path):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_flux2()
    clear.apply_clear(model, radius=2, down_factor=df, backend=backend)
    x = flux2_inputs(4, 6, batch=1, references=references)
    want = run(model, x)
    cnt = CompileCounterWithBackend("aot_eager")
    if path == "full":
        compiled = torch.compile(model, fullgraph=True, backend=cnt)
    else:  # diffusers' regional compilation of the blocks the model declares (_repeated_blocks)
        model.compile_repeated_blocks(fullgraph=True, backend=cnt)
        compiled = model
    torch.testing.assert_close(run(compiled, x), want, atol=1e-5, rtol=1e-5)
    assert (cnt.frame_count == 1 if path == "full" else cnt.frame_count >= 1) and not counters["graph_break"]
    torch._dynamo.reset()


def test_patch_parallelism_refuses_flux2_before_anything_starts():
    from clear.parallel import parallelize

    model = tiny_flux2()
    clear.apply_clear(model, radius=2)
    with pytest.raises(TypeError, match=r"supports FluxTransformer2DModel, not Flux2Transformer2DModel \(model family "
                                        r"flux2\).*run this model in one process"):
        parallelize(model)


def test_ntk_rope_and_upscaling_stages():
    """NTK-scaled RoPE over FLUX.2's four axes: factor 1 is the model as it is, another factor changes it and is
    undone after the block; upscaling (SDEdit) stages are refused: diffusers has no FLUX.2 img2img pipeline."""
    from clear import inference as inf

    family = get_family("flux2")
    model = tiny_flux2()
    x = flux2_inputs(4, 6, references=((2, 2),))
    want = run(model, x)
    with family.ntk_rope(model, 1.0):
        assert torch.equal(run(model, x), want)
    with family.ntk_rope(model, 4.0):
        assert (run(model, x) - want).abs().max() > 1e-4
    assert torch.equal(run(model, x), want) and family.resolve_ntk_factor(None) == 10.0
    pipe = tiny_flux2_pipeline()
    with pytest.raises(NotImplementedError, match="no img2img \\(SDEdit\\) pipeline for Flux2Pipeline.*without --sizes"):
        inf.plan_generation(pipe, (32, 32), sizes=[(64, 64)])
    assert inf.plan_generation(pipe, (32, 32)).steps == 50


def test_generate_scripts_check_flux2_settings_before_loading(generate_cli, tmp_path):
    """scripts/generate.py and generate_highres.py on a FLUX.2 pipeline: no released weights (the message names how
    to train), upscaling stages refused, both before any weight loads."""
    tiny_flux2_pipeline().save_pretrained(tmp_path / "pipe")
    tiny = ["--model", str(tmp_path / "pipe"), "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match="no released CLEAR weights for flux2 models.*scripts/distill.py"):
        generate_cli.main(tiny)
    with pytest.raises(NotImplementedError, match="no img2img \\(SDEdit\\) pipeline for Flux2Pipeline"):
        generate_cli.main([*tiny, "--checkpoint", "none", "--upscale", "64x64"])
    assert not (tmp_path / "x.png").exists()


def test_inference_generate_uses_the_flux2_spec():
    """clear.inference.generate on a Flux2Pipeline (prompt as embeddings): FLUX.2-dev's defaults, the embedded
    guidance as guidance_scale, the image of the pipeline's own call with the same settings."""
    import numpy as np

    from clear import inference as inf

    pipe = tiny_flux2_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inf.apply_to_pipeline(pipe, radius=2, backend="dense")
    assert inf.default_settings(pipe) == dict(steps=50, guidance=4.0, max_sequence_length=512)
    assert inf.model_name(pipe.transformer) == "FLUX.2-dev"
    embeds = torch.randn(1, 6, FLUX2_CONFIG["joint_attention_dim"], generator=torch.Generator().manual_seed(0))
    got = inf.generate(pipe, None, 32, 32, steps=2, prompt_embeds=embeds)
    assert got.settings["guidance"] == 4.0 and got.settings["attention"] == "CLEAR r=2"
    want = pipe(prompt_embeds=embeds, guidance_scale=4.0, height=32, width=32, num_inference_steps=2,
                max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert np.abs(np.asarray(got.image, dtype=np.float32) / 255 - want).max() <= 1 / 255 + 1e-6
