"""Evaluation: metrics on identical / perturbed folders with tiny injected networks, the
report's layout, prompts files, and resumable generation with the tiny FluxPipeline."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scripts_loader import load_script
import torch
from PIL import Image
from torch import nn

import clear
from clear.evaluation import (MANIFEST, METRIC_KEYS, EvalConfig, FeatureNets, ModelImages, Prompt, evaluate,
                              load_prompts, markdown_table, write_report)



SIZE = 192  # MS-SSIM needs more than 160 pixels a side
STEMS = [f"{i:05d}" for i in range(6)]
PROMPTS = ["a small blue plane", "a red car on the river", "a cat in the city at night", "a green tree over a house",
           "a dog on a boat", "the sky over a mountain"]


# ------------------------------------------------------------------------------------------
# Tiny networks standing in for InceptionV3, LPIPS, CLIP and DINO
# ------------------------------------------------------------------------------------------


class TinyFeatures(nn.Module):
    """uint8 images -> 4 pooled features of a fixed random conv (FID) or 5 class logits (IS)."""

    def __init__(self, out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, out, 5, stride=2)
        self.num_features = out

    def forward(self, x):
        return 100 * torch.relu(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


class TinyLpips(nn.Module):
    """LPIPS's structure (unit-normalised features of two conv stages, squared difference,
    spatial mean) on random weights, with torchmetrics' call signature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stages = nn.ModuleList([nn.Conv2d(3, 6, 3, stride=2), nn.Conv2d(6, 8, 3, stride=2)])

    def forward(self, a, b, normalize=False):
        if normalize:
            a, b = 2 * a - 1, 2 * b - 1
        total = 0
        for stage in self.stages:
            a, b = torch.relu(stage(a)), torch.relu(stage(b))
            na, nb = a / (a.norm(dim=1, keepdim=True) + 1e-8), b / (b.norm(dim=1, keepdim=True) + 1e-8)
            total = total + ((na - nb) ** 2).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        return total


def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from tiny_models import tiny_vocab

    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=4, bos_token_id=3, pad_token_id=4),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def tiny_dino():
    from transformers import Dinov2Config, Dinov2Model, ViTImageProcessor

    torch.manual_seed(4)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                     image_size=32, patch_size=8)).eval()
    return model, ViTImageProcessor(size={"height": 32, "width": 32})


def gray_condition(images):
    return images.float().mean(dim=1, keepdim=True) / 255


@pytest.fixture(scope="module")
def nets():
    return FeatureNets(fid=TinyFeatures(4, 0), inception=TinyFeatures(5, 1), lpips=TinyLpips(), clip=tiny_clip(),
                       dino=tiny_dino(), condition=gray_condition)


# ------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------


def smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return (torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
            .clamp(0, 1) * 255).round().to(torch.uint8)


def save(folder: Path, stems, images, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, img in zip(stems, images):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr if mode == "RGB" else arr.mean(axis=2).round().astype(np.uint8), mode).save(folder / f"{stem}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = smooth_images(len(STEMS), SIZE)
    g = torch.Generator().manual_seed(1)
    noisy = (base.float() + 30 * torch.randn(base.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    save(root / "original", STEMS, base)
    save(root / "copy", STEMS, base)
    save(root / "noisy", STEMS, noisy)
    save(root / "copy", ["extra"], base[:1])  # unpaired: skipped and counted
    real = torch.nn.functional.interpolate(base.float(), size=(SIZE + 32, SIZE + 64), mode="bilinear").round().to(torch.uint8)
    save(root / "real", STEMS, real)  # another size: resized and center-cropped
    save(root / "conditions", STEMS, base, mode="L")
    return root


@pytest.fixture(scope="module")
def results(folders, nets):
    original = ModelImages("original", folders / "original")
    candidates = [ModelImages("copy", folders / "copy", radius=4, down_factor=4),
                  ModelImages("noisy", folders / "noisy", radius=2)]
    prompts = [Prompt(s, p) for s, p in zip(STEMS, PROMPTS)]
    return evaluate(original, candidates, real=folders / "real", prompts=prompts, conditions=folders / "conditions",
                    config=EvalConfig(batch_size=3, is_splits=2, device="cpu"), nets=nets, progress=False)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_identical_folder_is_a_perfect_match(results):
    m, notes = results["models"]["copy"]["metrics"], results["models"]["copy"]["notes"]
    assert not notes, notes
    assert m["psnr"] == math.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["lpips_original"] == pytest.approx(0.0, abs=1e-6)
    assert m["clip_i"] == pytest.approx(100.0, abs=1e-3)
    assert m["dino"] == pytest.approx(100.0, abs=1e-3)
    assert abs(m["fid_original"]) < 1e-3


def test_noise_moves_every_metric_the_right_way(results):
    copy, noisy = results["models"]["copy"]["metrics"], results["models"]["noisy"]["metrics"]
    assert 10 < noisy["psnr"] < 40
    assert noisy["ssim"] < copy["ssim"] - 0.05 and noisy["ms_ssim"] < copy["ms_ssim"] - 0.01
    assert noisy["lpips_original"] > copy["lpips_original"] + 1e-3
    assert noisy["clip_i"] < copy["clip_i"] - 1e-3 and noisy["dino"] < copy["dino"] - 1e-3
    assert noisy["fid_original"] > 1.0 > 1e-3 > abs(copy["fid_original"])
    assert noisy["fid_real"] > copy["fid_real"] and noisy["lpips_real"] > copy["lpips_real"]
    assert noisy["rmse_condition"] > copy["rmse_condition"] + 5


def test_reference_metrics_and_shared_columns(results):
    orig, copy = results["models"]["original"], results["models"]["copy"]["metrics"]
    for key in ("fid_original", "lpips_original", "clip_i", "dino", "psnr", "ssim", "ms_ssim"):
        assert orig["metrics"][key] is None and orig["notes"][key].startswith("not applicable")
    # the same images score the same on the real-image, text and quality columns
    for key in ("fid_real", "lpips_real", "clip_t", "inception_score", "rmse_condition"):
        assert orig["metrics"][key] == pytest.approx(copy[key], rel=1e-5, abs=1e-6), key
    assert orig["metrics"]["rmse_condition"] < 0.5  # the condition is the image's gray level, rounded to uint8
    assert orig["metrics"]["fid_real"] > 0 and orig["metrics"]["lpips_real"] > 0
    assert 0 < orig["metrics"]["clip_t"] <= 100
    assert orig["metrics"]["inception_score"] >= 1.0


def test_gflops_equal_attention_flops(results):
    tokens = SIZE // 16
    expect = {"original": clear.attention_flops(tokens, tokens, None),
              "copy": clear.attention_flops(tokens, tokens, 4, text_len=512, down_factor=4, dim=3072),
              "noisy": clear.attention_flops(tokens, tokens, 2)}
    for name, flops in expect.items():
        assert results["models"][name]["metrics"]["gflops"] == pytest.approx(flops / 1e9, rel=1e-12)
    assert expect["noisy"] < expect["copy"] < expect["original"]


def test_pairing_counts(results):
    images = results["images"]
    assert images["evaluated"] == images["paired"] == len(STEMS)
    assert images["unpaired_per_folder"]["copy"] == 1 and images["unpaired_per_folder"]["original"] == 0


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


def test_report_json_and_markdown(results, tmp_path):
    js, md = write_report(results, tmp_path / "report")
    loaded = json.loads(js.read_text())  # strict JSON: infinity is the string "inf"
    assert loaded["models"]["copy"]["metrics"]["psnr"] == "inf"
    for name, info in loaded["models"].items():
        assert set(METRIC_KEYS) <= set(info["metrics"])
        for key in METRIC_KEYS:
            assert info["metrics"][key] is not None or key in info["notes"], (name, key)
    assert loaded["models"]["noisy"]["metrics"]["inception_score_std"] >= 0
    assert loaded["protocol"]["resolution"] == {"width": SIZE, "height": SIZE, "tokens": [SIZE // 16, SIZE // 16]}
    assert sorted(loaded["protocol"]["feature_models"]["injected"]) == sorted(
        ["fid", "inception", "lpips", "clip", "dino", "condition"])

    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["Method", "FID ↓", "LPIPS ↓", "CLIP-I ↑", "DINO ↑", "PSNR ↑", "SSIM ↑", "MS-SSIM ↑",
                     "FID (real) ↓", "LPIPS (real) ↓", "CLIP-T ↑", "IS ↑", "GFLOPs ↓", "RMSE ↓"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines
            if r.startswith("| ") and not r.startswith("| Method")}
    assert list(rows) == ["original", "copy", "noisy"]
    assert rows["copy"][cells.index("PSNR ↑")] == "∞"
    assert rows["copy"][cells.index("SSIM ↑")] == "1.000"
    assert rows["original"][cells.index("FID ↓")] == "—"
    assert rows["noisy"][cells.index("GFLOPs ↓")] == f"{clear.attention_flops(SIZE // 16, SIZE // 16, 2) / 1e9:.2f}"
    assert markdown_table(results) == md.read_text()


def test_unavailable_metrics_are_reported_not_faked(folders, nets):
    """No torch-fidelity / torchvision here: FID, IS and LPIPS must say so; images too small
    for MS-SSIM must say so; nothing is filled in."""
    small = folders / "small"
    save(small / "a", STEMS[:3], smooth_images(3, 64))
    save(small / "b", STEMS[:3], smooth_images(3, 64, seed=5))
    partial = FeatureNets(clip=nets.clip, dino=nets.dino)
    res = evaluate(ModelImages("a", small / "a"), [ModelImages.from_folder(small / "b")],
                   config=EvalConfig(device="cpu", metrics=("fid_original", "lpips_original", "ms_ssim", "psnr",
                                                            "inception_score", "gflops")),
                   nets=partial, progress=False)
    b = res["models"]["b"]
    assert b["metrics"]["psnr"] is not None and math.isfinite(b["metrics"]["psnr"])
    for key in ("fid_original", "lpips_original", "ms_ssim", "inception_score", "gflops"):
        assert b["metrics"][key] is None and b["notes"][key].startswith(("unavailable", "failed")), key
    if importlib.util.find_spec("torch_fidelity") is None:
        assert "torch-fidelity" in b["notes"]["fid_original"] and "torch-fidelity" in b["notes"]["inception_score"]
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" in b["notes"]["lpips_original"]
    assert "larger than 160" in b["notes"]["ms_ssim"]
    assert "radius" in b["notes"]["gflops"]
    assert b["notes"]["dino"] == "not requested"
    table = markdown_table(res)
    assert "n/a" in table and "torch-fidelity" in table


def test_skips_unreadable_and_missing(folders, nets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    imgs = smooth_images(4, 32)
    save(a, STEMS[:4], imgs)
    save(b, STEMS[:4], imgs)
    (b / f"{STEMS[1]}.png").write_bytes(b"not a png")
    res = evaluate(ModelImages("a", a), [ModelImages("b", b)], config=EvalConfig(device="cpu", metrics=("psnr",)),
                   nets=nets, progress=False)
    assert res["images"]["evaluated"] == 3 and res["images"]["skipped_unreadable_or_wrong_size"] == 1
    assert STEMS[1] in res["images"]["skipped_examples"] and "unreadable" in res["images"]["skipped_examples"][STEMS[1]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(ModelImages("a", a), [ModelImages("c", tmp_path / "missing")], nets=nets, progress=False)
    save(tmp_path / "d", ["other"], imgs[:1])
    with pytest.raises(ValueError, match="paired by file stem"):
        evaluate(ModelImages("a", a), [ModelImages("d", tmp_path / "d")], nets=nets, progress=False)


def tiny_depth():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(5)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=28,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=8, patch_size=14)).eval()
    return model, DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False, do_pad=False)


def test_default_loaders_read_saved_models(folders, tmp_path):
    """The code that loads CLIP, DINO and the depth extractor from the Hub, run on tiny models
    saved with save_pretrained (the Hub is offline in tests)."""
    for name, (model, processor) in {"clip": tiny_clip(), "dino": tiny_dino(), "depth": tiny_depth()}.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    config = EvalConfig(device="cpu", batch_size=4, metrics=("clip_i", "clip_t", "dino", "rmse_condition"),
                        clip_model=str(tmp_path / "clip"), dino_model=str(tmp_path / "dino"), depth_model=str(tmp_path / "depth"))
    res = evaluate(ModelImages("original", folders / "original"), [ModelImages("copy", folders / "copy")],
                   prompts=[Prompt(s, p) for s, p in zip(STEMS, PROMPTS)], conditions=folders / "conditions",
                   config=config, progress=False)
    orig, copy = res["models"]["original"], res["models"]["copy"]
    assert copy["metrics"]["clip_i"] == pytest.approx(100, abs=1e-3) and copy["metrics"]["dino"] == pytest.approx(100, abs=1e-3)
    assert 0 < orig["metrics"]["rmse_condition"] < 255
    assert copy["metrics"]["rmse_condition"] == pytest.approx(orig["metrics"]["rmse_condition"], rel=1e-5)
    assert copy["metrics"]["clip_t"] == pytest.approx(orig["metrics"]["clip_t"], rel=1e-5, abs=1e-6)
    assert res["protocol"]["feature_models"]["injected"] == []


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------


def test_load_prompts_formats(tmp_path):
    coco = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "x/7.jpg"}],
            "annotations": [{"image_id": 42, "caption": "A  dog. "}, {"image_id": 7, "caption": "a cat"},
                            {"image_id": 42, "caption": "second caption of 42"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert load_prompts(tmp_path / "c.json") == [Prompt("7", "a cat"), Prompt("COCO_val2014_000000000042", "A dog.")]
    (tmp_path / "p.txt").write_text("one\n\n two \nthree\n")
    assert [(p.key, p.text) for p in load_prompts(tmp_path / "p.txt")] == [("00000", "one"), ("00001", "two"),
                                                                           ("00002", "three")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "id": 5}\n"y"\n{"caption": "z", "key": "k"}\n')
    assert [(p.key, p.text) for p in load_prompts(tmp_path / "p.jsonl")] == [("5", "x"), ("00001", "y"), ("k", "z")]
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"prompt {i}" for i in range(50)))
    a, b = load_prompts(big, num=10, sample_seed=3), load_prompts(big, num=10, sample_seed=3)
    assert a == b and len({p.key for p in a}) == 10 and a != load_prompts(big, num=10)
    assert [p.key for p in a] == sorted(p.key for p in a)
    (tmp_path / "dup.jsonl").write_text('{"prompt": "x", "id": 1}\n{"prompt": "y", "id": 1}\n')
    with pytest.raises(ValueError, match="unique"):
        load_prompts(tmp_path / "dup.jsonl")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------
# Generating folders with the tiny pipeline, then evaluating them with the CLI
# ------------------------------------------------------------------------------------------


def test_generate_resume_and_evaluate_cli(tiny_flux_pipeline_dir, tmp_path, nets):
    evaluate_cli, generate_eval_set = load_script("evaluate"), load_script("generate_eval_set")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]))
    common = ["--prompts", str(prompts), "--model", tiny_flux_pipeline_dir, "--height", "32", "--width", "48",
              "--steps", "2", "--max_sequence_length", "16", "--device", "cpu", "--no_progress"]
    orig, local = tmp_path / "orig", tmp_path / "local"
    assert generate_eval_set.main(common + ["--out", str(orig), "--batch_size", "2"])["generated"] == 3
    files = sorted(p.name for p in orig.glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(orig / "00001.png").size == (48, 32)
    manifest = json.loads((orig / MANIFEST).read_text())
    assert [it["seed"] for it in manifest["items"]] == [0, 1, 2] and manifest["settings"]["radius"] is None
    mtimes = {p.name: p.stat().st_mtime_ns for p in orig.glob("*.png")}
    assert generate_eval_set.main(common + ["--out", str(orig)]) == {"generated": 0, "skipped": 3, "total": 3}
    assert {p.name: p.stat().st_mtime_ns for p in orig.glob("*.png")} == mtimes
    # a deleted image comes back identical, though made alone (batch 1) instead of in a batch of 2
    before = np.asarray(Image.open(orig / "00001.png"))
    (orig / "00001.png").unlink()
    assert generate_eval_set.main(common + ["--out", str(orig)])["generated"] == 1
    np.testing.assert_array_equal(np.asarray(Image.open(orig / "00001.png")), before)
    # the CLEAR variant: another folder; the original's folder refuses other settings
    with pytest.raises(ValueError, match="other settings"):
        generate_eval_set.main(common + ["--out", str(orig), "--radius", "2", "--checkpoint", "none"])
    assert generate_eval_set.main(common + ["--out", str(local), "--radius", "2", "--checkpoint", "none"])["generated"] == 3
    assert json.loads((local / MANIFEST).read_text())["settings"]["label"] == "CLEAR r=2"
    assert not list(orig.glob(".*.tmp")) and not list(local.glob(".*.tmp"))

    out = tmp_path / "report"
    res = evaluate_cli.main(["--prompts", str(prompts), "--original", str(orig), "--clear", str(local), "--out", str(out),
                             "--batch_size", "2", "--workers", "0", "--device", "cpu", "--is_splits", "3",
                             "--no_progress"], nets=nets)
    assert list(res["models"]) == [Path(tiny_flux_pipeline_dir).name, "CLEAR r=2"]  # labels from generation.json
    row = res["models"]["CLEAR r=2"]
    assert row["metrics"]["gflops"] == pytest.approx(clear.attention_flops(2, 3, 2.0, text_len=16) / 1e9)
    assert row["metrics"]["psnr"] < math.inf and row["metrics"]["ssim"] < 1
    assert row["metrics"]["ms_ssim"] is None and "failed" in row["notes"]["ms_ssim"]  # 32x48 is too small
    assert row["metrics"]["clip_t"] is not None
    assert json.loads((out / "metrics.json").read_text())["images"]["evaluated"] == 3
    assert "| CLEAR r=2 |" in (out / "table.md").read_text()


def test_evaluate_cli_gflops_for_other_token_sizes_and_widths(tmp_path):
    """--pixels_per_token / --attention_dim: GFLOPs of a model that is not FLUX.1 (e.g. the mini teacher,
    4 pixels per token, width 64) come from its own token grid and width."""
    evaluate_cli = load_script("evaluate")
    rng = np.random.default_rng(0)
    for name, radius in (("orig", None), ("local", 4)):
        folder = tmp_path / name
        folder.mkdir()
        for stem in STEMS[:2]:
            Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
        (folder / MANIFEST).write_text(json.dumps({"settings": {"label": name, "radius": radius, "down_factor": 1,
                                                                "max_sequence_length": 32}}))
    common = ["--original", str(tmp_path / "orig"), "--clear", str(tmp_path / "local"), "--metrics", "psnr,gflops",
              "--workers", "0", "--device", "cpu", "--no_progress"]
    res = evaluate_cli.main(common + ["--out", str(tmp_path / "a"), "--pixels_per_token", "4", "--attention_dim", "64"])
    assert res["models"]["local"]["metrics"]["gflops"] == pytest.approx(
        clear.attention_flops(16, 24, 4, text_len=32, dim=64) / 1e9)
    assert res["models"]["orig"]["metrics"]["gflops"] == pytest.approx(
        clear.attention_flops(16, 24, None, text_len=32, dim=64) / 1e9)
    default = evaluate_cli.main(common + ["--out", str(tmp_path / "b")])  # FLUX.1: 16 pixels per token, width 3072
    assert default["models"]["local"]["metrics"]["gflops"] == pytest.approx(
        clear.attention_flops(4, 6, 4, text_len=32, dim=3072) / 1e9)


def test_evaluate_cli_bad_inputs_are_one_line(tmp_path):
    """A missing or empty folder, an unknown metric, a missing prompts file: one line naming it and the fix,
    exit 1, no traceback, nothing written, before any network or metric loads."""
    import subprocess
    import sys

    evaluate_cli = load_script("evaluate")
    good = tmp_path / "orig"
    good.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good / "00000.png")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    base = ["--out", str(out), "--workers", "0", "--device", "cpu", "--no_progress"]
    cases = [
        (["--original", str(tmp_path / "nope"), "--clear", str(good)],
         f"--original {tmp_path / 'nope'} does not exist (or is not a folder): pass the folder of the original "
         "model's images (scripts/generate_eval_set.py writes one)"),
        (["--original", str(good), "--clear", str(tmp_path / "empty")],
         f"--clear {tmp_path / 'empty'} holds no images (.png, .jpg, ...): pass the folder of a CLEAR model's images "
         "(scripts/generate_eval_set.py writes one)"),
        (["--original", str(good), "--clear", str(good), "--metrics", "psnr,fdi"],
         f"--metrics: unknown metric 'fdi'; choose from {', '.join(METRIC_KEYS)}"),
        (["--original", str(good), "--clear", str(good), "--prompts", str(tmp_path / "captions.json")],
         f"--prompts {tmp_path / 'captions.json'} does not exist: pass the prompts file the images were made from"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate_cli.main([*argv, *base])
        assert e.value.code == message
    assert not out.exists()
    env = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "evaluate.py"),
                           *cases[0][0], *base], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and proc.stderr.strip() == cases[0][1], proc.stderr[-2000:]
