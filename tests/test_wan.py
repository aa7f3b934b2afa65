"""CLEAR on Wan 2.1 / 2.2 (WanTransformer3DModel): the 3-D window against diffusers' own Wan processor given the
explicit 3-D mask (outputs and gradients, every backend), cross-attention untouched, the family's released models
and FLOPs, checkpoints and their refusals."""

import copy

import pytest
import torch

import clear
from clear.apply import plan_forward
from clear.families import family_of, family_of_checkpoint, get_family
from clear.families.wan import SIZES, TEXT_TOKENS, WanClearAttnProcessor, step_flops
from reference_attention import ReferenceWanProcessor, video_window_mask
from tiny_models import tiny_flux, tiny_wan, wan_inputs


def reference_model(model, grid, radius, temporal_radius, df=1, clear_model=None):
    """A copy of the stock ``model`` whose self-attention is diffusers' processor with the explicit mask (with
    pooled keys: the reference processor, its weights those of ``clear_model``'s processors as new leaves)."""
    ref = copy.deepcopy(model)
    mask = video_window_mask(*grid, radius, temporal_radius, df)
    procs = {}
    for name, proc in ref.attn_processors.items():
        if not name.endswith("attn1.processor"):
            procs[name] = proc
        elif df == 1:
            procs[name] = ReferenceWanProcessor.diffusers_own(mask)
        else:
            w = clear_model.get_submodule(name).spatial_weight.detach().reshape(df, df).clone().requires_grad_(True)
            procs[name] = ReferenceWanProcessor(mask, grid, w)
    ref.set_attn_processor(procs)
    return ref


def run(model, inputs, grad_out):
    """Output and the gradients of (output * grad_out).sum() w.r.t. the latents and every parameter."""
    x = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": x})[0]
    (out * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def assert_same(clear_run, ref_run, atol=2e-5):
    (out, gx, grads), (rout, rgx, rgrads) = clear_run, ref_run
    torch.testing.assert_close(out, rout, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gx, rgx, atol=atol, rtol=1e-4)
    common = set(grads) & set(rgrads)
    assert {n for n in grads if "attn1" in n and "processor" not in n} <= common
    for n in common:
        torch.testing.assert_close(grads[n], rgrads[n], atol=atol, rtol=1e-3, msg=n)


GRIDS = [  # frames, height, width, radius, temporal radius
    ((5, 7, 9), 3, 2),  # the odd grid
    ((5, 7, 9), 2.5, None),  # every frame
    ((5, 7, 9), 3, 0.5),  # rt below one frame step: each frame alone
    ((4, 5, 6), 1.5, 3.5),
]


@pytest.mark.parametrize("backend", ["dense", "tiled", "flex"])
@pytest.mark.parametrize("grid,radius,rt", GRIDS)
def test_exact_against_diffusers_wan_with_the_3d_mask(backend, grid, radius, rt):
    model = tiny_wan()
    inputs = wan_inputs(*grid, batch=2)
    ref = reference_model(model, grid, radius, rt)
    clear.apply_clear(model, radius=radius, temporal_radius=rt, backend=backend)
    grad_out = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    if backend == "flex":  # FlexAttention has no backward on CPU: outputs only
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs)[0], ref(**inputs)[0], atol=2e-5, rtol=1e-4)
        return
    assert_same(run(model, inputs, grad_out), run(ref, inputs, grad_out))


@pytest.mark.parametrize("backend", ["dense", "tiled", "flex"])
def test_window_beyond_the_grid_is_the_stock_model(backend):
    model = tiny_wan()
    inputs = wan_inputs(5, 7, 9)
    with torch.no_grad():
        stock = model(**inputs)[0]
        clear.apply_clear(model, radius=100, temporal_radius=100, backend=backend)
        out = model(**inputs)[0]
    if backend == "dense":
        assert torch.equal(out, stock)  # every key seen: no mask at all, SDPA as diffusers calls it
    else:
        torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
def test_pooled_keys_per_frame_against_reference(backend):
    grid, radius, rt, df = (3, 4, 6), 1.5, 1.5, 2
    model = tiny_wan()
    inputs = wan_inputs(*grid, batch=2)
    stock = copy.deepcopy(model)
    clear.apply_clear(model, radius=radius, temporal_radius=rt, down_factor=df, backend=backend)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, m in clear.clear_attention_modules(model).items():
            m.processor.spatial_weight.copy_(torch.rand(m.processor.spatial_weight.shape, generator=g))
    ref = reference_model(stock, grid, radius, rt, df, clear_model=model)
    grad_out = torch.randn(inputs["hidden_states"].shape, generator=g)
    clear_run, ref_run = run(model, inputs, grad_out), run(ref, inputs, grad_out)
    assert_same(clear_run, ref_run)
    # the pooling weights' gradients: CLEAR's parameter against the reference's leaf
    for name, m in clear.clear_attention_modules(model).items():
        m.processor.spatial_weight.grad = None
        ref.get_submodule(name).processor.spatial_weight.grad = None
    (model(**inputs)[0] * grad_out).sum().backward()
    (ref(**inputs)[0] * grad_out).sum().backward()
    for name, m in clear.clear_attention_modules(model).items():
        ref_w = ref.get_submodule(name).processor.spatial_weight
        torch.testing.assert_close(m.processor.spatial_weight.grad.reshape(df, df), ref_w.grad, atol=1e-4, rtol=1e-3)


def test_image_to_video_cross_attention_is_unchanged():
    """Wan 2.1 I2V: attn2 (512 text tokens + the image context) keeps diffusers' processor; only attn1 is CLEAR."""
    grid, radius, rt = (3, 4, 5), 2, 1.5
    model = tiny_wan(i2v=True)
    inputs = wan_inputs(*grid, i2v=True)
    ref = reference_model(model, grid, radius, rt)
    originals = dict(model.attn_processors)
    clear.apply_clear(model, radius=radius, temporal_radius=rt, backend="dense")
    procs = model.attn_processors
    assert all(procs[n] is originals[n] for n in procs if "attn2" in n)
    assert all(isinstance(procs[n], WanClearAttnProcessor) for n in procs if "attn1" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], ref(**inputs)[0], atol=2e-5, rtol=1e-4)
    clear.remove_clear(model)
    assert all(model.attn_processors[n] is originals[n] for n in originals)


def test_grid_follows_each_forward():
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1, backend="dense")
    seen = []  # the forward in progress, as the processors read it (Wan's forward hands them no kwargs)
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(model.clear_state.in_progress.plan))
    with torch.no_grad():
        for grid in [(3, 4, 5), (2, 6, 3)]:
            x = wan_inputs(*grid, batch=1)
            model(**x)
            forward = plan_forward(model, **x)
            assert seen[-1].grid == forward.grid == grid
            layout = clear.geometry.TokenLayout(0, grid[1], grid[2], frames=grid[0])
            assert seen[-1].plans[0].layout == forward.plans[0].layout == layout
            assert seen[-1].layout(layout.seq_len) == (layout, seen[-1].plans[0])
            assert model.clear_state.in_progress.plan is None  # nothing of a forward stays after it


def test_refusals():
    with pytest.raises(ValueError, match="temporal_radius=2 is for video models.*drop temporal_radius"):
        clear.apply_clear(tiny_flux(), radius=4, temporal_radius=2)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="temporal_radius must be a positive, finite number"):
            clear.apply_clear(tiny_wan(), radius=4, temporal_radius=bad)
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1, down_factor=2, backend="dense")
    with pytest.raises(ValueError, match="not divisible by down_factor=2"):
        model(**wan_inputs(2, 5, 4, batch=1))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(**{**wan_inputs(2, 4, 4, batch=1), "hidden_states": torch.randn(1, 4, 2, 7, 8)})
    with pytest.raises(TypeError, match="patch parallelism supports FluxTransformer2DModel, not WanTransformer3DModel"):
        clear.parallelize(model)  # refused before torch.distributed is asked


# ------------------------------------------------------------------------------------------
# The family: released models, FLOPs, checkpoints
# ------------------------------------------------------------------------------------------

RELEASED_CONFIGS = {  # diffusers' transformer configs (the fields that tell them apart)
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, num_layers=30, in_channels=16, ffn_dim=8960),
    "Wan-T2V-14B": dict(num_attention_heads=40, num_layers=40, in_channels=16, ffn_dim=13824),
    "Wan2.1-I2V-14B": dict(num_attention_heads=40, num_layers=40, in_channels=36, image_dim=1280,
                           added_kv_proj_dim=5120),
    "Wan2.2-I2V-A14B": dict(num_attention_heads=40, num_layers=40, in_channels=36, image_dim=None),
    "Wan2.2-TI2V-5B": dict(num_attention_heads=24, num_layers=30, in_channels=48, out_channels=48, ffn_dim=14336),
}


def test_family_and_released_models():
    model = tiny_wan()
    family = family_of(model)
    assert family is get_family("wan") and family.video and family.name == "wan"
    assert family_of({"_class_name": "WanTransformer3DModel"}) is family
    assert family_of({"transformer": ["diffusers", "WanTransformer3DModel"]}) is family
    for name, config in RELEASED_CONFIGS.items():
        assert family.spec(config).name == name
    assert family.spec(model.config).name == "Wan"  # the tiny model: the generic spec
    for name, size in SIZES.items():
        match = {"Wan2.1-T2V-14B": "Wan-T2V-14B", "Wan2.2-T2V-A14B": "Wan-T2V-14B"}.get(name, name)
        cfg = dict(num_attention_heads=size.dim // 128, num_layers=size.layers, in_channels=size.in_channels,
                   image_dim=1280 if size.image_context else None)
        assert family.spec(cfg).name == match


def test_step_flops_hand_count_wan21_1_3b_480p():
    size = SIZES["Wan2.1-T2V-1.3B"]
    grid = size.grid(81, 480, 832)
    assert grid == (21, 30, 52)
    n, d, L = 21 * 30 * 52, 1536, 30
    f = step_flops(size, *grid)
    assert f["self_attention"] == L * 4 * n * n * d
    assert f["cross_attention"] == L * 4 * n * TEXT_TOKENS * d
    per_layer = 8 * n * d * d + 4 * n * d * d + 4 * TEXT_TOKENS * d * d + 4 * n * d * 8960
    assert f["linear"] == L * per_layer + 2 * n * d * (16 + 16) * 4
    assert f["total"] == f["self_attention"] + f["cross_attention"] + f["linear"]
    # CLEAR's window leaves its pair count: each frame alone is frames x the 2-D count
    alone = step_flops(size, *grid, radius=8, temporal_radius=0.5)["self_attention"]
    assert alone == L * 21 * clear.attention_flops(30, 52, 8, text_len=0, dim=d)
    assert SIZES["Wan2.2-TI2V-5B"].grid(81, 704, 1280) == (21, 22, 40)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1.5, backend="dense")
    keys = clear.clear_state_dict_keys(model)
    assert keys and all(".attn1." in k for k in keys)  # the cross-attention is not CLEAR's
    with torch.no_grad():
        for p in keys.values():
            p.add_(0.1)
    path = clear.save_clear_weights(model, tmp_path / "wan.safetensors")
    metadata, _ = clear.weights.read_header(path)
    assert metadata["clear.temporal_radius"] == "1.5" and metadata["clear.family"] == "wan"
    assert family_of_checkpoint(metadata, keys) == "wan" and family_of_checkpoint({}, keys) == "wan"

    other = tiny_wan()
    clear.apply_clear(other, radius=2, temporal_radius=1.5, backend="dense")
    clear.load_clear_weights(other, path)
    assert all(torch.equal(p, keys[k]) for k, p in clear.clear_state_dict_keys(other).items())

    clear.apply_clear(other, radius=2, temporal_radius=3, backend="dense")
    with pytest.raises(ValueError, match="trained for temporal_radius=1.5 .* temporal_radius=3"):
        clear.load_clear_weights(other, path)
    clear.apply_clear(other, radius=2, backend="dense")
    with pytest.raises(ValueError, match="temporal_radius=1.5 but CLEAR was applied with temporal_radius=None"):
        clear.load_clear_weights(other, path)
    clear.load_clear_weights(other, path, strict_radius=False)  # the caller vouches for the window
    clear.apply_clear(other, radius=3, temporal_radius=1.5, backend="dense")
    with pytest.raises(ValueError, match="radius=2 but CLEAR was applied with radius=3"):
        clear.load_clear_weights(other, path)

    flux = tiny_flux()
    clear.apply_clear(flux, radius=2)
    with pytest.raises(ValueError, match="for a wan model, not flux"):
        clear.load_clear_weights(flux, path)
    flux_path = clear.save_clear_weights(flux, tmp_path / "flux.safetensors")
    clear.apply_clear(other, radius=2, temporal_radius=1.5, backend="dense")
    with pytest.raises(ValueError, match="for a flux model, not wan"):
        clear.load_clear_weights(other, flux_path)


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,df", [("dense", 1), ("tiled", 2), ("flex", 1)])
def test_compile_explain_one_graph_no_break(backend, df):
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1.5, down_factor=df, backend=backend)
    x = wan_inputs(3, 4, 6, batch=1)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ["full", "regional"])
def test_compiled_equals_eager(path):
    """fullgraph, whole model and regional: grids A, B (same token count, other aspect), A again."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1.5, backend="tiled")
    xs = [wan_inputs(*g, batch=1, seed=i) for i, g in enumerate(((3, 4, 6), (3, 6, 4), (3, 4, 6)))]
    with torch.no_grad():
        refs = [model(**x)[0] for x in xs]
        cnt = CompileCounterWithBackend("aot_eager")
        if path == "full":
            compiled = torch.compile(model, fullgraph=True, backend=cnt)
        else:
            model.compile_repeated_blocks(fullgraph=True, backend=cnt)
            compiled = model
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(compiled(**x)[0], ref, atol=1e-5, rtol=1e-5)
    frames = cnt.frame_count
    torch._dynamo.reset()
    assert not counters["graph_break"]
    assert (frames == 2) if path == "full" else frames >= 1  # full: one graph per grid, none for A again


# ------------------------------------------------------------------------------------------
# Distillation: the objective on Wan, and the data commands' refusal
# ------------------------------------------------------------------------------------------

def distill_setup(radius, rt, seed=0):
    from clear.distill import attention_layers, freeze_for_distillation

    teacher = tiny_wan(seed)
    student = copy.deepcopy(teacher)
    clear.apply_clear(student, radius=radius, temporal_radius=rt, backend="tiled")
    trainable = freeze_for_distillation(student)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 4, 3, 8, 12, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    prompt = torch.randn(2, 6, 16, generator=g)
    return teacher, student, trainable, attention_layers(student), (x0, noise, sigmas * 1000, sigmas, prompt, None)


def test_attention_layers_of_wan_are_the_self_attention():
    from clear.distill import attention_layers

    model = tiny_wan(num_layers=5)
    assert attention_layers(model) == ["blocks.0.attn1", "blocks.4.attn1"]  # "self:4", the family's default
    assert attention_layers(model, "self:2:1") == ["blocks.1.attn1", "blocks.3.attn1"]
    assert attention_layers(model, "blocks.2") == ["blocks.2.attn1"]
    with pytest.raises(ValueError, match="'self:4'"):
        attention_layers(model, "single:4")


def test_distillation_steps_on_wan():
    from clear.distill import distill_losses

    # a window that covers the 3x4x6 grid: the student is the teacher, every loss but flow matching is 0
    teacher, student, _, layers, batch = distill_setup(100, 100)
    same = distill_losses(student, teacher, *batch, layers, guidance=None)
    assert same.distill.item() == 0 and same.attn.item() == 0 and same.fm.item() > 0
    # a local window: the losses train the attention projections of attn1 only, and go down
    teacher, student, trainable, layers, batch = distill_setup(1.5, 1)
    assert trainable and all(".attn1." in k for k in trainable)
    opt = torch.optim.Adam(trainable.values(), lr=5e-3)
    first = None
    for _ in range(4):
        losses = distill_losses(student, teacher, *batch, layers, guidance=None, alpha=1.0, beta=1.0)
        loss = losses.distill + losses.attn
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in student.named_parameters() if "attn2" in n)
        opt.step()
    assert loss.item() < first


def test_data_commands_refuse_wan(tmp_path):
    from tiny_models import tiny_wan_pipeline

    from clear.commands import generate_data
    from clear.encoders import plan_cache

    tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match="training Wan from data is not built"):
        generate_data.run(str(tmp_path / "wan"), "a cat", str(tmp_path / "out"), height=32, width=32)
    with pytest.raises(NotImplementedError, match="training Wan from data is not built"):
        plan_cache("prompt_embeds", pretrained_model_name_or_path=str(tmp_path / "wan"),
                   data_root=str(tmp_path / "data"))
    from scripts_loader import load_script

    with pytest.raises(SystemExit, match="training Wan from data is not built"):
        load_script("distill").main(["--pretrained_model_name_or_path", str(tmp_path / "wan"), "--data_root",
                                     str(tmp_path / "data"), "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    from clear.commands.generate_eval_set import preflight

    with pytest.raises(ValueError, match="video model: evaluation sets are images"):
        preflight(str(tmp_path / "wan"), 32, 32, radius=2, checkpoint="none", device="cpu")


def test_the_flops_table_in_the_docs_is_the_one_computed():
    from pathlib import Path

    from clear.families.wan import flops_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text()
    assert flops_table() in docs


def test_gradient_checkpointing_gives_the_same_gradients():
    """Blocks re-run in the backward see the forward's own grid and plans."""
    model = tiny_wan()
    clear.apply_clear(model, radius=2, temporal_radius=1.5, backend="tiled")
    inputs = wan_inputs(3, 4, 6)
    grad_out = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    plain = run(model, inputs, grad_out)
    model.enable_gradient_checkpointing()
    assert_same(run(model, inputs, grad_out), plain, atol=1e-6)
