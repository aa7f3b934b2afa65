"""Training end to end on the tiny offline pipelines of every family (FLUX.1-dev-like; SD3.5-Medium-like with three
text encoders and a dual-attention block): the teacher generates data, features are cached as the pipeline's own
encoders compute them, the student is distilled (losses, frozen parameters, export, resume, bad data), and the
accelerate + DeepSpeed launch path runs, and distill.py fails loudly (divergence, resume, locks, full disks,
truncated shards). Tests that hold for every family are parametrized over the registry
(clear.families.FAMILIES); each family's tiny setup is one entry of CASES."""

import copy
import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from scripts_loader import load_script, reset_accelerate_state
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clear
from clear.checkpointing import LOCK, MANIFEST, checkpoint_problem
from clear.data import LATENT_CODES, PROMPT_EMBEDS, check_cache, read_image
from clear.distill import (
    AttentionCapture,
    attention_layers,
    distill_losses,
    freeze_for_distillation,
    sample_timesteps,
)
from clear.families import FAMILIES, get_family, resolve_family
from clear.shards import index_samples
from tiny_models import tiny_flux, tiny_sd3, tiny_sd3_pipeline

REPO = Path(__file__).resolve().parent.parent
cache_latent_codes, cache_prompt_embeds = load_script("cache_latent_codes"), load_script("cache_prompt_embeds")
distill, generate_data = load_script("distill"), load_script("generate_data")

PROMPTS = ["a small blue plane", "a red cat", "a dog in the city", "a house over the river", "a tree at night"]
GEN = ["--height", "16", "--width", "16", "--num_inference_steps", "2", "--max_sequence_length", "8"]
# a tiny distillation: 16 px images -> 8x8 latents -> 4x4 tokens, radius 2 (local), 8 text tokens
DISTILL = ["--resolution", "16", "--radius", "2", "--attn_backend", "dense", "--attn_loss_layers", "single:1",
           "--train_batch_size", "2", "--dataloader_num_workers", "0", "--max_sequence_length", "8",
           "--mixed_precision", "no", "--report_to", "none"]
# SD3: 16 px images -> 8x8 latents (VAE factor 2) -> 4x4 tokens (patch 2), radius 2 (local), 77 + 8 text tokens
DISTILL_SD3 = ["--resolution", "16", "--radius", "2", "--attn_backend", "dense", "--train_batch_size", "2",
               "--dataloader_num_workers", "0", "--max_sequence_length", "8", "--mixed_precision", "no",
               "--report_to", "none", "--learning_rate", "1e-3"]


def _flux_prompt(pipeline, prompt):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(pipeline, transformer=None, vae=None)
    ref, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=8)
    return ref[0], pooled[0]


def _sd3_prompt(pipeline, prompt):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline, transformer=None, vae=None)
    ref, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                           max_sequence_length=8)
    return ref[0], pooled[0]


def _unpack(packed, h, w):
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


# What differs between the families' tiny setups (everything else is the same test). A family added to the
# registry without an entry here fails test_every_family_has_a_case.
CASES = {
    "flux": dict(
        data="data", distilled="distilled", guidance=3.5,  # FLUX.1-dev's guidance embedding
        embeds=(8, 32), pooled=(32,),  # T5 8 tokens; CLIP pooled
        encode=_flux_prompt, steps=4, trained_keys=28, trained_marker="single_transformer_blocks.",
        teacher=lambda: tiny_flux(guidance_embeds=True, num_layers=1, num_single_layers=4),
        default_layers=["single_transformer_blocks.1.attn"],  # every 4th single-stream block from the second
        layers=("single:2", ["single_transformer_blocks.0.attn", "single_transformer_blocks.2.attn"]),
        shift=1.0, unpack=_unpack, loss_steps=20),
    "sd3": dict(
        data="sd3", distilled="distilled_sd3", guidance=4.5,  # SD3.5-Medium's (dual attention) classifier-free one
        embeds=(77 + 8, 32), pooled=(16,),  # CLIP-L and CLIP-G tokens, then T5 8; CLIP-L + CLIP-G pooled
        encode=_sd3_prompt, steps=3, trained_keys=24, trained_marker=".attn2.",  # SD3.5's image-only attn2 trains
        teacher=lambda: tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm"),
        default_layers=["transformer_blocks.0.attn"],  # every 4th joint block's attn
        layers=("joint:1,transformer_blocks.0.attn2",
                ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.0.attn2"]),
        shift=3.0, unpack=lambda v, h, w: v, loss_steps=15),
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def run_env():
    env = dict(os.environ)  # conftest put every cache (TORCH_EXTENSIONS_DIR, HF_HOME, TMPDIR) under .cache/
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def shard_contents(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


# the families whose tiny pipelines generate their own training data here; FLUX.2 (no offline text encoder) and
# Qwen-Image train from a written data set in tests/test_training_families.py; Wan (video): tests/test_wan*.py
TRAINABLE = ["flux", "sd3"]
ELSEWHERE = {"flux2", "qwenimage", "wan"}


def test_every_family_has_a_case():
    assert set(CASES) == set(TRAINABLE) and set(FAMILIES) == set(TRAINABLE) | ELSEWHERE


# ------------------------------------------------------------------------------------------
# data generation and feature caches
# ------------------------------------------------------------------------------------------

def _generate_and_cache(pipeline, root):
    """Self-generated shards (5 samples, 2 per shard, generated twice: the second run resumes) and both caches."""
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    gen_args = ["--pretrained_model_name_or_path", pipeline, "--prompts", str(root / "prompts.txt"),
                "--output_dir", str(root / "data"), "--samples_per_shard", "2", "--batch_size", "2", *GEN]
    first = generate_data.main(gen_args)
    again = generate_data.main(gen_args)
    model = ["--pretrained_model_name_or_path", pipeline, "--data_root", str(root / "data")]
    prompt_report = cache_prompt_embeds.main(model + ["--max_sequence_length", "8", "--batch_size", "3"])
    latent_report = cache_latent_codes.main(model + ["--resolution", "16", "--batch_size", "3"])
    prompt_again = cache_prompt_embeds.main(model + ["--max_sequence_length", "8"])
    return dict(root=root, gen_args=gen_args, first=first, again=again, prompt_report=prompt_report,
                latent_report=latent_report, prompt_again=prompt_again, pipeline=pipeline,
                cache=Path(str(root / "data") + "_cache"))


@pytest.fixture(scope="module")
def data(tiny_flux_pipeline_dir, tmp_path_factory):
    """The tiny FLUX.1-dev-like pipeline's self-generated shards and both feature caches."""
    return _generate_and_cache(tiny_flux_pipeline_dir, tmp_path_factory.mktemp("training"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3.5-Medium-like pipeline on disk, its self-generated shards and both feature caches."""
    root = tmp_path_factory.mktemp("training-sd3")
    tiny_sd3_pipeline().save_pretrained(root / "pipe")
    return _generate_and_cache(str(root / "pipe"), root)


@pytest.fixture(params=TRAINABLE)
def family(request):
    return request.param


def test_teacher_generates_resumable_shards(family, request):
    data = request.getfixturevalue(CASES[family]["data"])
    out = data["root"] / "data"
    assert data["first"]["written"] == 5 and data["again"]["written"] == 0 and data["again"]["skipped"] == 5
    assert sorted(p.name for p in out.iterdir()) == [".generation.json", "shard-00000.tar", "shard-00001.tar",
                                                     "shard-00002.tar"]  # staging removed once packed
    settings = json.loads((out / ".generation.json").read_text())
    assert settings["guidance_scale"] == CASES[family]["guidance"]  # the model's own default
    assert settings["max_sequence_length"] == 8
    members = shard_contents(out / "shard-00001.tar")
    assert sorted(members) == ["00000002.jpg", "00000002.json", "00000003.jpg", "00000003.json"]
    meta = json.loads(members["00000003.json"])
    assert meta == {"key": "00000003", "prompt": PROMPTS[3], "seed": 3, "width": 16, "height": 16,
                    "model": data["pipeline"], "num_inference_steps": 2, "guidance_scale": CASES[family]["guidance"]}
    from PIL import Image

    assert Image.open(io.BytesIO(members["00000003.jpg"])).size == (16, 16)


def test_feature_caches_equal_the_pipeline_encoders(family, request):
    """The text encoders as the pipeline's own encode_prompt gives them; VAE mean/std as its own encode (the VAE's
    [C, h, w] layout, not packed); the family in each file's metadata, and a cache of one family refused by a run of
    any other."""
    from diffusers import AutoencoderKL

    data, case = request.getfixturevalue(CASES[family]["data"]), CASES[family]
    cache = data["cache"]
    assert data["prompt_report"].written == 5 and data["latent_report"].written == 5
    assert data["prompt_again"].written == 0 and data["prompt_again"].already_cached == 5
    emb_path = cache / "prompt_embeds" / "shard-00001" / "00000003.safetensors"
    emb = load_file(str(emb_path))
    assert emb["prompt_embeds"].shape == case["embeds"] and emb["pooled_prompt_embeds"].shape == case["pooled"]
    ref, pooled = case["encode"](data["pipeline"], PROMPTS[3])
    torch.testing.assert_close(emb["prompt_embeds"], ref)
    torch.testing.assert_close(emb["pooled_prompt_embeds"], pooled)

    sample = next(s for s in index_samples(data["root"] / "data") if s.id == "shard-00002/00000004")
    lat = load_file(str(cache / "latent_codes" / "shard-00002" / "00000004.safetensors"))
    assert lat["latent_mean"].shape == lat["latent_std"].shape == (4, 8, 8) and (lat["latent_std"] > 0).all()
    vae = AutoencoderKL.from_pretrained(data["pipeline"], subfolder="vae")
    with torch.no_grad():
        dist = vae.encode(read_image(sample, 16)[None]).latent_dist
    torch.testing.assert_close(lat["latent_mean"], dist.mean[0])
    torch.testing.assert_close(lat["latent_std"], dist.std[0])

    with safe_open(str(emb_path), framework="pt") as f:
        assert f.metadata()["family"] == family and f.metadata()["max_sequence_length"] == "8"
    check_cache(cache, PROMPT_EMBEDS, family)
    check_cache(cache, PROMPT_EMBEDS, family, max_sequence_length=8)
    check_cache(cache, LATENT_CODES, family, resolution=16)
    # a run whose T5 length or resolution differs from the cache's is refused, naming both and the fix
    with pytest.raises(ValueError, match="made with --max_sequence_length 8, but this run uses 16: pass "
                                         "--max_sequence_length 8, or re-run scripts/cache_prompt_embeds.py"):
        check_cache(cache, PROMPT_EMBEDS, family, max_sequence_length=16)
    with pytest.raises(ValueError, match="made with --resolution 16, but this run uses 32: pass --resolution 16"):
        check_cache(cache, LATENT_CODES, family, resolution=32)
    for other in set(FAMILIES) - {family}:
        for kind in (PROMPT_EMBEDS, LATENT_CODES):
            with pytest.raises(ValueError, match=f"made with a {family} model's encoders, but this run trains a "
                                                 f"{other} model"):
                check_cache(cache, kind, other)


def test_generate_data_resumes_a_killed_shard_and_splits_ranks(data, tmp_path, monkeypatch):
    src = data["root"] / "data"
    out = tmp_path / "data"
    out.mkdir()
    shutil.copy(src / ".generation.json", out)
    shutil.copy(src / "shard-00000.tar", out)
    # a run killed inside shard 1: one image staged, the shard not packed
    staged = shard_contents(src / "shard-00001.tar")
    (out / ".staging" / "shard-00001").mkdir(parents=True)
    for name in ("00000002.jpg", "00000002.json"):
        (out / ".staging" / "shard-00001" / name).write_bytes(staged[name])
    (out / ".staging" / "shard-00001" / "00000003.jpg").write_bytes(b"half written, no .json yet")

    args = [a if a != str(src) else str(out) for a in data["gen_args"]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank1 = generate_data.main(args)  # shards 1 (odd): only key 3 is missing
    assert rank1["written"] == 1 and rank1["skipped"] == 1
    assert [Path(p).name for p in rank1["shards"]] == ["shard-00001.tar"]
    assert not (out / "shard-00002.tar").exists()
    monkeypatch.setenv("RANK", "0")
    rank0 = generate_data.main(args)  # shards 0 (done) and 2 (one prompt)
    assert rank0["written"] == 1 and rank0["skipped"] == 2
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert shard_contents(out / name) == shard_contents(src / name), name  # same seeds, same bytes
    assert not (out / ".staging").exists()

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="height: was 16, now 32"):
        generate_data.main(args + ["--height", "32"])  # the later flag wins


def test_generate_data_reads_prompts_from_a_t2i_2m_tar_and_jsonl(data, tmp_path):
    tar = tmp_path / "data_000000.tar"
    with tarfile.open(tar, "w") as tf:
        for key, meta in [("000000007", b'{"prompt": "a cat", "url": "x"}'), ("000000008", b"{broken"),
                          ("000000009", b'{"prompt": "a dog"}')]:
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(meta)
            tf.addfile(info, io.BytesIO(meta))
    out = generate_data.main(["--pretrained_model_name_or_path", data["pipeline"], "--prompts", str(tar),
                              "--output_dir", str(tmp_path / "from_tar"), *GEN])
    assert out["written"] == 2 and len(out["bad_prompts"]) == 1 and "000000008" in out["bad_prompts"][0]
    members = shard_contents(tmp_path / "from_tar" / "shard-00000.tar")
    assert sorted(members) == ["000000007.jpg", "000000007.json", "000000009.jpg", "000000009.json"]
    assert json.loads(members["000000009.json"])["prompt"] == "a dog"

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a boat", "key": "boat", "seed": 42}\nnot json\n{"prompt": "a car"}\n')
    out = generate_data.main(["--pretrained_model_name_or_path", data["pipeline"], "--prompts", str(jsonl),
                              "--output_dir", str(tmp_path / "from_jsonl"), *GEN])
    assert out["written"] == 2 and len(out["bad_prompts"]) == 1
    members = shard_contents(tmp_path / "from_jsonl" / "shard-00000.tar")
    assert json.loads(members["boat.json"])["seed"] == 42 and json.loads(members["00000001.json"])["seed"] == 1


def test_family_is_read_from_the_model(sd3, tiny_flux_pipeline_dir):
    assert resolve_family(None, sd3["pipeline"]) is FAMILIES["sd3"]
    assert resolve_family("auto", tiny_flux_pipeline_dir) is FAMILIES["flux"]
    with pytest.raises(ValueError, match="is a sd3 model .*not flux"):
        resolve_family("flux", sd3["pipeline"])
    with pytest.raises(SystemExit, match="is a sd3 model"):
        distill.main(["--pretrained_model_name_or_path", sd3["pipeline"], "--model_family", "flux", "--data_root",
                      str(sd3["root"] / "data"), "--output_dir", str(sd3["root"] / "never")])
    # SD3's positions are a fixed table: pos_embed_max_size 32 tokens = 128 pixels here
    with pytest.raises(SystemExit, match=r"132x132 pixels is a 33x33 token grid, larger than this model's positional "
                                         r"embedding table of 32x32 tokens .* choose --resolution <= 128"):
        distill.main(["--pretrained_model_name_or_path", sd3["pipeline"], "--data_root", str(sd3["root"] / "data"),
                      "--output_dir", str(sd3["root"] / "never"), "--resolution", "132"])


# ------------------------------------------------------------------------------------------
# the distillation objective
# ------------------------------------------------------------------------------------------

def test_losses_decrease_on_a_fixed_batch(family):
    """On a batch the teacher explains exactly (x0 and noise built from its own velocity, as on self-generated data),
    a student with perturbed CLEAR weights (every kind of attention module of the family: FLUX double- and
    single-stream, SD3 joint and SD3.5's image-only attn2) brings all three losses down."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    case, fam = CASES[family], get_family(family)
    teacher = case["teacher"]().requires_grad_(False)
    student = copy.deepcopy(teacher)
    clear.apply_clear(student, radius=2, backend="dense")
    params = freeze_for_distillation(student)
    assert any(case["trained_marker"] in k for k in params)
    assert attention_layers(student) == case["default_layers"]  # the family's default
    spec, chosen = case["layers"]
    layers = attention_layers(student, spec)
    assert layers == chosen
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    b, h, w = 2, 8, 8
    timesteps, sigmas = sample_timesteps(FlowMatchEulerDiscreteScheduler(shift=case["shift"]), b, "logit_normal",
                                         generator=g)
    cfg = teacher.config
    prompt = torch.randn(b, 8 if family == "flux" else 6, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    x_t = torch.randn(b, 4, h, w, generator=g)
    guidance = fam.training_guidance(cfg, 3.5)
    with torch.no_grad():
        v = case["unpack"](teacher(**fam.transformer_inputs(x_t, timesteps, prompt, pooled, guidance))[0], h, w)
    s = sigmas.view(-1, 1, 1, 1)
    x0, noise = x_t - s * v, x_t + (1 - s) * v  # (1 - s) x0 + s noise = x_t and noise - x0 = v

    opt = torch.optim.AdamW(params.values(), lr=3e-3)
    history = []
    for _ in range(case["loss_steps"]):
        losses = distill_losses(student, teacher, x0, noise, timesteps, sigmas, prompt, pooled, layers)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        history.append(losses.items())
    first, last = history[0], history[-1]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert first["loss_fm"] == pytest.approx(first["loss_distill"], rel=1e-4)  # the teacher is exact on this batch
    for name in ("loss_distill", "loss_attn", "loss"):
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])


def test_sd3_objective_follows_diffusers_sd3_training():
    """noisy = (1 - s) x0 + s noise, the transformer sees [B, C, H, W] latents and timestep = s * 1000, the target is
    noise - x0, no guidance: checked against a hand-written SD3 training step with the unmodified teacher."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm").requires_grad_(False)
    student = copy.deepcopy(teacher)
    clear.apply_clear(student, radius=100, backend="dense")  # covers the grid: the student equals the teacher
    g = torch.Generator().manual_seed(3)
    timesteps, sigmas = sample_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 2, "logit_normal", generator=g)
    torch.testing.assert_close(timesteps, sigmas * 1000)
    x0, noise = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    prompt, pooled = torch.randn(2, 6, 32, generator=g), torch.randn(2, 16, generator=g)
    losses = distill_losses(student, teacher, x0, noise, timesteps, sigmas, prompt, pooled,
                            attention_layers(student, "joint:1"), guidance=3.5)  # SD3 takes no guidance
    s = sigmas.view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = teacher(hidden_states=(1 - s) * x0 + s * noise, timestep=timesteps, encoder_hidden_states=prompt,
                       pooled_projections=pooled, return_dict=False)[0]
    assert losses.fm.item() == pytest.approx((pred - (noise - x0)).pow(2).mean().item(), rel=1e-5)
    assert losses.distill.item() < 1e-10 and losses.attn.item() < 1e-10


def test_attention_capture_is_scoped_and_survives_gradient_checkpointing():
    model = tiny_flux(guidance_embeds=True)
    clear.apply_clear(model, radius=2, backend="dense")
    params = freeze_for_distillation(model)
    assert set(n for n, p in model.named_parameters() if p.requires_grad) == set(params)
    names = attention_layers(model, "double:1,single_transformer_blocks.1")
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.1.attn"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    prompt, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    inputs = get_family("flux").transformer_inputs(x, torch.tensor([500.0]), prompt, pooled, 3.5)

    def attn_grads():
        model.zero_grad()
        with AttentionCapture(model, names) as out:
            model(**inputs)
        assert out["transformer_blocks.0.attn"].shape == (1, 16 + 5, 32)  # image and text streams, concatenated
        sum(o.pow(2).mean() for o in out.values()).backward()
        return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}, out

    plain, out = attn_grads()
    assert not any(model.get_submodule(n)._forward_hooks for n in names)  # hooks are gone after the forward
    model.enable_gradient_checkpointing()
    model.train()
    checkpointed, _ = attn_grads()  # recomputation in backward must not record again
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(plain[k], checkpointed[k])
    with pytest.raises(ValueError, match="selects no attention module"):
        attention_layers(model, "single:1:5")
    assert attention_layers(model, "none") == []


# ------------------------------------------------------------------------------------------
# distill.py
# ------------------------------------------------------------------------------------------

def _distill_cached(data, out, *args):
    """distill.py on the cached features of ``data`` into ``out``, with validation images."""
    args = ["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(data["root"] / "data"),
            "--output_dir", str(out), "--use_cached_prompt_embed", "--use_cached_latent", *args,
            "--validation_prompt", "a red cat", "--num_validation_inference_steps", "2"]
    result = distill.main(args)
    reset_accelerate_state()
    return dict(out=out, args=args, result=result)


@pytest.fixture(scope="module")
def distilled(data, tmp_path_factory):
    return _distill_cached(data, tmp_path_factory.mktemp("distill") / "run", *DISTILL, "--gradient_accumulation_steps",
                           "2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3",
                           "--validation_steps", "2", "--report_to", "tensorboard")


@pytest.fixture(scope="module")
def distilled_sd3(sd3, tmp_path_factory):
    return _distill_cached(sd3, tmp_path_factory.mktemp("distill-sd3") / "run", *DISTILL_SD3, "--max_train_steps",
                           "3", "--checkpointing_steps", "3", "--validation_steps", "3")


def _tiny_of(family):
    return {"flux": tiny_flux, "sd3": tiny_sd3}[family]()


def test_distill_trains_only_clear_parameters_and_exports(family, request):
    """Finite losses, every CLEAR parameter trained and nothing else, the exported file loads into a fresh model of
    the family (and is refused by a model of any other family), the validation image shows teacher | student."""
    data, case = request.getfixturevalue(CASES[family]["data"]), CASES[family]
    distilled = request.getfixturevalue(case["distilled"])
    out, result = distilled["out"], distilled["result"]
    assert result["global_step"] == case["steps"] and len(result["history"]) == case["steps"]
    for logs in result["history"]:
        assert all(map(torch.isfinite, torch.tensor([logs["loss"], logs["loss_fm"], logs["loss_distill"],
                                                     logs["loss_attn"]])))
        assert logs["loss_attn"] > 0 and logs["loss_distill"] > 0 and logs["bad_samples"] == 0

    transformer_cls = get_family(family).transformer_cls()
    original = transformer_cls.from_pretrained(data["pipeline"], subfolder="transformer")
    student = result["student"]
    trained = clear.clear_state_dict_keys(student)
    assert any(case["trained_marker"] in k for k in trained) and len(trained) == case["trained_keys"]
    before, after = original.state_dict(), student.state_dict()
    assert set(after) == set(before)
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"

    path = out / "clear_local_2.safetensors"
    fresh = transformer_cls.from_pretrained(data["pipeline"], subfolder="transformer")
    clear.apply_clear(fresh, radius=2)
    clear.load_clear_weights(fresh, path)
    for k, p in clear.clear_state_dict_keys(fresh).items():
        assert torch.equal(p, trained[k])
    for other in set(TRAINABLE) - {family}:
        model = _tiny_of(other)
        clear.apply_clear(model, radius=2)
        with pytest.raises(ValueError, match=f"CLEAR weights for a {family} model, not {other}"):
            clear.load_clear_weights(model, path)
    assert (out / f"checkpoint-{case['steps']}" / "clear_local_2.safetensors").is_file()
    from PIL import Image

    assert Image.open(out / "validation" / f"step-{case['steps']:06d}.png").size == (32, 16)  # teacher | student


def test_distill_takes_the_first_releases_flag_spellings():
    """Migrating users type the public release's --window_size, --alpha and --beta: the same settings as --radius,
    --distill_loss_weight and --attn_loss_weight."""
    old = distill.parse_args(["--data_root", "d", "--window_size", "8", "--alpha", "0.25", "--beta", "0.75"])
    new = distill.parse_args(["--data_root", "d", "--radius", "8", "--distill_loss_weight", "0.25",
                              "--attn_loss_weight", "0.75"])
    assert vars(old) == vars(new) and (new.radius, new.alpha, new.beta) == (8, 0.25, 0.75)


def test_distill_checkpoints_validates_logs_and_never_overwrites(distilled):
    out = distilled["out"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-2" / "clear_local_2.safetensors").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))

    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest"):
        distill.main(distilled["args"])  # never trains over an existing run by accident


def test_resume_reaches_the_same_weights(distilled, tmp_path):
    """A run killed after its step-2 checkpoint and resumed ends where the uninterrupted run ended."""
    resumed = tmp_path / "run"
    resumed.mkdir()
    shutil.copytree(distilled["out"] / "checkpoint-2", resumed / "checkpoint-2")
    args = [a if a != str(distilled["out"]) else str(resumed) for a in distilled["args"]]
    result = distill.main(args + ["--resume_from_checkpoint", "latest", "--report_to", "none"])
    assert result["start_step"] == 2 and len(result["history"]) == 2
    for got, want in zip(result["history"], distilled["result"]["history"][2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    a = load_file(str(distilled["out"] / "clear_local_2.safetensors"))
    b = load_file(str(resumed / "clear_local_2.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bad_data_is_counted_and_the_run_continues(data, tmp_path):
    """A corrupt image and a broken JSON among loose files: the caches and the training skip, count and list them."""
    root = tmp_path / "loose"
    root.mkdir()
    for name, blob in shard_contents(data["root"] / "data" / "shard-00000.tar").items():
        (root / name).write_bytes(blob)
    good = shard_contents(data["root"] / "data" / "shard-00001.tar")
    (root / "corrupt.jpg").write_bytes(good["00000002.jpg"][:40])  # truncated JPEG
    (root / "corrupt.json").write_bytes(good["00000002.json"])
    (root / "badjson.jpg").write_bytes(good["00000003.jpg"])
    (root / "badjson.json").write_bytes(b'{"prompt": "unterminated')
    model = ["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(root)]
    prompts = cache_prompt_embeds.main(model + ["--max_sequence_length", "8"])
    latents = cache_latent_codes.main(model + ["--resolution", "16"])
    assert prompts.written == 3 and [b.id for b in prompts.bad.items] == ["badjson"]
    assert latents.written == 3 and [b.id for b in latents.bad.items] == ["corrupt"]
    assert "bad image" in latents.summary("latents") and "corrupt" in latents.summary("latents")

    # raw images and prompts: 4 samples a epoch, 3 steps x batch 2 = 6 samples read, both bad ones among them;
    # the down-sampled variant (df = 2) trains its pooling weights too
    result = distill.main(model + ["--output_dir", str(tmp_path / "raw"), *DISTILL, "--down_factor", "2",
                                   "--max_train_steps", "3", "--checkpointing_steps", "1",
                                   "--checkpoints_total_limit", "2"])
    bad = result["bad_samples"]
    weights = load_file(str(tmp_path / "raw" / "clear_local_2_down_2.safetensors"))
    spatial = [v for k, v in weights.items() if k.endswith("processor.spatial_weight")]
    assert result["global_step"] == 3 and len(spatial) == 4 and all(not torch.all(v == 0.25) for v in spatial)
    assert {b.id for b in bad.items} == {"corrupt", "badjson"}
    assert {"bad image", "bad json"} <= set(bad.counts())
    assert result["history"][-1]["bad_samples"] == len(bad) >= 2
    assert sorted(p.name for p in (tmp_path / "raw").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((tmp_path / "raw" / "checkpoint-3" / "data_state.rank0.json").read_text())
    assert len(state["bad_samples"]["items"]) == len(bad)  # the count survives a resume


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deepspeed_zero2_launch_and_resume(data, distilled, tmp_path):
    """`accelerate launch --config_file configs/deepspeed_cpu.yaml` (DeepSpeed ZeRO-2, 1 CPU process)
    trains exactly as the plain run does, checkpoints without the frozen weights, and resumes exactly."""
    def launch(out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "deepspeed_cpu.yaml"), "--gradient_accumulation_steps", "2",
               str(REPO / "scripts" / "distill.py"), "--pretrained_model_name_or_path", data["pipeline"],
               "--data_root", str(data["root"] / "data"), "--output_dir", str(out), "--use_cached_prompt_embed",
               "--use_cached_latent", *DISTILL, "--gradient_accumulation_steps", "2", "--max_train_steps", "2",
               "--checkpointing_steps", "1", "--learning_rate", "1e-3", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    full = tmp_path / "full"
    launch(full)
    ds_state = full / "checkpoint-1" / "pytorch_model"
    assert (ds_state / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # DeepSpeed's own checkpoint
    module = torch.load(ds_state / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    trainable = clear.clear_state_dict_keys(_student(data))
    assert set(module) == set(trainable)  # frozen weights are not copied into every checkpoint

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-1", resumed / "checkpoint-1")
    launch(resumed, "--resume_from_checkpoint", "latest")
    ds = load_file(str(full / "clear_local_2.safetensors"))
    ds_resumed = load_file(str(resumed / "clear_local_2.safetensors"))
    plain = load_file(str(distilled["out"] / "checkpoint-2" / "clear_local_2.safetensors"))  # same data, noise, steps
    assert ds.keys() == set(trainable)
    for k in ds:
        torch.testing.assert_close(ds_resumed[k], ds[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ds[k], plain[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(ds[k], p) for k, p in trainable.items())


def _student(data):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(data["pipeline"], subfolder="transformer")
    clear.apply_clear(model, radius=2)
    return model


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data, tmp_path):
    """Two processes over gloo without GPUs: the cache script splits the samples between ranks and
    distill.py trains with DDP, each rank keeping its own data position in the checkpoint."""
    env = {**run_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cache = tmp_path / "cache"
    proc = subprocess.run([*torchrun, str(REPO / "scripts" / "cache_latent_codes.py"),
                           "--pretrained_model_name_or_path", data["pipeline"], "--data_root",
                           str(data["root"] / "data"), "--cache_dir", str(cache), "--resolution", "16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "rank 0/2: 3 latent codes" in proc.stdout and "rank 1/2: 2 latent codes" in proc.stdout
    assert len(list((cache / "latent_codes").rglob("*.safetensors"))) == 5

    out = tmp_path / "run"
    proc = subprocess.run([*torchrun, str(REPO / "scripts" / "distill.py"), "--pretrained_model_name_or_path",
                           data["pipeline"], "--data_root", str(data["root"] / "data"), "--output_dir", str(out),
                           "--use_cached_prompt_embed", "--use_cached_latent", *DISTILL, "--train_batch_size", "1",
                           "--gradient_accumulation_steps", "2", "--max_train_steps", "2",
                           "--checkpointing_steps", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "1 per process x 2 accumulation x 2 processes" in proc.stderr
    states = [json.loads((out / "checkpoint-2" / f"data_state.rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["samples_drawn"] for s in states] == [4, 4]
    assert (out / "clear_local_2.safetensors").is_file()


def test_sd3_raw_prompts_and_images_train_like_the_caches(sd3, distilled_sd3, tmp_path):
    """Without the caches, distill.py encodes prompts (three encoders) and images itself: the first step's losses
    equal the cached run's (same data order, noise and timesteps)."""
    result = distill.main(["--pretrained_model_name_or_path", sd3["pipeline"], "--model_family", "sd3", "--data_root",
                           str(sd3["root"] / "data"), "--output_dir", str(tmp_path / "raw"), *DISTILL_SD3,
                           "--max_train_steps", "1"])
    got, want = result["history"][0], distilled_sd3["result"]["history"][0]
    for k in ("loss", "loss_fm", "loss_distill", "loss_attn"):
        assert got[k] == pytest.approx(want[k], rel=1e-4), k


# ------------------------------------------------------------------------------------------
# distill.py fails loudly instead of silently: non-finite steps, honest resume (settings, data,
# damaged checkpoints), one run per output folder, every check before the models load, full disks,
# truncated shards, distinct bad-sample counts, and the release's L_attn layers
# ------------------------------------------------------------------------------------------

def distill_args(data, out, *extra):
    return ["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(data["root"] / "data"),
            "--output_dir", str(out), "--use_cached_prompt_embed", "--use_cached_latent", *DISTILL,
            "--learning_rate", "1e-3", *extra]


def listing(folder: Path) -> dict:
    """Every file under ``folder`` with its size: to show that a refused run wrote nothing."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Replaces the heavy part (models, loop) with a recorder: a check that refuses first leaves it uncalled."""
    calls = []
    monkeypatch.setattr(distill, "train", lambda *a, **k: calls.append(a) or {"lock": _lock_holder(a[0])})
    return calls


def _lock_holder(args):
    return json.loads((Path(args.output_dir) / LOCK).read_text())


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    result = distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    reset_accelerate_state()
    return dict(out=out, result=result)


def copy_run(run2, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run2["out"], out)
    return out


# ------------------------------------------------------------------------------------------
# non-finite training
# ------------------------------------------------------------------------------------------

def test_divergence_stops_before_saving_and_keeps_the_last_finite_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    args = distill_args(data, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30", "--max_train_steps", "6",
                        "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    with pytest.raises(SystemExit) as e:
        distill.main(args)
    message = str(e.value.code)
    assert message.startswith("training diverged at step 2: ") and "nan" in message, message
    assert "the last checkpoint, checkpoint-1, holds finite weights" in message
    assert "--allow_changed_settings" in message  # how to resume with a lower learning rate
    # step 1 (finite, if absurd) was saved; nothing of step 2, no final weights, no temp folder, no lock
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    weights = load_file(str(out / "checkpoint-1" / "clear_local_2.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert checkpoint_problem(out / "checkpoint-1") is None


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    """An optimizer step that leaves a NaN in the weights (injected) with a finite loss and gradient:
    the checkpoint of that step is refused before anything is written."""
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^step 1: the CLEAR weights \S+ are not finite; nothing was saved"):
        distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_deepspeed_divergence_stops_before_saving(data, tmp_path):
    """Under DeepSpeed ZeRO-2 (fp32, CPU) the optimizer step runs inside backward: the check reads the
    global gradient norm DeepSpeed returns and the losses, and stops before the checkpoint of that step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "deepspeed_cpu.yaml"), str(REPO / "scripts" / "distill.py"),
           *distill_args(data, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30", "--max_train_steps", "4",
                         "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "training diverged at step 2: " in proc.stderr, proc.stderr[-5000:]
    assert "the last checkpoint, checkpoint-1, holds finite weights" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no final weights, no temp folder, no lock
    weights = load_file(str(out / "checkpoint-1" / "clear_local_2.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


# ------------------------------------------------------------------------------------------
# honest resume
# ------------------------------------------------------------------------------------------

def test_checkpoints_record_settings_dataset_and_manifest(run2):
    ckpt = run2["out"] / "checkpoint-2"
    settings = json.loads((ckpt / "run_settings.json").read_text())
    assert settings["learning_rate"] == 1e-3 and settings["seed"] == 0 and settings["num_processes"] == 1
    state = json.loads((ckpt / "data_state.rank0.json").read_text())
    assert state["dataset"]["num_samples"] == 5 and len(state["dataset"]["sha256"]) == 64
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"clear_local_2.safetensors", "run_settings.json", "data_state.rank0.json", "optimizer.bin"} <= set(manifest)
    assert not (run2["out"] / LOCK).exists()  # released at the end


def test_resume_refuses_changed_settings_before_loading_models(run2, data, tmp_path, no_training):
    out = copy_run(run2, tmp_path)
    before = listing(out)
    args = distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    with pytest.raises(SystemExit) as e:
        distill.main(args + ["--learning_rate", "5e-4", "--seed", "3", "--train_batch_size", "1",
                             "--checkpointing_steps", "5"])
    message = str(e.value.code)
    assert ("checkpoint-2 was written with other settings, and these change the optimisation or the data order"
            in message)
    for line in ("learning_rate: was 0.001, now 0.0005", "seed: was 0, now 3", "train_batch_size: was 2, now 1"):
        assert line in message
    assert "checkpointing_steps" not in message and "max_train_steps" not in message  # harmless ones pass
    assert "--allow_changed_settings" in message
    assert no_training == [] and listing(out) == before


def test_resume_with_allowed_changes_logs_them(run2, data, tmp_path, caplog):
    out = copy_run(run2, tmp_path)
    args = distill_args(data, out, "--max_train_steps", "3", "--checkpointing_steps", "3",
                        "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4", "--allow_changed_settings")
    with caplog.at_level(logging.INFO, logger="distill"):
        result = distill.main(args)
    assert result["start_step"] == 2 and result["global_step"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--allow_changed_settings: resuming" in w and "learning_rate: was 0.001, now 0.0005" in w
               for w in warned), warned
    info = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "checkpointing_steps: was 1, now 3" in info and "max_train_steps: was 2, now 3" in info
    assert json.loads((out / "checkpoint-3" / "run_settings.json").read_text())["learning_rate"] == 5e-4


def test_resume_trains_with_the_changed_learning_rate_and_schedule(run2, data, tmp_path, monkeypatch):
    """--allow_changed_settings with a new learning rate, schedule, warm-up and weight decay: the resumed steps use
    them (the restored scheduler and optimizer states do not bring the checkpoint's back), and the checkpoint records
    them. The expected rates are diffusers' linear schedule with warm-up, from the new base rate."""
    from diffusers.optimization import get_scheduler

    out = copy_run(run2, tmp_path)
    shutil.rmtree(out / "checkpoint-2")
    used = []  # (lr, weight_decay) of each optimizer step
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        used.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    changed = ["--learning_rate", "5e-4", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
               "--adam_weight_decay", "0.25"]
    result = distill.main(distill_args(data, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                       "--resume_from_checkpoint", "latest", "--allow_changed_settings", *changed))
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
    reference = get_scheduler("linear", optimizer=sgd, num_warmup_steps=2, num_training_steps=3)
    want = []
    for _ in range(3):  # the rate of optimizer steps 1, 2, 3; the resumed run makes steps 2 and 3
        want.append(reference.get_last_lr()[0])
        sgd.step()
        reference.step()
    assert result["start_step"] == 1 and want[1:] == [2.5e-4, 5e-4]
    assert used == [(lr, 0.25) for lr in want[1:]], used
    assert [logs["lr"] for logs in result["history"]] == [5e-4, 0.0]  # the rate after each step, as logged
    settings = json.loads((out / "checkpoint-3" / "run_settings.json").read_text())
    assert (settings["learning_rate"], settings["lr_scheduler"], settings["lr_warmup_steps"],
            settings["adam_weight_decay"]) == (5e-4, "linear", 2, 0.25)


def test_resume_refuses_a_changed_dataset(run2, data, tmp_path, no_training):
    out = copy_run(run2, tmp_path)
    fewer = tmp_path / "data"
    fewer.mkdir()
    for shard in ("shard-00000.tar", "shard-00001.tar"):  # shard-00002 (1 sample) removed after the kill
        shutil.copy(data["root"] / "data" / shard, fewer)
    args = distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                        "--data_root", str(fewer), "--cache_dir", str(data["root"] / "data_cache"))
    before = listing(out)
    with pytest.raises(SystemExit, match=r"the dataset in \S+ changed since checkpoint-2 was written: it had 5 "
                                         r"samples, now 4\. The saved data position refers to the old data"):
        distill.main(args)
    assert no_training == [] and listing(out) == before


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run2, data, tmp_path, caplog):
    out = copy_run(run2, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)
    args = distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                        "--resume_from_checkpoint", "latest")
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(args)
    assert result["start_step"] == 1 and len(result["history"]) == 1
    assert any(f"checkpoint-2 is damaged (optimizer.bin has {size // 2} bytes, {size} were written): resuming from "
               "checkpoint-1 instead; the damaged one is kept as checkpoint-2.damaged" in r.getMessage()
               for r in caplog.records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-2.damaged"]
    assert checkpoint_problem(out / "checkpoint-2") is None
    want = load_file(str(run2["out"] / "checkpoint-2" / "clear_local_2.safetensors"))
    got = load_file(str(out / "checkpoint-2" / "clear_local_2.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # the same step from the same state: the same weights
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    with pytest.raises(SystemExit, match=r"checkpoint-2.damaged is not a checkpoint folder"):
        distill.main(args[:-1] + [str(out / "checkpoint-2.damaged")])


def _flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_a_changed_checkpoint_file_is_refused_before_anything_loads(run2, data, tmp_path, no_training, caplog):
    """A file of the checkpoint changed after it was written (same size): its SHA-256 no longer matches the
    manifest's. Named explicitly it is refused; 'latest' falls back to the previous checkpoint. Nothing is
    loaded (unpickled) from it: the check runs before the models load."""
    out = copy_run(run2, tmp_path)
    _flip_a_byte(out / "checkpoint-2" / "optimizer.bin")
    before = listing(out)
    ckpt = out / "checkpoint-2"
    with pytest.raises(SystemExit) as e:
        distill.main(distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", str(ckpt)))
    assert str(e.value.code) == (
        f"--resume_from_checkpoint {ckpt} cannot be used: optimizer.bin is not the file that was written (its "
        "SHA-256 differs from the one in manifest.json). Resume from an earlier checkpoint (a checkpoint holds "
        "pickles, which loading runs as code: use only folders you trust)")
    assert no_training == [] and listing(out) == before
    with caplog.at_level(logging.WARNING, logger="distill"):
        distill.main(distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert no_training[0][5] == out / "checkpoint-1"  # train() was handed the previous checkpoint
    assert any(m.startswith("checkpoint-2 is damaged (optimizer.bin is not the file that was written") and
               "resuming from checkpoint-1 instead" in m for m in caplog.messages)


def test_a_checkpoint_copied_without_its_manifest_says_so(run2, data, tmp_path, no_training):
    copied = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(run2["out"] / "checkpoint-2", copied, ignore=shutil.ignore_patterns("*.json"))
    with pytest.raises(SystemExit) as e:
        distill.main(distill_args(data, tmp_path / "run", "--max_train_steps", "3",
                                  "--resume_from_checkpoint", str(copied)))
    message = str(e.value.code)
    assert message.startswith(f"--resume_from_checkpoint {copied} cannot be used: it has no manifest.json (written "
                              "last, when a checkpoint is complete): copy the whole folder"), message
    assert "another number of processes" not in message and no_training == []


def test_latest_falls_back_past_non_finite_weights(run2, data, tmp_path, no_training, caplog):
    from clear.checkpointing import write_manifest
    from safetensors.torch import save_file

    out = copy_run(run2, tmp_path)
    weights = out / "checkpoint-2" / "clear_local_2.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(weights), metadata=metadata)
    write_manifest(out / "checkpoint-2")  # a complete, consistent checkpoint, but NaN weights
    with caplog.at_level(logging.WARNING, logger="distill"):
        distill.main(distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert no_training[0][5] == out / "checkpoint-1"
    assert any(m.startswith(f"checkpoint-2 is damaged (its CLEAR weights {name} are not finite): resuming from "
                            "checkpoint-1 instead") for m in caplog.messages), caplog.messages
    copied = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2.damaged", copied)
    with pytest.raises(SystemExit, match=rf"^--resume_from_checkpoint \S+ cannot be used: its CLEAR weights {name} "
                                         "are not finite. Resume from an earlier checkpoint"):
        distill.main(distill_args(data, tmp_path / "run2", "--max_train_steps", "3", "--resume_from_checkpoint",
                                  str(copied)))


def test_a_locked_output_dir_is_refused_naming_the_holder(data, tmp_path, no_training, caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "since": "2026-01-01 00:00:00"}
        (out / LOCK).write_text(json.dumps(lock))
        with pytest.raises(SystemExit) as e:
            distill.main(distill_args(data, out, "--max_train_steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    message = str(e.value.code)
    assert f"is in use by another run (pid {holder.pid} on {lock['host']}, since 2026-01-01 00:00:00)" in message
    assert "choose another --output_dir" in message
    assert no_training == [] and json.loads((out / LOCK).read_text()) == lock
    assert list(listing(out)) == [LOCK]  # nothing else written

    # the holder is gone now: its lock is stale and taken over, with a warning; released at the end
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(distill_args(data, out, "--max_train_steps", "1"))
    assert result["lock"]["pid"] == os.getpid()  # held while training
    assert any(f"its holder, pid {holder.pid} on {lock['host']}, is no longer running" in r.getMessage()
               for r in caplog.records)
    assert not (out / LOCK).exists()


def test_an_unwritable_output_dir_is_refused_before_loading_models(data, tmp_path, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^--output_dir \S+a_file/run is not a writable folder \(Not a directory\)"):
        distill.main(distill_args(data, blocker / "run", "--max_train_steps", "1"))
    assert no_training == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "optimizer.bin"),
                                   RuntimeError("basic_ios::clear: iostream error")], ids=["ENOSPC", "iostream"])
def test_a_full_disk_names_the_checkpoint_and_the_free_space(data, tmp_path, monkeypatch, error):
    from accelerate import Accelerator

    def full_disk(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise error

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    message = str(e.value.code)
    cause = "the disk is full (No space left on device: optimizer.bin)" if isinstance(error, OSError) else \
        "a write failed (basic_ios::clear: iostream error)"
    assert message.startswith(f"could not write the checkpoint {out / 'checkpoint-1'}: {cause}; "), message
    assert " free on that disk. The earlier checkpoints are intact" in message
    free = message.split("; ")[1].split(" free on")[0]
    assert free.split()[-1] in ("B", "KB", "MB", "GB", "TB") and float(free.split()[0]) >= 0
    assert list(out.iterdir()) == []  # the partial checkpoint-1.tmp is removed, the lock released


def test_a_full_disk_in_the_safetensors_writer_leaves_no_tmp(data, tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError (not an OSError) when the disk fills; the fault-injecting
    writer writes half a file first, as a real one would."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    message = str(e.value.code)
    assert message.startswith(f"could not write the checkpoint {out / 'checkpoint-1'}: the disk is full "
                              "(Error while serializing: IoError("), message
    assert " free on that disk. The earlier checkpoints are intact" in message and "\n" not in message
    assert list(out.iterdir()) == []  # no checkpoint-1.tmp, no half file, the lock released


def test_an_output_dir_made_read_only_mid_run_gives_one_message(data, tmp_path, monkeypatch, caplog):
    """The folder turns read-only after the run took it: the checkpoint cannot be written, nor can the lock be
    removed. The message is the permission one, and releasing the lock adds no second (chained) error. The
    tests run as root, whom chmod does not stop: the two failing calls are injected."""
    from accelerate import Accelerator

    def read_only(self, output_dir, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(output_dir))

    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == LOCK:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Accelerator, "save_state", read_only)
    monkeypatch.setattr(Path, "unlink", unlink)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        with pytest.raises(SystemExit) as e:
            distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    message = str(e.value.code)
    assert message.startswith(f"could not write the checkpoint {out / 'checkpoint-1'}: {out} is not writable "
                              "(Permission denied: "), message
    assert f"fix the permissions of {out}" in message and "resume with --resume_from_checkpoint latest" in message
    assert any(m.startswith(f"could not remove the lock {out / LOCK}") for m in caplog.messages), caplog.messages


# ------------------------------------------------------------------------------------------
# a truncated shard: one line, no traceback
# ------------------------------------------------------------------------------------------

def _truncated_copy(data, tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    blob = (data["root"] / "data" / "shard-00000.tar").read_bytes()
    with tarfile.open(data["root"] / "data" / "shard-00000.tar") as tf:
        second = tf.getmembers()[1]
    (root / "shard-00000.tar").write_bytes(blob[: second.offset_data + 10])  # cut inside the second member
    return root


def test_a_truncated_shard_exits_with_its_message_and_no_traceback(data, tmp_path):
    root = _truncated_copy(data, tmp_path)
    want = f"{root / 'shard-00000.tar'} is not a readable (uncompressed) tar file"
    for script in (cache_prompt_embeds, cache_latent_codes):
        with pytest.raises(SystemExit, match=r"re-download or regenerate it") as e:
            script.main(["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(root)])
        assert str(e.value.code).startswith(want)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "distill.py"), *distill_args(
        data, tmp_path / "run", "--data_root", str(root), "--cache_dir", str(data["root"] / "data_cache"))],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before the output folder is touched


def test_launched_refusals_and_failures_are_one_line(data, tmp_path):
    """`--accelerate_config CONFIG`: the checks run in this process before any worker starts (a truncated shard:
    one line), and a failure inside the launched worker (divergence at step 2) is its one line, exit 1, without
    accelerate's CalledProcessError traceback (which a plain `accelerate launch` prints after it)."""
    root = _truncated_copy(data, tmp_path)
    launch = [sys.executable, str(REPO / "scripts" / "distill.py"), "--accelerate_config",
              str(REPO / "configs" / "cpu.yaml")]
    proc = subprocess.run([*launch, *distill_args(data, tmp_path / "run", "--data_root", str(root), "--cache_dir",
                                                  str(data["root"] / "data_cache"))],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{root / 'shard-00000.tar'} is not a readable"), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()

    out = tmp_path / "diverges"
    proc = subprocess.run([*launch, *distill_args(data, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30",
                                                  "--max_train_steps", "3", "--checkpointing_steps", "1")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "training diverged at step 2: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


# ------------------------------------------------------------------------------------------
# bad samples: distinct files, once
# ------------------------------------------------------------------------------------------

def test_bad_samples_count_distinct_files_across_epochs(data, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(data["root"] / "data", root)
    bad_ids = [f"uncached{i}" for i in range(5)]
    for sid in bad_ids:  # samples whose features are not in the cache
        (root / f"{sid}.json").write_text('{"prompt": "a red cat"}')
    out = tmp_path / "run"
    args = distill_args(data, out, "--data_root", str(root), "--cache_dir", str(data["root"] / "data_cache"),
                        "--max_train_steps", "12", "--checkpointing_steps", "6")
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(args)
    bad = result["bad_samples"]
    state = json.loads((out / "checkpoint-12" / "data_state.rank0.json").read_text())
    assert state["samples_drawn"] >= 2 * 10  # two epochs of the 10 samples or more: every bad one met twice
    assert sorted(bad.ids()) == bad_ids and len(bad) == 5 and bad.encounters >= 10
    assert result["history"][-1]["bad_samples"] == 5
    assert len(state["bad_samples"]["items"]) == 5 and state["bad_samples"]["encounters"] == bad.encounters
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    assert sorted(m.split()[3].rstrip(":") for m in skipped) == bad_ids  # each logged once
    assert bad.report().startswith(f"skipped 5 bad sample(s) ({bad.encounters} times in all): 5 not cached")


# ------------------------------------------------------------------------------------------
# the release's attention-loss layers
# ------------------------------------------------------------------------------------------

def test_flux_default_attention_loss_layers_are_the_releases():
    """FLUX.1-dev's layout (19 double, 38 single blocks; tiny width): the default selects single
    blocks 1, 5, ..., 37, i.e. the attention modules whose index among all 57 is divisible by 4."""
    model = tiny_flux(num_layers=19, num_single_layers=38)
    clear.apply_clear(model, radius=2, backend="dense")
    assert FAMILIES["flux"].attn_loss_layers == "single:4:1"
    chosen = attention_layers(model)
    assert chosen == [f"single_transformer_blocks.{i}.attn" for i in range(1, 38, 4)]
    every = [n for n, m in model.named_modules() if hasattr(m, "processor") and n.endswith(".attn")]
    assert len(every) == 57 and chosen == [n for i, n in enumerate(every) if i % 4 == 0 and n.startswith("single")]
    training_doc = (REPO / "docs" / "training.md").read_text()
    assert "single:4:1" in training_doc and "1, 5, …, 37" in training_doc
