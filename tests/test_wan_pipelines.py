"""Wan pipelines end to end with CLEAR, offline on tiny random models saved with save_pretrained and loaded back:
text-to-video, image-to-video, Wan 2.2's two experts with a checkpoint each, through the library and through
scripts/generate.py (clip and settings written), and what the command line refuses before anything loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clear
from clear.apply import plan_forward
from clear.inference import video
from tiny_models import tiny_flux_pipeline, tiny_wan_pipeline

CALL = dict(prompt="a small cat", num_frames=9, height=32, width=48, steps=2, guidance=1.0, max_sequence_length=16)
CLI = ["--prompt", "a small cat", "--num_frames", "9", "--height", "32", "--width", "48", "--steps", "2",
       "--guidance", "1", "--max_sequence_length", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    tiny_wan_pipeline().save_pretrained(root / "t2v")
    tiny_wan_pipeline(two_experts=True).save_pretrained(root / "a14b")
    tiny_wan_pipeline(image_to_video=True).save_pretrained(root / "i2v")
    Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)).save(root / "first.png")
    return root


def load(path):
    pipe = video.load_video_pipeline(str(path), "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturbed_checkpoint(pipe, name, path, rt, seed):
    model = getattr(pipe, name)
    clear.apply_clear(model, radius=1.5, temporal_radius=rt, backend="dense")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = clear.save_clear_weights(model, path)
    clear.remove_clear(model)
    return out


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_window_beyond_the_clip_is_the_original_and_a_local_one_is_not(saved, kind):
    pipe = load(saved / kind)
    assert type(pipe).__name__ == ("WanPipeline" if kind == "t2v" else "WanImageToVideoPipeline")
    image = Image.open(saved / "first.png") if kind == "i2v" else None
    ref = video.generate_video(pipe, **CALL, image=image)
    assert ref.frames.shape == (9, 32, 48, 3) and ref.settings["attention"] == "original"
    video.apply_to_video_pipeline(pipe, video.VideoClear(100, 100, backend="dense"))
    same = video.generate_video(pipe, **CALL, image=image)
    np.testing.assert_array_equal(same.frames, ref.frames)  # every key seen: the stock computation
    video.apply_to_video_pipeline(pipe, video.VideoClear(1.5, 0.5, backend="tiled"))
    grids = []  # each transformer forward's grid, as its processors get it
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: grids.append(plan_forward(m, *a, **k).grid), with_kwargs=True)
    local = video.generate_video(pipe, **CALL, image=image)
    hook.remove()
    assert np.isfinite(local.frames).all() and np.abs(local.frames - ref.frames).max() > 1e-4
    assert local.settings["attention"] == "CLEAR r=1.5 rt=0.5"
    assert grids and set(grids) == {(3, 2, 3)}  # 9 frames -> 3 latent frames, 32x48 px -> 2x3 tokens


def test_two_experts_each_load_their_own_checkpoint(saved, tmp_path):
    pipe = load(saved / "a14b")
    assert video.experts(pipe) == ["transformer", "transformer_2"]
    high = perturbed_checkpoint(pipe, "transformer", tmp_path / "high.safetensors", 1, seed=1)
    low = perturbed_checkpoint(pipe, "transformer_2", tmp_path / "low.safetensors", 1, seed=2)
    with pytest.raises(ValueError, match="2 transformer.*but 1 CLEAR checkpoint"):
        video.apply_to_video_pipeline(pipe, video.VideoClear(1.5, 1, checkpoints=(high,)))
    with pytest.raises(ValueError, match="is for temporal_radius=1, but the chosen window has temporal_radius=2"):
        video.apply_to_video_pipeline(pipe, video.VideoClear(1.5, 2, checkpoints=(high, low)))
    video.apply_to_video_pipeline(pipe, video.VideoClear(1.5, 1, checkpoints=(high, low), backend="dense"))
    for name, path in (("transformer", high), ("transformer_2", low)):
        from safetensors.torch import load_file

        file = load_file(path)
        params = clear.clear_state_dict_keys(getattr(pipe, name))
        assert set(params) == set(file) and all(torch.equal(params[k], file[k]) for k in file)
    # the experts' weights really differ, and both run: the clip depends on both
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)
    assert np.isfinite(video.generate_video(pipe, **CALL).frames).all()


def test_cli_text_to_video_gif_and_png_frames(saved, tmp_path, generate_cli):
    out = tmp_path / "clip.gif"
    written = generate_cli.main(["--model", str(saved / "t2v"), *CLI, "--radius", "1.5", "--temporal_radius", "1",
                                 "--checkpoint", "none", "--out", str(out), "--compare"])
    assert written == {"original": str(tmp_path / "clip_original.gif"), "video": str(out)}
    gif = Image.open(out)
    assert gif.n_frames == 9 and gif.size == (48, 32)
    settings = json.loads((tmp_path / "clip.gif.json").read_text())
    assert settings["temporal_radius"] == 1 and settings["radius"] == 1.5 and settings["num_frames"] == 9
    assert settings["attention"] == "CLEAR r=1.5 rt=1" and settings["checkpoints"] == "none"
    written = generate_cli.main(["--model", str(saved / "t2v"), *CLI, "--radius", "2", "--checkpoint", "none",
                                 "--out", str(tmp_path / "frames.png")])
    frames = sorted(tmp_path.glob("frames_*.png"))
    assert len(frames) == 9 and written["video"] == str(frames[0])
    assert json.loads(Image.open(frames[3]).text["clear:settings"])["frame"] == 3


def test_cli_image_to_video_and_two_expert_checkpoints(saved, tmp_path, generate_cli):
    out = tmp_path / "i2v.gif"
    generate_cli.main(["--model", str(saved / "i2v"), *CLI, "--image", str(saved / "first.png"), "--radius", "1.5",
                       "--temporal_radius", "1", "--checkpoint", "none", "--out", str(out)])
    assert Image.open(out).n_frames == 9
    assert json.loads((tmp_path / "i2v.gif.json").read_text())["image_to_video"] is True
    pipe = load(saved / "a14b")
    high = perturbed_checkpoint(pipe, "transformer", tmp_path / "high.safetensors", 1, seed=1)
    low = perturbed_checkpoint(pipe, "transformer_2", tmp_path / "low.safetensors", 1, seed=2)
    generate_cli.main(["--model", str(saved / "a14b"), *CLI, "--radius", "1.5", "--temporal_radius", "1",
                       "--checkpoint", f"{high},{low}", "--out", str(tmp_path / "a14b.gif")])
    assert json.loads((tmp_path / "a14b.gif.json").read_text())["checkpoints"] == [high, low]


def test_cli_refusals_before_anything_loads(saved, tmp_path, generate_cli, monkeypatch):
    from scripts_loader import cli_error

    monkeypatch.setattr(video, "load_video_pipeline", lambda *a, **k: pytest.fail("loaded a pipeline"))
    flux_dir = tmp_path / "flux"
    tiny_flux_pipeline().save_pretrained(flux_dir)
    base = ["--model", str(saved / "t2v"), *CLI, "--checkpoint", "none", "--out", str(tmp_path / "x.gif")]

    def error(*extra, model=None):
        argv = base + list(extra)
        if model is not None:
            argv[1] = model
        return cli_error(generate_cli, argv, monkeypatch)

    assert "are for video models" in error("--temporal_radius", "2", model=str(flux_dir))
    assert "4k + 1 frames" in error("--num_frames", "8")
    assert "not a multiple of 16 pixels" in error("--height", "40")
    assert "temporal_radius must be a positive" in error("--temporal_radius", "0")
    assert "pass --image" in error(model=str(saved / "i2v"))
    assert "takes no --image" in error("--image", str(saved / "first.png"))
    assert "no released CLEAR weights for Wan" in error("--checkpoint", "released")
    assert "--parallel patch is not built" in error("--parallel", "patch")
    if not video.mp4_encoder():
        assert "no MP4 encoder is installed (pip install imageio imageio-ffmpeg)" in error(
            "--out", str(tmp_path / "x.mp4"))
