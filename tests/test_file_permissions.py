"""Every file the project writes has the permissions a plain ``open(path, "w")`` gives under
the current umask (``0o666 & ~umask``): weights, PNGs, JSON and markdown reports, generation
manifests, tar shards and their staging files, feature caches, checkpoint manifests and
settings, benchmark outputs. Writing through a temporary file (``mkstemp``) must not leave
them ``0o600``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts_loader import load_script

import clear
from clear import checkpointing, files
from clear.data import write_feature_cache
from clear.evaluation import EvalConfig, ModelImages, evaluate, write_report
from clear.image_sets import Item, generate_dataset, generate_images
from clear.inference import save_png
from clear.shards import Sample


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_plain_modes(paths, umask):
    paths = [Path(p) for p in paths]
    assert paths, "nothing was written"
    want = 0o666 & ~umask
    wrong = {str(p): oct(mode(p)) for p in paths if mode(p) != want}
    assert not wrong, f"expected {oct(want)} under umask {oct(umask)}: {wrong}"


class NoisePipeline:
    """Stands in for a diffusers pipeline: each image is noise from its own generator; raises
    once ``fail_after`` images have been made (a killed run)."""

    def __init__(self, size=8, fail_after=None):
        self.size, self.fail_after, self.made = size, fail_after, []

    def __call__(self, prompt, generator, **kwargs):
        if self.fail_after is not None and len(self.made) + len(prompt) > self.fail_after:
            raise RuntimeError("killed")
        images = []
        for p, g in zip(prompt, generator):
            arr = (torch.rand(self.size, self.size, 3, generator=g) * 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(arr))
            self.made.append(p)
        return type("Out", (), {"images": images})()


def test_plain_write_reference(tmp_path, umask):
    """The reference itself: what open(..., "w") gives a new file here."""
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert mode(tmp_path / "plain.txt") == 0o666 & ~umask == files.new_file_mode()


def test_file_helpers(tmp_path, umask):
    written = [files.write_bytes(tmp_path / "a.bin", b"x"), files.write_text(tmp_path / "a.txt", "x"),
               files.write_json(tmp_path / "a.json", {"a": 1}),
               files.save_safetensors({"t": torch.zeros(3, 2)[1]}, tmp_path / "a.safetensors"),
               files.save_image(Image.new("RGB", (4, 4)), tmp_path / "a.png"),
               files.write_tar(tmp_path / "a.tar", [("k", {"json": b"{}"})])]
    assert_plain_modes(written, umask)
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_keeps_the_existing_mode(tmp_path, umask):
    """As a plain open(path, "w") of an existing file does: its permission bits stay."""
    path = tmp_path / "kept.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    files.write_json(path, {"new": True})
    assert mode(path) == 0o640 and json.loads(path.read_text()) == {"new": True}


def test_failed_write_leaves_nothing(tmp_path, umask):
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_path(tmp_path / "x.bin") as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_clear_weights_and_png(tmp_path, umask, flux):
    clear.apply_clear(flux, radius=2)
    weights = clear.save_clear_weights(flux, tmp_path / "released" / "clear_local_2.safetensors")
    png = save_png(Image.new("RGB", (8, 8)), tmp_path / "out" / "image.png", {"seed": 0})
    assert_plain_modes([weights, png], umask)


def test_report(tmp_path, umask):
    rng = np.random.default_rng(0)
    for name in ("orig", "copy"):
        (tmp_path / name).mkdir()
        for stem in ("a", "b"):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name / f"{stem}.png")
    res = evaluate(ModelImages("orig", tmp_path / "orig"), [ModelImages("copy", tmp_path / "copy")],
                   config=EvalConfig(metrics=("psnr",), device="cpu"), progress=False)
    assert_plain_modes(write_report(res, tmp_path / "report"), umask)


def test_eval_set_and_manifest(tmp_path, umask):
    prompts = [type("P", (), {"key": f"{i:05d}", "text": f"prompt {i}"})() for i in range(3)]
    counts = generate_images(NoisePipeline(), prompts, tmp_path / "eval", {"model": "noise"}, height=8, width=8,
                             num_inference_steps=1, guidance_scale=1.0, progress=False)
    assert counts == {"generated": 3, "skipped": 0, "total": 3}
    assert_plain_modes(sorted((tmp_path / "eval").iterdir()), umask)  # 3 PNGs and generation.json


def test_training_set_shards_and_staging(tmp_path, umask):
    items = [Item(f"{i:08d}", f"prompt {i}", i) for i in range(5)]
    out = tmp_path / "data"
    kwargs = dict(settings={"model": "noise"}, call={}, samples_per_shard=2, batch_size=1, progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        generate_dataset(lambda: NoisePipeline(fail_after=3), items, out, **kwargs)
    staged = sorted((out / ".staging").rglob("*.*"))
    assert [p.name for p in staged] == ["00000002.jpg", "00000002.json"]  # shard 1 half done
    assert_plain_modes([*staged, out / ".generation.json", out / "shard-00000.tar"], umask)
    generate_dataset(lambda: NoisePipeline(), items, out, **kwargs)
    assert_plain_modes(sorted(out.glob("shard-*.tar")), umask)


def test_feature_cache(tmp_path, umask):
    samples = [Sample(f"shard-00000/{i}", {}) for i in range(3)]
    report = write_feature_cache(samples, "prompt_embeds", tmp_path / "cache", read=lambda s: s.id,
                                 encode=lambda xs: {"e": torch.ones(len(xs), 4)}, progress=False)
    assert report.written == 3
    assert_plain_modes(sorted((tmp_path / "cache").rglob("*.safetensors")), umask)


def test_checkpoint_manifest_and_settings(tmp_path, umask):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights")
    checkpointing.save_settings(folder, {"radius": 2})
    checkpointing.write_manifest(folder)
    assert_plain_modes([folder / checkpointing.SETTINGS, folder / checkpointing.MANIFEST], umask)
    assert checkpointing.checkpoint_problem(folder) is None


def test_benchmark_outputs(tmp_path, umask):
    load_script("benchmark").main(["flops", "--sizes", "1024", "--radii", "8", "--down-factors", "1",
                                   "--out", str(tmp_path / "flops")])
    assert_plain_modes([tmp_path / "flops.json", tmp_path / "flops.md", tmp_path / "flops.png"], umask)
