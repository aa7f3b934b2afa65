"""CLEAR under torch.compile on CPU: whole-model ``torch.compile(model, fullgraph=True)`` and
diffusers' regional ``model.compile_repeated_blocks(fullgraph=True)``, on tiny FLUX, FLUX
ControlNet and SD3(.5) with CLEAR (dense and flex backends, with and without pooled tokens).

Compiled outputs equal eager ones; dynamo reports no graph break; a new resolution costs one
compile per compiled graph and a resolution seen before costs none (frame counters)."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import clear
from clear import backends
from clear.apply import plan_forward
from clear.geometry import TokenLayout
from tiny_models import flux_inputs, sd3_inputs, tiny_flux, tiny_flux_controlnet, tiny_sd3

# Two grids with the same number of tokens: only the grid guard tells them apart.
GRID_A, GRID_B = (4, 6), (6, 4)


def family_model(family: str):
    if family == "flux":
        return tiny_flux()
    if family == "controlnet":
        return tiny_flux_controlnet()
    return tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5-Medium-like: joint + image-only attention


def family_inputs(family: str, grid, seed: int = 0) -> dict:
    h, w = grid
    if family == "sd3":
        return sd3_inputs(2 * h, 2 * w, batch=1, seed=seed)  # latent pixels, patch size 2
    x = flux_inputs(h, w, batch=1, seed=seed)
    if family == "controlnet":
        x["controlnet_cond"] = torch.randn(1, h * w, 16, generator=torch.Generator().manual_seed(seed + 1))
    return x


def outputs(out) -> list[torch.Tensor]:
    if hasattr(out, "controlnet_block_samples"):
        return list(out.controlnet_block_samples) + list(out.controlnet_single_block_samples)
    return [out.sample]


def run(model, x) -> list[torch.Tensor]:
    with torch.no_grad():
        return outputs(model(**x))


def compile_model(model, path: str, backend):
    if path == "full":
        return torch.compile(model, fullgraph=True, backend=backend)
    if path == "inplace":
        model.compile(fullgraph=True, backend=backend)
    else:
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    return model


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# Every family, backend, compile path and down factor appears; the full product would take
# several minutes on two cores. Dynamo and AOT autograd trace exactly as for inductor (the
# backend only generates code from the captured graph); one test below runs inductor itself.
MATRIX = [
    ("flux", "dense", "full", 1), ("flux", "flex", "full", 2), ("flux", "flex", "regional", 1),
    ("flux", "dense", "regional", 2),
    ("controlnet", "flex", "full", 1), ("controlnet", "dense", "regional", 1), ("controlnet", "dense", "full", 2),
    ("controlnet", "flex", "regional", 2),
    ("sd3", "dense", "full", 1), ("sd3", "flex", "full", 2), ("sd3", "flex", "regional", 1),
    ("sd3", "dense", "regional", 2),
    ("flux", "flex", "inplace", 2),  # model.compile(): hooks run outside the compiled frame as well
    ("flux", "tiled", "full", 2), ("controlnet", "tiled", "regional", 1), ("sd3", "tiled", "full", 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,backend,path,df", MATRIX)
def test_compiled_equals_eager_and_compiles_once_per_resolution(family, backend, path, df):
    """fullgraph: A, B (same token count, other aspect), A again."""
    model = family_model(family)
    clear.apply_clear(model, radius=2, down_factor=df, backend=backend)
    xs = [family_inputs(family, g, seed=i) for i, g in enumerate((GRID_A, GRID_B, GRID_A))]
    refs = [run(model, x) for x in xs]
    a, b = refs[0][-1], refs[1][-1]
    assert a.shape != b.shape or not torch.allclose(a, b)  # the two grids really differ
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = compile_model(model, path, cnt)
    frames = []
    for x, ref in zip(xs, refs):
        assert_same(run(compiled, x), ref)
        frames.append(cnt.frame_count)
    first, after_b, after_a = frames
    if path in ("full", "inplace"):
        assert (first, after_b, after_a) == (1, 2, 2)
    else:  # one graph per kind of block (FLUX single blocks get a second one for an input stride)
        assert 0 < after_b - first <= first and after_a == after_b
    assert not counters["graph_break"]


@pytest.mark.slow
def test_inductor_compiles_flex_inside_the_compiled_model():
    """The real CPU compiler: whole-model inductor with flex attention and pooled tokens (FlexAttention
    lowered inside the model's graph, not through CLEAR's own compiled kernel wrapper)."""
    model = family_model("flux")
    clear.apply_clear(model, radius=2, down_factor=2, backend="flex")
    x = family_inputs("flux", GRID_A)
    ref = run(model, x)
    cnt = CompileCounterWithBackend("inductor")
    assert_same(run(compile_model(model, "full", cnt), x), ref)
    assert cnt.frame_count == 1 and not counters["graph_break"]


@pytest.mark.parametrize("family,backend,df", [("flux", "dense", 1), ("flux", "flex", 2), ("controlnet", "dense", 2),
                                               ("controlnet", "flex", 1), ("sd3", "dense", 1), ("sd3", "flex", 2),
                                               ("flux", "tiled", 2), ("sd3", "tiled", 1)])
def test_explain_reports_one_graph_and_no_break(family, backend, df):
    model = family_model(family)
    clear.apply_clear(model, radius=2, down_factor=df, backend=backend)
    x = family_inputs(family, GRID_A)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("family", ["flux", "controlnet", "sd3"])
def test_regional_compilation_finds_repeated_blocks_and_remove_restores(family):
    """FluxControlNetModel and SD3Transformer2DModel declare no repeated blocks in diffusers:
    apply_clear declares them on the instance (so compile_repeated_blocks works) and remove_clear
    takes the declaration away again."""
    model = family_model(family)
    declared = getattr(type(model), "_repeated_blocks", None)
    clear.apply_clear(model, radius=2)
    names = {type(m).__name__ for m in model.modules()}
    assert model._repeated_blocks and set(model._repeated_blocks) <= names
    clear.remove_clear(model)
    assert getattr(model, "_repeated_blocks", None) == declared


def test_plans_are_built_outside_the_traced_code():
    """The traced attention reads the plan the (uncompiled) pre-hook handed over: building a plan
    inside the compiled forward would show up as a plan-cache miss during the compiled calls."""
    model = tiny_flux()
    core = clear.apply_clear(model, radius=2, backend="flex")
    built = []
    plan = core.plan
    core.plan = lambda *a, **k: built.append(a[0]) or plan(*a, **k)
    cnt = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=cnt)
    for grid in (GRID_A, GRID_B, GRID_A):
        run(compiled, family_inputs("flux", grid))
    # one lookup per forward, all from the hook (never per layer), and the graphs compiled = resolutions
    assert [(lay.height, lay.width) for lay in built] == [GRID_A, GRID_B, GRID_A]
    assert cnt.frame_count == 2
    assert not hasattr(model.clear_state, "grid")  # nothing of a forward stays on the model


def test_processor_before_any_forward_fails_loudly():
    model = tiny_flux()
    clear.apply_clear(model, radius=2)
    attn = model.transformer_blocks[0].attn
    with pytest.raises(RuntimeError, match="outside a forward of its model"):
        attn(torch.randn(1, 24, 32), encoder_hidden_states=torch.randn(1, 7, 32))


def test_auto_decides_from_the_models_own_call_shape(monkeypatch):
    """apply_clear reads the model's heads and head size; the hook's plans run what clear.backends.decide says for
    that call (shipped measurements replaced by two records that differ only in head size)."""
    seconds = {24: {"dense": 0.2, "flex": None, "tiled": 0.1}, 16: {"dense": 0.1, "flex": None, "tiled": 0.2}}
    recs = tuple(dict(image=24, text=7, radius=2.0, down_factor=1, heads=2, head_dim=d, with_grad=False, seconds=t)
                 for d, t in seconds.items())
    monkeypatch.setattr(backends, "measurements", lambda device: recs if device == "cpu" else ())
    model = family_model("flux")  # 2 heads x 16
    core = clear.apply_clear(model, radius=2, backend="auto")
    assert (core.heads, core.head_dim) == (2, 16)
    with torch.no_grad():  # inference: the records have no backward
        assert {p.backend for p in plan_forward(model, **family_inputs("flux", GRID_A)).plans.values()} == {"dense"}
        core.head_dim = 24
        assert {p.backend for p in plan_forward(model, **family_inputs("flux", GRID_B)).plans.values()} == {"tiled"}
    assert clear.ClearAttention(None, backend="auto").plan(TokenLayout(16, 4, 6), "cpu").backend == "dense"
