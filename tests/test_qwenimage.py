"""The Qwen-Image family (clear/families/qwenimage.py) on tiny random QwenImageTransformer2DModels: CLEAR equals
diffusers' own QwenDoubleStreamAttnProcessor2_0 with an explicit mask (tests/reference_attention.py) that joins the
window with the text padding mask, for every backend, df 1 and 2, with padded text and with the edit pipelines'
input pictures; a window covering the grid is the stock model; pipeline, distillation step, checkpoints and
compilation."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import clear
from clear import backends
from clear.apply import plan_forward
from clear.distill import attention_layers, distill_losses, freeze_for_distillation
from clear.families import family_of, family_of_checkpoint, get_family
from clear.weights import read_header
from reference_attention import Pattern, ReferenceQwenProcessor, reference_model
from tiny_models import QWEN_CONFIG, qwenimage_inputs, tiny_flux2, tiny_qwenimage, tiny_qwenimage_pipeline

H, W, TEXT = 8, 8, 7


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


def mask_of(x):
    m = x.get("encoder_hidden_states_mask")
    return None if m is None else m.bool()


def randomize_spatial_weights(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in clear.clear_attention_modules(model).values():
            m.processor.spatial_weight.copy_(torch.rand(m.processor.spatial_weight.shape, generator=g))


# valid text tokens per row: none padded, the same padding in both rows, different padding (one group per row)
@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("df,valid,references", [(1, None, ()), (2, [4, 4], ()), (1, [7, 3], ()),
                                                 (2, [5, 2], ((4, 4),)), (1, None, ((2, 6),))])
def test_matches_diffusers_processor_with_padding_and_window_in_one_mask(backend, df, valid, references):
    stock, model = tiny_qwenimage(), tiny_qwenimage()
    clear.apply_clear(model, radius=2.5, down_factor=df, backend=backend)
    if df > 1:
        randomize_spatial_weights(model)
    x = qwenimage_inputs(H, W, TEXT, valid=valid, references=references)
    refs = sum(h * w for h, w in references)
    ref = reference_model(stock, ReferenceQwenProcessor, Pattern(TEXT, H, W, refs, 2.5, df, valid=mask_of(x)), model)
    want, got = run(ref, x), run(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - run(stock, x)).abs().max() > 1e-3  # the window is local: CLEAR changed the output


def test_padded_text_is_invisible_and_diffusers_agrees():
    """What a padded text token holds never reaches the image: CLEAR's output and the stock model's (which masks
    the same keys) do not change when the padded embeddings do."""
    stock, model = tiny_qwenimage(), tiny_qwenimage()
    clear.apply_clear(model, radius=2, backend="dense")
    x = qwenimage_inputs(H, W, TEXT, valid=[4, 6])
    y = {**x, "encoder_hidden_states": x["encoder_hidden_states"].clone()}
    y["encoder_hidden_states"][0, 4:] = 100.0
    y["encoder_hidden_states"][1, 6:] = -7.0
    for m in (stock, model):
        torch.testing.assert_close(run(m, y), run(m, x), atol=1e-5, rtol=1e-5)


def test_proportional_attention_counts_valid_tokens():
    stock, model = tiny_qwenimage(), tiny_qwenimage()
    core = clear.apply_clear(model, radius=3, backend="dense", proportional_attention=True)
    assert core.training_tokens == 83 * 83 + 512 and model.clear_state.spec.name == "Qwen-Image"
    x = qwenimage_inputs(H, W, TEXT, valid=[7, 2])
    ref = reference_model(stock, ReferenceQwenProcessor,
                          Pattern(TEXT, H, W, 0, 3, valid=mask_of(x), proportional_l0=83 * 83 + 512))
    torch.testing.assert_close(run(model, x), run(ref, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("valid,references", [(None, ()), (None, ((4, 4),)), ([5, 7], ())])
def test_a_window_covering_the_grid_is_the_stock_model(valid, references):
    """Exactly (bit for bit) without padding; with padding the same up to float rounding (diffusers masks the
    padded keys, CLEAR leaves them out)."""
    stock, model = tiny_qwenimage(), tiny_qwenimage()
    x = qwenimage_inputs(H, W, TEXT, valid=valid, references=references)
    want = run(stock, x)
    clear.apply_clear(model, radius=H + W, backend="dense")
    got = run(model, x)
    if valid is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    clear.remove_clear(model)
    assert torch.equal(run(model, x), want)


def test_grid_reader_and_refusals():
    model = tiny_qwenimage()
    clear.apply_clear(model, radius=2)
    x = qwenimage_inputs(3, 5, references=((2, 2),))
    run(model, x)
    forward = plan_forward(model, **x)
    assert forward.grid == (3, 5) and forward.arrangement.text_lens == (TEXT + 4,)
    with pytest.raises(ValueError, match=r"hidden_states has 19 tokens but img_shapes"):
        run(model, {**x, "img_shapes": [[(1, 3, 5)]] * 2})
    with pytest.raises(NotImplementedError, match="one image frame"):
        run(model, {**x, "img_shapes": [[(2, 3, 5), (1, 2, 2)]] * 2, "hidden_states": x["hidden_states"][:, :19]})


def test_family_spec_and_checkpoints_by_family(tmp_path):
    model = tiny_qwenimage()
    family = get_family("qwenimage")
    assert family_of(model) is family and clear.model_family(model) == "qwenimage"
    assert family.spec({"zero_cond_t": True}).name == "Qwen-Image-Edit-2511"
    clear.apply_clear(model, radius=2, down_factor=2)
    keys = clear.clear_state_dict_keys(model)
    assert sorted({k.split(".")[-2] for k in keys}) == ["0", "processor", "to_k", "to_q", "to_v"]
    path = clear.save_clear_weights(model, tmp_path / "clear_local_2_down_2.safetensors")
    assert family_of_checkpoint(*read_header(path)) == "qwenimage"
    flux2 = tiny_flux2()
    clear.apply_clear(flux2, radius=2, down_factor=2)
    with pytest.raises(ValueError, match="holds CLEAR weights for a qwenimage model, not flux2"):
        clear.load_clear_weights(flux2, path)
    other = tiny_qwenimage(seed=4)
    clear.apply_clear(other, radius=2, down_factor=2)
    clear.load_clear_weights(other, path)
    for k, p in clear.clear_state_dict_keys(other).items():
        assert torch.equal(p, keys[k])


def test_distillation_step_with_padded_text_and_checkpoint(tmp_path):
    teacher = tiny_qwenimage().requires_grad_(False)
    student = tiny_qwenimage()
    clear.apply_clear(student, radius=2, down_factor=2, backend="dense")
    params = freeze_for_distillation(student)
    layers = attention_layers(student)
    assert layers == ["transformer_blocks.1.attn"]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    timesteps = torch.tensor([300.0, 700.0])
    prompt = torch.randn(2, 6, QWEN_CONFIG["joint_attention_dim"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    before = {k: p.detach().clone() for k, p in params.items()}
    losses = distill_losses(student, teacher, x0, noise, timesteps, timesteps / 1000, prompt, mask, layers,
                            guidance=get_family("qwenimage").training_guidance(teacher.config, 4.0))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.items().values()) and losses.attn > 0
    losses.total.backward()
    torch.optim.AdamW(params.values(), lr=1e-3).step()
    assert any(not torch.equal(before[k], p) for k, p in params.items())
    path = clear.save_clear_weights(student, tmp_path / "step1.safetensors")
    fresh = tiny_qwenimage()
    clear.apply_clear(fresh, radius=2, down_factor=2, backend="dense")
    clear.load_clear_weights(fresh, path)
    x = qwenimage_inputs(H, W, TEXT, valid=[3, 7])
    torch.testing.assert_close(run(fresh, x), run(student, x), atol=0, rtol=0)


def test_tiny_pipeline_generates_with_clear(tmp_path):
    """QwenImagePipeline saved and loaded, with a padded prompt and true CFG: a window covering the grid gives the
    stock pipeline's image (to float rounding: padding), a small one another image."""
    import numpy as np
    from diffusers import QwenImagePipeline

    tiny_qwenimage_pipeline().save_pretrained(tmp_path / "pipe")
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "pipe", text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert family_of(str(tmp_path / "pipe")).name == "qwenimage"
    g = torch.Generator().manual_seed(0)
    embeds, neg = (torch.randn(1, 6, QWEN_CONFIG["joint_attention_dim"], generator=g) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])

    def generate():
        return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                    negative_prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long), true_cfg_scale=4.0, height=32,
                    width=32, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    stock = generate()
    clear.apply_clear(pipe.transformer, radius=100, backend="dense")
    np.testing.assert_allclose(generate(), stock, atol=1e-5)
    clear.apply_clear(pipe.transformer, radius=2)
    local = generate()
    assert local.shape == (1, 32, 32, 3) and abs(local - stock).max() > 1e-4


@pytest.mark.parametrize("backend,df,valid,path", [("dense", 1, None, "full"), ("flex", 2, [5], "full"),
                                                ("dense", 2, [5], "regional")])
def test_compiles_fullgraph_without_graph_breaks(backend, df, valid, path):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_qwenimage()
    clear.apply_clear(model, radius=2, down_factor=df, backend=backend)
    x = qwenimage_inputs(4, 6, batch=1, valid=valid)
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


def test_patch_parallelism_refuses_qwenimage_before_anything_starts():
    from clear.parallel import parallelize

    model = tiny_qwenimage()
    clear.apply_clear(model, radius=2)
    with pytest.raises(TypeError, match=r"not QwenImageTransformer2DModel \(model family qwenimage\)"):
        parallelize(model)


def test_inference_samples_with_true_classifier_free_guidance(tmp_path):
    """clear.inference.generate on a Qwen-Image pipeline: the spec's guidance is true CFG (true_cfg_scale and the
    empty negative prompt " ", unless the call brings its own negative), the image is the pipeline's own with it."""
    import numpy as np
    from clear import inference as inf

    family = get_family("qwenimage")
    assert family.guidance_kwargs(4.0) == {"true_cfg_scale": 4.0, "negative_prompt": " "}
    assert family.guidance_kwargs(1.0) == {"true_cfg_scale": 1.0}
    assert family.guidance_kwargs(4.0, {"negative_prompt_embeds": 0}) == {"true_cfg_scale": 4.0}
    pipe = tiny_qwenimage_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inf.apply_to_pipeline(pipe, radius=2, backend="dense")
    assert inf.default_settings(pipe) == dict(steps=50, guidance=4.0, max_sequence_length=512)
    g = torch.Generator().manual_seed(0)
    text = dict(prompt_embeds=torch.randn(1, 6, 32, generator=g), prompt_embeds_mask=torch.tensor([[1, 1, 1, 0, 0, 0]]),
                negative_prompt_embeds=torch.randn(1, 6, 32, generator=g))
    got = inf.generate(pipe, None, 32, 32, steps=2, **text)
    assert got.settings["guidance"] == 4.0 and got.settings["radius"] == 2
    want = pipe(**text, true_cfg_scale=4.0, height=32, width=32, num_inference_steps=2, max_sequence_length=512,
                generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    without = pipe(**text, true_cfg_scale=1.0, height=32, width=32, num_inference_steps=2, max_sequence_length=512,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    got = np.asarray(got.image, dtype=np.float32) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6 < np.abs(got - without).max()


def test_ntk_factor_is_refused_for_qwen_rope():
    family = get_family("qwenimage")
    assert family.resolve_ntk_factor(None) is None and family.resolve_ntk_factor(1) is None
    with pytest.raises(ValueError, match="ntk_factor=4: NTK-scaled RoPE is not implemented for Qwen-Image"):
        family.resolve_ntk_factor(4)
    with pytest.raises(ValueError, match="not implemented for Qwen-Image"):
        family.ntk_rope(tiny_qwenimage(), 2.0)


def test_arrangement_groups_rows_by_mask_and_orders_global_tokens_first():
    from clear.processors import Arrangement

    assert Arrangement.build(3, 4, 0) is None and Arrangement.build(3, 4, 0, torch.ones(2, 3)) is None
    a = Arrangement.build(3, 4, 2, torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1]]))
    assert a.seq_len == 9 and a.text_lens == (4,) and [g.rows for g in a.groups] == [slice(0, 2), slice(2, 3)]
    first, second = a.groups
    assert first.order.tolist() == [0, 1, 7, 8, 3, 4, 5, 6] and first.padded.tolist() == [2]
    assert second.order.tolist() == [0, 2, 7, 8, 3, 4, 5, 6] and second.padded.tolist() == [1]
    for g in a.groups:
        assert torch.cat([g.order, g.padded])[g.inverse].tolist() == list(range(9))
    refs_only = Arrangement.build(2, 4, 3)
    (g,) = refs_only.groups
    assert g.rows == slice(None) and g.text_len == 5 and g.order.tolist() == [0, 1, 6, 7, 8, 2, 3, 4, 5]


@pytest.mark.slow
def test_generate_and_generate_data_scripts_run_qwenimage(generate_cli, tmp_path):
    """scripts/generate.py (also with an upscaling stage, as generate_highres.py) and scripts/generate_data.py on a tiny QwenImagePipeline with its (tiny) Qwen2.5-VL text
    encoder: CLEAR images with the model's true classifier-free guidance; the image is the pipeline's own with the
    same settings and CLEAR applied."""
    import json

    import numpy as np
    from PIL import Image

    from clear import inference as inf
    from scripts_loader import load_script

    tiny_qwenimage_pipeline(text_encoder=True).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "img.png"
    tiny = ["--height", "32", "--width", "32", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu",
            "--quiet"]
    written = generate_cli.main(["--model", str(tmp_path / "pipe"), "--prompt", "a red cat", *tiny, "--radius", "2",
                                 "--checkpoint", "none", "--seed", "3", "--out", str(out)])
    assert written == {"image": str(out)}
    settings = json.loads(Image.open(out).text["clear:settings"])
    assert settings["guidance"] == 4.0 and settings["radius"] == 2 and settings["steps"] == 2

    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    inf.apply_to_pipeline(pipe, radius=2, backend="auto")
    want = pipe("a red cat", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=2,
                max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6

    # an upscaling (SDEdit) stage: QwenImageImg2ImgPipeline on the same components, no NTK factor (Qwen's RoPE)
    high = generate_cli.main(["--model", str(tmp_path / "pipe"), "--prompt", "a red cat", *tiny, "--radius", "2",
                              "--checkpoint", "none", "--upscale", "48x48", "--out", str(tmp_path / "hi.png")])
    hi = Image.open(high["image"])
    assert hi.size == (48, 48) and json.loads(hi.text["clear:settings"])["ntk_factor"] is None

    (tmp_path / "prompts.txt").write_text("a red cat\na dog in the city\na boat\n")
    data = load_script("generate_data").main([
        "--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
        "--output_dir", str(tmp_path / "data"), "--height", "16", "--width", "16", "--num_inference_steps", "2",
        "--max_sequence_length", "16", "--batch_size", "2", "--samples_per_shard", "2"])
    assert data["written"] == 3 and len(list((tmp_path / "data").glob("shard-*.tar"))) == 2
