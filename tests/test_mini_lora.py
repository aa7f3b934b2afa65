"""Plug-and-play on the mini teacher (``python scripts/mini.py lora``): the outline style of the scenes and its
score, the LoRA (trained with the teacher's flow matching, resumable, saved so that ``pipe.load_lora_weights``
loads it), and the whole command on a tiny random mini pipeline with CLEAR weights made on the spot."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clear
from clear.mini import lora
from clear.mini import scenes as S
from clear.mini import teacher as T
from scripts_loader import load_script


@pytest.fixture(scope="module")
def cli():
    return load_script("mini")


# ------------------------------------------------------------------------------------------
# The outline style and its score
# ------------------------------------------------------------------------------------------

def test_outline_style_draws_the_outline_and_keeps_the_flat_render():
    s = S.Scene("yellow", (S.Shape("circle", "red", 0.27, 0.5, S.SIZE_TWO),
                           S.Shape("square", "blue", 0.73, 0.5, S.SIZE_TWO)), "relation", relation="left of")
    flat, outline = np.asarray(S.render(s)), np.asarray(S.render(s, style="outline"))
    assert np.array_equal(np.asarray(S.render(s, 64, "flat")), flat)  # the default is the flat style
    # the centres are background, the outlines keep the colours, everything away from the shapes is unchanged
    assert tuple(outline[32, int(0.27 * 64)]) == S.COLORS["yellow"] == tuple(outline[32, int(0.73 * 64)])
    assert tuple(outline[32, int((0.27 - S.SIZE_TWO / 2) * 64) + 2]) == S.COLORS["red"]
    assert tuple(outline[32, int((0.73 + S.SIZE_TWO / 2) * 64) - 2]) == S.COLORS["blue"]
    assert np.array_equal(outline[:12], flat[:12]) and not np.array_equal(outline, flat)
    with pytest.raises(ValueError, match="flat, outline"):
        S.render(s, style="dotted")


def test_fill_holes_fills_what_is_enclosed_only():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert S._fill_holes(ring).sum() == 25 and S._fill_holes(ring)[4, 4]
    open_ring = ring.copy()
    open_ring[4, 6] = False  # a gap to the outside: nothing is enclosed
    assert np.array_equal(S._fill_holes(open_ring), open_ring)


def test_outline_score_and_its_controls():
    """Scored in the outline style, outline images get the kinds right and the controls keep their bars; scored
    as flat images they do not; filled shapes (nothing enclosed) score the same in both styles."""
    held = S.held_out_scenes(41, seed=3)
    scenes, nxt = held[:40], held[1:]
    outline = [S.render(sc, 64, "outline") for sc in scenes]
    own = S.score_images(outline, scenes, style="outline")
    assert own["kind_accuracy"] >= 0.95 and own["placement"] > 0.9 and own["background"] == 1.0
    assert S.score_images(outline, scenes)["kind_accuracy"] < 0.8  # the flat score reads an outline as a blob
    flat = [S.render(sc, 64) for sc in scenes]
    assert S.score_images(flat, scenes, style="outline")["per_image"] == S.score_images(flat, scenes)["per_image"]
    wrong = S.score_images([S.render(S.wrong_kind(sc), 64, "outline") for sc in scenes], scenes, style="outline")
    assert wrong["kind_accuracy"] <= 0.05 and wrong["placement"] > 0.9
    assert S.score_images([S.flood(sc) for sc in scenes], scenes, style="outline")["kind_accuracy"] <= 0.15
    other = S.score_images([S.render(sc, 64, "outline") for sc in nxt], scenes, style="outline")
    assert other["kind_accuracy"] <= 0.15
    assert S.score(outline[0], scenes[0], "outline") == S.score_parts(outline[0], scenes[0], "outline")["kind_accuracy"]


# ------------------------------------------------------------------------------------------
# The LoRA, on a tiny random mini pipeline
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    """An untrained mini pipeline (T.build_pipeline with one block of each kind), saved."""
    pipe = T.build_pipeline(seed=0, transformer_config=dict(num_layers=1, num_single_layers=1))
    pipe.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    out = tmp_path_factory.mktemp("mini") / "teacher"
    pipe.save_pretrained(out)
    return str(out)


def _settings(mini_dir, out, **kw):
    base = dict(model=mini_dir, out=out, clear_weights=Path(out) / "none.safetensors", train_scenes=8, steps=3,
                batch_size=2, lr=1e-2, warmup=1, rank=4, alpha=8.0)
    return lora.make_settings(**{**base, **kw})


def _inputs(transformer):
    from clear.families import FAMILIES

    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    return FAMILIES["flux"].transformer_inputs(
        torch.randn(2, 4, 32, 32, generator=g), torch.tensor([300.0, 800.0]),
        torch.randn(2, T.MAX_SEQUENCE_LENGTH, cfg.joint_attention_dim, generator=g),
        torch.randn(2, cfg.pooled_projection_dim, generator=g), T.GUIDANCE)


@torch.no_grad()
def test_lora_saves_loads_with_load_lora_weights_and_changes_the_output(mini_dir, tmp_path):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    s = _settings(mini_dir, tmp_path / "lora")
    with torch.enable_grad():
        info = lora.make_lora(s)
    path = s.weights_dir / lora.LORA_FILE
    assert path.is_file() and info["trainable_params"] > 0
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    for target in ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "ff.net.2", "proj_mlp"):  # attention and MLP
        assert any(f".{target}.lora_A" in k for k in keys), target

    base = FluxPipeline.from_pretrained(mini_dir)
    inputs = _inputs(base.transformer)
    before = base.transformer(**inputs)[0]
    base.load_lora_weights(s.weights_dir)
    after = base.transformer(**inputs)[0]
    assert (after - before).abs().max() > 1e-4  # the LoRA changes the output

    # ... into exactly what the trained model computed (alpha / rank = 2 read back from the file's metadata)
    trained = FluxPipeline.from_pretrained(mini_dir).transformer
    trained.add_adapter(lora.lora_config(s))
    state = torch.load(s.work / "lora_state.pt", weights_only=True)
    assert state["step"] == s.steps
    params = dict(trained.named_parameters())
    for name, value in state["lora"].items():
        params[name].copy_(value)
    torch.testing.assert_close(after, trained(**inputs)[0], rtol=1e-5, atol=1e-6)

    # a finished LoRA of the same settings is reused, not trained again
    stamp = path.stat().st_mtime_ns
    assert lora.make_lora(s)["file"] == str(path) and path.stat().st_mtime_ns == stamp


def test_lora_training_resumes_exactly(mini_dir, tmp_path):
    """Interrupted after a checkpoint and started again, the LoRA ends with the weights of an uninterrupted run."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(mini_dir)
    data = T.encode_dataset(pipe, 4, seed=0, batch_size=4, style="outline")
    init = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def run(out, crash_at=None):
        p = FluxPipeline.from_pretrained(mini_dir)
        p.transformer.load_state_dict(init)

        def crash(step):
            if step == crash_at:
                raise KeyboardInterrupt

        lora.train_lora(p, data, _settings(mini_dir, out, steps=4), checkpoint_every_s=0.0, on_checkpoint=crash)
        return {k: v.clone() for k, v in p.transformer.named_parameters() if ".lora_" in k}

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=2)
    resumed = run(tmp_path / "b")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="other settings.*another --out"):  # a state of another LoRA is not resumed
        lora.train_lora(FluxPipeline.from_pretrained(mini_dir), data, _settings(mini_dir, tmp_path / "a", rank=2))
    assert [json.loads(line)["step"] for line in open(tmp_path / "a" / "work" / "lora_log.jsonl")] == [0, 3]


# ------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------

def test_settings_and_options(cli):
    assert cli.parse_lora_args([]) == lora.LoraSettings()
    assert lora.LoraSettings().clear_weights == Path("outputs/mini/work/distill/distilled/clear_local_4.safetensors")
    quick = cli.parse_lora_args(["--quick", "--steps", "7", "--mlp", "false", "--out", "x"])
    assert quick == lora.LoraSettings(**dict(lora.QUICK, quick=True, steps=7, mlp=False, out=Path("x")))
    assert quick.targets() == lora.ATTENTION_TARGETS and quick.work == Path("x/work")
    with pytest.raises(ValueError, match="new style"):
        lora.LoraSettings(style="flat")
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora.LoraSettings(attention=False, mlp=False)


def test_missing_or_mismatched_clear_weights_stop_with_the_fix(cli, mini_dir, tmp_path):
    out = tmp_path / "lora"
    with pytest.raises(SystemExit) as e:
        cli.main(["lora", "--model", mini_dir, "--out", str(out), "--clear_weights", str(tmp_path / "no.safetensors")])
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"no CLEAR weights at {tmp_path / 'no.safetensors'}")
    assert f"`python scripts/mini.py --model {mini_dir}`" in text and "--clear_weights FILE" in text
    assert not out.exists()  # checked before anything runs
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(mini_dir, subfolder="transformer")
    clear.apply_clear(base, radius=3)
    other = clear.save_clear_weights(base, tmp_path / "clear_local_3.safetensors")
    with pytest.raises(SystemExit, match=r"for r=3, df=1; this run applies r=4 .*pass --radius"):
        cli.main(["lora", "--model", mini_dir, "--out", str(out), "--clear_weights", other])
    assert not out.exists()


def test_quick_command_end_to_end(cli, mini_dir, tmp_path):
    """The whole command in a reduced setting, with CLEAR weights saved from an apply_clear'd copy of the base
    transformer (its own projections): applied unchanged under the LoRA they must give exactly zero-shot CLEAR,
    so the distilled and zero-shot rows agree to the bit and the bar (strictly closer) is not met."""
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(mini_dir, subfolder="transformer")
    clear.apply_clear(base, radius=4)
    weights = clear.save_clear_weights(base, tmp_path / "clear_local_4.safetensors")
    out = tmp_path / "lora"
    argv = ["lora", "--quick", "--model", mini_dir, "--out", str(out), "--clear_weights", weights, "--train_scenes",
            "8", "--steps", "2", "--batch_size", "2", "--eval_prompts", "2", "--sample_steps", "2", "--sigmas", "2",
            "--grid_prompts", "2"]
    metrics = cli.main(argv)
    for name in ("report.md", "metrics.json", "grid.png", f"weights/{lora.LORA_FILE}"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["command"] == "python scripts/mini.py " + " ".join(argv)
    rows = on_disk["rows"]
    assert list(rows) == list(lora.ROWS)
    assert rows["distilled"]["velocity_mse"] == rows["zero_shot"]["velocity_mse"] > 0
    assert rows["distilled"]["psnr"] == rows["zero_shot"]["psnr"]
    assert rows["distilled"]["kind_accuracy"] == rows["zero_shot"]["kind_accuracy"]
    assert rows["base_teacher"]["velocity_mse"] > 0  # the LoRA changed the teacher
    assert rows["zero_shot"]["velocity_vs_zero_shot"] == 1.0 and "velocity_mse" not in rows["lora_teacher"]
    assert not on_disk["bars"]["velocity"]["pass"] and not on_disk["bars"]["psnr"]["pass"]
    assert on_disk["clear_weights"]["path"] == weights and metrics["rows"] == rows
    text = (out / "report.md").read_text()
    assert on_disk["date"] in text and on_disk["command"] in text
    assert "| variant | velocity MSE to the LoRA teacher ↓ (÷ zero-shot) | PSNR to the LoRA teacher ↑ |" in text
    for row in lora.ROWS:
        assert f"| {rows[row]['label']} |" in text
    assert f"| CLEAR r=4 zero-shot + LoRA | {lora._mse(rows['zero_shot']['velocity_mse'])} (1.00) |" in text
    assert "FAIL: velocity error to the LoRA teacher: base-distilled below zero-shot" in text


def test_clear_weights_go_under_the_lora_unchanged(mini_dir, tmp_path):
    """load_variants: the base-distilled file's tensors become the attention projections of the CLEAR copy, under
    the LoRA loaded by pipe.load_lora_weights (its weights kept); the LoRA teacher itself is left untouched."""
    from safetensors.torch import load_file, save_file

    s = _settings(mini_dir, tmp_path / "lora", steps=2)
    lora.make_lora(s)
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(mini_dir, subfolder="transformer")
    clear.apply_clear(base, radius=4)
    path = clear.save_clear_weights(base, tmp_path / "clear_local_4.safetensors")
    g = torch.Generator().manual_seed(3)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt", "clear.radius": "4", "clear.down_factor": "1",
                                       "clear.family": "flux", "clear.model": "FluxTransformer2DModel"})
    _, models = lora.load_variants(dataclasses.replace(s, clear_weights=Path(path)))
    teacher, distilled, zero = models["lora_teacher"], models["distilled"], models["zero_shot"]
    key = "transformer_blocks.0.attn.to_q"
    got = distilled.get_submodule(key)
    assert torch.equal(got.base_layer.weight, tensors[key + ".weight"])
    assert torch.equal(zero.get_submodule(key).base_layer.weight, teacher.get_submodule(key).base_layer.weight)
    assert not torch.equal(teacher.get_submodule(key).base_layer.weight, tensors[key + ".weight"])
    lora_a = [n for n, _ in teacher.named_parameters() if n.startswith(key + ".lora_A")]
    assert lora_a and all(torch.equal(distilled.get_parameter(n), teacher.get_parameter(n)) for n in lora_a)
    assert getattr(teacher, "clear_state", None) is None  # CLEAR went on the copies only
    assert getattr(models["base_teacher"], "peft_config", None) is None  # the control has no LoRA
