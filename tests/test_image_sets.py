"""clear.image_sets: the one resumable, sharded, manifest-checked generation loop, for evaluation
folders (generate_images) and the training set (generate_dataset); and scripts/generate_eval_set.py
on an SD3 pipeline, through clear.inference's loading and pre-flight checks."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script

import clear
from clear.evaluation import MANIFEST, Prompt
from clear.image_sets import (DATA_MANIFEST, Item, generate_dataset, generate_images, read_training_prompts, run,
                              settings_diff, share)

PROMPTS = [Prompt(f"{i:05d}", f"prompt number {i}") for i in range(7)]
EVAL = dict(height=8, width=8, num_inference_steps=1, guidance_scale=1.0, progress=False)


class NoisePipeline:
    """A pipeline whose image is noise drawn from its own generator (checked to be a CPU generator);
    it raises once ``fail_after`` images have been made, as a killed run would stop."""

    def __init__(self, fail_after=None):
        self.fail_after, self.made, self.batches = fail_after, [], []

    def __call__(self, prompt, generator, **kwargs):
        assert len(prompt) == len(generator) and all(g.device.type == "cpu" for g in generator)
        if self.fail_after is not None and len(self.made) + len(prompt) > self.fail_after:
            raise RuntimeError("killed")
        self.batches.append(len(prompt))
        images = []
        for p, g in zip(prompt, generator):
            arr = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(arr))
            self.made.append(p)
        return type("Out", (), {"images": images})()


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def tar_members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------

def test_share_is_disjoint_and_complete():
    units = list(range(11))
    parts = [share(units, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(parts, [])) == units
    for bad in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="need 0 <= rank < world"):
            share(units, *bad)


def test_run_seeds_each_image_with_its_own_cpu_generator():
    items = [Item(f"k{i}", f"p{i}", seed=100 + i) for i in range(5)]
    got = {}
    pipe = NoisePipeline()
    assert run(pipe, items, lambda it, im: got.setdefault(it.key, np.asarray(im)), {}, batch_size=2,
               progress=False) == 5
    assert pipe.batches == [2, 2, 1]
    for it in items:  # the image is a function of the item's seed alone
        want = (torch.rand(8, 8, 3, generator=torch.Generator("cpu").manual_seed(it.seed)) * 255).to(torch.uint8)
        np.testing.assert_array_equal(got[it.key], want.numpy())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run(pipe, items, lambda it, im: None, {}, batch_size=0, progress=False)


def test_settings_diff_names_every_change():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: was 2, now 3", "c: was '(not set)', now 4"]
    assert settings_diff({"a": [1, 2]}, {"a": [1, 2]}) == []


# ------------------------------------------------------------------------------------------
# evaluation folders
# ------------------------------------------------------------------------------------------

def test_eval_folder_resumes_after_a_kill(tmp_path):
    out = tmp_path / "eval"
    killed = NoisePipeline(fail_after=3)
    with pytest.raises(RuntimeError, match="killed"):
        generate_images(killed, PROMPTS, out, {"model": "noise"}, batch_size=1, **EVAL)
    assert sorted(p.stem for p in out.glob("*.png")) == ["00000", "00001", "00002"]
    assert not list(out.glob(".*.tmp"))
    first = {p.stem: pixels(p) for p in out.glob("*.png")}
    again = NoisePipeline()
    counts = generate_images(again, PROMPTS, out, {"model": "noise"}, batch_size=3, **EVAL)
    assert counts == {"generated": 4, "skipped": 3, "total": 7}
    assert again.made == [p.text for p in PROMPTS[3:]]  # exactly the missing ones
    for stem, arr in first.items():  # untouched
        np.testing.assert_array_equal(pixels(out / f"{stem}.png"), arr)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [it["seed"] for it in manifest["items"]] == list(range(7))
    assert manifest["settings"] == {"model": "noise", "height": 8, "width": 8, "num_inference_steps": 1,
                                    "guidance_scale": 1.0, "max_sequence_length": 512, "base_seed": 0}
    assert generate_images(NoisePipeline(fail_after=0), PROMPTS, out, {"model": "noise"}, **EVAL)["generated"] == 0


def test_eval_folder_refuses_other_settings(tmp_path):
    out = tmp_path / "eval"
    generate_images(NoisePipeline(), PROMPTS[:2], out, {"model": "noise"}, **EVAL)
    with pytest.raises(ValueError, match=r"other settings \(guidance_scale: was 1.0, now 2.0\).*another output folder"):
        generate_images(NoisePipeline(), PROMPTS[:2], out, {"model": "noise"}, **{**EVAL, "guidance_scale": 2.0})
    with pytest.raises(ValueError, match="base_seed: was 0, now 5; model: was 'noise', now 'other'"):
        generate_images(NoisePipeline(), PROMPTS[:2], out, {"model": "other"}, base_seed=5, **EVAL)


def test_eval_folder_shards_over_ranks_and_batch_size_does_not_matter(tmp_path):
    whole = tmp_path / "whole"
    generate_images(NoisePipeline(), PROMPTS, whole, {"model": "noise"}, batch_size=1, **EVAL)
    split = tmp_path / "split"
    made = []
    for rank, batch in ((0, 2), (1, 4), (2, 3)):
        pipe = NoisePipeline()
        counts = generate_images(pipe, PROMPTS, split, {"model": "noise"}, batch_size=batch, shard=(rank, 3), **EVAL)
        assert counts["generated"] == counts["total"] == len(PROMPTS[rank::3])
        made += pipe.made
    assert sorted(made) == sorted(p.text for p in PROMPTS) and len(made) == len(set(made))  # disjoint, complete
    for p in PROMPTS:
        np.testing.assert_array_equal(pixels(split / f"{p.key}.png"), pixels(whole / f"{p.key}.png"))


# ------------------------------------------------------------------------------------------
# the training set
# ------------------------------------------------------------------------------------------

def dataset(out, pipe, items, batch_size=1, rank=0, world=1, settings=None):
    return generate_dataset(lambda: pipe, items, out, settings or {"model": "noise"}, {}, samples_per_shard=3,
                            batch_size=batch_size, meta={"model": "noise"}, rank=rank, world=world, progress=False)


def test_training_set_resumes_after_a_kill_and_refuses_other_settings(tmp_path):
    items = [Item(f"{i:08d}", f"prompt {i}", i) for i in range(8)]  # shards of 3, 3, 2
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="killed"):
        dataset(out, NoisePipeline(fail_after=4), items, batch_size=2)
    assert (out / "shard-00000.tar").is_file() and not (out / "shard-00001.tar").exists()  # packed when complete
    assert sorted(p.name for p in (out / ".staging" / "shard-00001").iterdir()) == ["00000003.jpg", "00000003.json"]
    pipe = NoisePipeline()
    res = dataset(out, pipe, items, batch_size=2)
    assert res["written"] == 4 and res["skipped"] == 4
    assert pipe.made == [f"prompt {i}" for i in range(4, 8)]  # exactly the missing ones
    assert sorted(p.name for p in out.iterdir()) == [DATA_MANIFEST, "shard-00000.tar", "shard-00001.tar",
                                                     "shard-00002.tar"]
    assert json.loads(tar_members(out / "shard-00002.tar")["00000007.json"]) == {
        "key": "00000007", "prompt": "prompt 7", "seed": 7, "model": "noise"}
    with pytest.raises(ValueError, match=r"other settings \(model: was 'noise', now 'other'\)"):
        dataset(out, NoisePipeline(), items, settings={"model": "other"})
    with pytest.raises(ValueError, match="num_samples: was 8, now 7; prompts_digest"):
        dataset(out, NoisePipeline(), items[:7])


def test_training_set_ranks_and_batch_sizes_give_the_same_shards(tmp_path):
    items = [Item(f"{i:08d}", f"prompt {i}", 10 + i) for i in range(8)]
    dataset(tmp_path / "one", NoisePipeline(), items, batch_size=1)
    made = []
    for rank, batch in ((0, 3), (1, 2)):
        pipe = NoisePipeline()
        res = dataset(tmp_path / "two", pipe, items, batch_size=batch, rank=rank, world=2)
        assert [Path(p).name for p in res["shards"]] == (["shard-00000.tar", "shard-00002.tar"] if rank == 0
                                                         else ["shard-00001.tar"])
        made += pipe.made
    assert sorted(made) == sorted(it.prompt for it in items) and len(made) == len(set(made))
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        a, b = tar_members(tmp_path / "one" / name), tar_members(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for member in a:
            if member.endswith(".jpg"):
                np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a[member]))),
                                              np.asarray(Image.open(io.BytesIO(b[member]))))
            else:
                assert a[member] == b[member]


def test_read_training_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a boat", "key": "boat", "seed": 42}\nnot json\n{"prompt": "a car"}\n'
                                      '{"prompt": "x", "key": "a/b"}\n')
    items, bad = read_training_prompts(tmp_path / "p.jsonl", base_seed=5)
    assert items == [Item("boat", "a boat", 42), Item("00000001", "a car", 6)]
    assert len(bad) == 2 and "p.jsonl:2" in bad[0] and "may only hold letters" in bad[1]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_training_prompts(tmp_path / "p.txt")[0] == [Item("00000000", "one", 0), Item("00000001", "two", 1)]
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "key": "k"}\n{"prompt": "b", "key": "k"}\n')
    with pytest.raises(ValueError, match="same key to several prompts: k"):
        read_training_prompts(tmp_path / "d.jsonl")


# ------------------------------------------------------------------------------------------
# scripts/generate_eval_set.py serves SD3 too, through clear.inference
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_pipeline_dir(tmp_path_factory):
    from tiny_models import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3") / "pipe"
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)


def test_sd3_eval_set(sd3_pipeline_dir, tmp_path):
    cli = load_script("generate_eval_set")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog in the city\n")
    common = ["--prompts", str(prompts), "--model", sd3_pipeline_dir, "--height", "16", "--width", "24",
              "--max_sequence_length", "8", "--device", "cpu", "--no_progress"]
    orig = tmp_path / "orig"
    assert cli.main(common + ["--out", str(orig), "--steps", "2", "--batch_size", "2"])["generated"] == 2
    assert Image.open(orig / "00001.png").size == (24, 16)
    settings = json.loads((orig / MANIFEST).read_text())["settings"]
    assert settings["guidance_scale"] == 4.5 and settings["max_sequence_length"] == 8  # SD3.5-Medium's guidance
    assert settings["label"] == "pipe" and settings["dtype"] == "float32"
    local = tmp_path / "local"
    assert cli.main(common + ["--out", str(local), "--steps", "2", "--radius", "2", "--checkpoint", "none"]) == {
        "generated": 2, "skipped": 0, "total": 2}
    assert json.loads((local / MANIFEST).read_text())["settings"]["label"] == "CLEAR r=2"
    assert not np.array_equal(pixels(local / "00000.png"), pixels(orig / "00000.png"))  # CLEAR changed the image


@pytest.mark.slow  # 40 steps, 256 text tokens: the model's own defaults
def test_sd3_eval_set_defaults_come_from_the_model(sd3_pipeline_dir, tmp_path):
    cli = load_script("generate_eval_set")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    cli.main(["--prompts", str(prompts), "--model", sd3_pipeline_dir, "--height", "16", "--width", "16", "--device",
              "cpu", "--no_progress", "--out", str(tmp_path / "d")])
    settings = json.loads((tmp_path / "d" / MANIFEST).read_text())["settings"]
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["max_sequence_length"]) == (40, 4.5, 256)


def test_eval_set_checks_run_before_loading(sd3_pipeline_dir, tiny_flux_pipeline_dir, tmp_path, monkeypatch, flux):
    import clear.inference as inf

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the checks failed")

    monkeypatch.setattr(inf, "load_pipeline", no_loading)
    cli = load_script("generate_eval_set")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    common = ["--prompts", str(prompts), "--out", str(tmp_path / "never"), "--device", "cpu", "--no_progress"]
    with pytest.raises(SystemExit, match="positional embedding table of 32x32 tokens"):  # SD3: pos_embed_max_size
        cli.main(common + ["--model", sd3_pipeline_dir, "--height", "256", "--width", "16"])
    with pytest.raises(SystemExit, match="not a positive multiple of 4 pixels"):
        cli.main(common + ["--model", sd3_pipeline_dir, "--height", "18", "--width", "16"])
    with pytest.raises(SystemExit, match="no released CLEAR weights for sd3"):
        cli.main(common + ["--model", sd3_pipeline_dir, "--height", "16", "--width", "16", "--radius", "2"])
    clear.apply_clear(flux, radius=2)
    flux_weights = clear.save_clear_weights(flux, tmp_path / "flux_r2.safetensors")
    with pytest.raises(SystemExit, match="holds CLEAR weights for a flux model, but the chosen model is a sd3"):
        cli.main(common + ["--model", sd3_pipeline_dir, "--height", "16", "--width", "16", "--radius", "2",
                           "--checkpoint", flux_weights])
    with pytest.raises(SystemExit, match="is a checkpoint for radius=2 but the chosen variant is clear_local_4"):
        cli.main(common + ["--model", tiny_flux_pipeline_dir, "--height", "32", "--width", "32", "--radius", "4",
                           "--checkpoint", flux_weights])
    with pytest.raises(SystemExit, match="CUDA is not available" if not torch.cuda.is_available() else "cuda:99"):
        cli.main(["--prompts", str(prompts), "--out", str(tmp_path / "never"), "--model", tiny_flux_pipeline_dir,
                  "--device", "cuda" if not torch.cuda.is_available() else "cuda:99"])
    assert not (tmp_path / "never").exists()
