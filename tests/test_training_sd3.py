"""Training SD3 / SD3.5 end to end on the tiny offline SD3.5-Medium-like pipeline (three text encoders, a
dual-attention block): the teacher generates data, the three encoders' and the VAE's features are cached as the
pipeline computes them, the objective follows diffusers' SD3 training (unpacked latents, timestep = sigma * 1000),
the loss falls, only CLEAR parameters train, and the exported file loads into SD3 models only."""

import copy
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from scripts_loader import reset_accelerate_state
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import clear
from clear.data import LATENT_CODES, PROMPT_EMBEDS, check_cache, read_image
from clear.distill import attention_layers, distill_losses, freeze_for_distillation, sample_timesteps
from clear.families import FAMILIES, resolve_family
from clear.shards import index_samples
from tiny_models import tiny_flux, tiny_sd3, tiny_sd3_pipeline

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import cache_latent_codes  # noqa: E402
import cache_prompt_embeds  # noqa: E402
import distill  # noqa: E402
import generate_data  # noqa: E402

PROMPTS = ["a small blue plane", "a red cat", "a dog in the city", "a house over the river"]
# 16 px images -> 8x8 latents (VAE factor 2) -> 4x4 tokens (patch 2), radius 2 (local), 77 + 8 text tokens
DISTILL = ["--resolution", "16", "--radius", "2", "--attn_backend", "dense", "--train_batch_size", "2",
           "--dataloader_num_workers", "0", "--max_sequence_length", "8", "--mixed_precision", "no",
           "--report_to", "none", "--learning_rate", "1e-3"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3.5-Medium-like pipeline on disk, its self-generated shards and both feature caches."""
    root = tmp_path_factory.mktemp("training-sd3")
    tiny_sd3_pipeline().save_pretrained(root / "pipe")
    pipe = str(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    gen = generate_data.main(["--pretrained_model_name_or_path", pipe, "--prompts", str(root / "prompts.txt"),
                              "--output_dir", str(root / "data"), "--samples_per_shard", "2", "--batch_size", "2",
                              "--height", "16", "--width", "16", "--num_inference_steps", "2",
                              "--max_sequence_length", "8"])
    model = ["--pretrained_model_name_or_path", pipe, "--data_root", str(root / "data")]
    prompts = cache_prompt_embeds.main(model + ["--max_sequence_length", "8"])
    latents = cache_latent_codes.main(model + ["--resolution", "16"])
    return dict(root=root, pipe=pipe, gen=gen, prompts=prompts, latents=latents,
                cache=Path(str(root / "data") + "_cache"))


def test_family_is_read_from_the_model(sd3, tiny_flux_pipeline_dir):
    assert resolve_family(None, sd3["pipe"]) is FAMILIES["sd3"]
    assert resolve_family("auto", tiny_flux_pipeline_dir) is FAMILIES["flux"]
    with pytest.raises(ValueError, match="is a sd3 model .*not flux"):
        resolve_family("flux", sd3["pipe"])
    with pytest.raises(SystemExit, match="is a sd3 model"):
        distill.main(["--pretrained_model_name_or_path", sd3["pipe"], "--model_family", "flux", "--data_root",
                      str(sd3["root"] / "data"), "--output_dir", str(sd3["root"] / "never")])
    # SD3's positions are a fixed table: pos_embed_max_size 32 tokens = 128 pixels here
    with pytest.raises(SystemExit, match="positions for at most 32"):
        distill.main(["--pretrained_model_name_or_path", sd3["pipe"], "--data_root", str(sd3["root"] / "data"),
                      "--output_dir", str(sd3["root"] / "never"), "--resolution", "132"])


def test_sd3_teacher_generates_data(sd3):
    out = sd3["root"] / "data"
    assert sd3["gen"]["written"] == 4
    settings = json.loads((out / ".generation.json").read_text())
    assert settings["guidance_scale"] == 4.5  # SD3.5-Medium's (dual attention) classifier-free guidance
    assert settings["max_sequence_length"] == 8
    with tarfile.open(out / "shard-00001.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert sorted(members) == ["00000002.jpg", "00000002.json", "00000003.jpg", "00000003.json"]
    assert json.loads(members["00000003.json"])["prompt"] == PROMPTS[3]
    from PIL import Image

    assert Image.open(io.BytesIO(members["00000003.jpg"])).size == (16, 16)


def test_sd3_caches_equal_the_pipeline_encoders(sd3):
    """The three text encoders as StableDiffusion3Pipeline.encode_prompt gives them; VAE mean/std as its own encode."""
    from diffusers import StableDiffusion3Pipeline

    assert sd3["prompts"].written == sd3["latents"].written == 4
    sample = next(s for s in index_samples(sd3["root"] / "data") if s.id == "shard-00001/00000003")
    emb_path = sd3["cache"] / "prompt_embeds" / "shard-00001" / "00000003.safetensors"
    emb = load_file(str(emb_path))
    assert emb["prompt_embeds"].shape == (77 + 8, 32) and emb["pooled_prompt_embeds"].shape == (16,)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3["pipe"])
    ref, _, pooled, _ = pipe.encode_prompt(PROMPTS[3], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                                           max_sequence_length=8)
    torch.testing.assert_close(emb["prompt_embeds"], ref[0])
    torch.testing.assert_close(emb["pooled_prompt_embeds"], pooled[0])

    lat = load_file(str(sd3["cache"] / "latent_codes" / "shard-00001" / "00000003.safetensors"))
    with torch.no_grad():
        dist = pipe.vae.encode(read_image(sample, 16)[None]).latent_dist
    assert lat["latent_mean"].shape == (4, 8, 8)  # the VAE's layout, not packed
    torch.testing.assert_close(lat["latent_mean"], dist.mean[0])
    torch.testing.assert_close(lat["latent_std"], dist.std[0])

    with safe_open(str(emb_path), framework="pt") as f:
        assert f.metadata()["family"] == "sd3"
    check_cache(sd3["cache"], PROMPT_EMBEDS, "sd3")
    for kind in (PROMPT_EMBEDS, LATENT_CODES):
        with pytest.raises(ValueError, match="made with a sd3 model's encoders, but this run trains a flux model"):
            check_cache(sd3["cache"], kind, "flux")


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


def test_sd3_losses_decrease_on_a_fixed_batch():
    """On a batch the teacher explains exactly (x0 and noise built from its own velocity, as on self-generated data), a
    student with perturbed CLEAR weights (joint attention and SD3.5's image-only attn2) brings the losses down."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm").requires_grad_(False)
    student = copy.deepcopy(teacher)
    clear.apply_clear(student, radius=2, backend="dense")
    params = freeze_for_distillation(student)
    assert any(".attn2." in k for k in params)
    assert attention_layers(student) == ["transformer_blocks.0.attn"]  # default: every 4th joint block's attn
    layers = attention_layers(student, "joint:1,transformer_blocks.0.attn2")
    assert layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.0.attn2"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    timesteps, sigmas = sample_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 2, "logit_normal", generator=g)
    prompt, pooled = torch.randn(2, 6, 32, generator=g), torch.randn(2, 16, generator=g)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        v = teacher(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=prompt, pooled_projections=pooled,
                    return_dict=False)[0]
    s = sigmas.view(-1, 1, 1, 1)
    x0, noise = x_t - s * v, x_t + (1 - s) * v  # (1 - s) x0 + s noise = x_t and noise - x0 = v

    opt = torch.optim.AdamW(params.values(), lr=3e-3)
    history = []
    for _ in range(15):
        losses = distill_losses(student, teacher, x0, noise, timesteps, sigmas, prompt, pooled, layers)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        history.append(losses.items())
    first, last = history[0], history[-1]
    assert first["loss_fm"] == pytest.approx(first["loss_distill"], rel=1e-4)  # the teacher is exact on this batch
    for name in ("loss_distill", "loss_attn", "loss"):
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])


@pytest.fixture(scope="module")
def distilled(sd3, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill-sd3") / "run"
    args = ["--pretrained_model_name_or_path", sd3["pipe"], "--data_root", str(sd3["root"] / "data"),
            "--output_dir", str(out), "--use_cached_prompt_embed", "--use_cached_latent", *DISTILL,
            "--max_train_steps", "3", "--checkpointing_steps", "3", "--validation_prompt", "a red cat",
            "--validation_steps", "3", "--num_validation_inference_steps", "2"]
    result = distill.main(args)
    reset_accelerate_state()
    return dict(out=out, result=result)


def test_sd3_distill_trains_only_clear_parameters_and_exports(sd3, distilled):
    from diffusers import SD3Transformer2DModel

    out, result = distilled["out"], distilled["result"]
    assert result["global_step"] == 3
    for logs in result["history"]:
        assert all(map(torch.isfinite, torch.tensor([logs[k] for k in ("loss", "loss_fm", "loss_distill",
                                                                       "loss_attn")])))
        assert logs["loss_attn"] > 0 and logs["loss_distill"] > 0 and logs["bad_samples"] == 0

    original = SD3Transformer2DModel.from_pretrained(sd3["pipe"], subfolder="transformer")
    student = result["student"]
    trained = clear.clear_state_dict_keys(student)
    assert any(".attn2." in k for k in trained) and len(trained) == 24
    before, after = original.state_dict(), student.state_dict()
    assert set(after) == set(before)
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"

    path = out / "clear_local_2.safetensors"
    fresh = SD3Transformer2DModel.from_pretrained(sd3["pipe"], subfolder="transformer")
    clear.apply_clear(fresh, radius=2)
    clear.load_clear_weights(fresh, path)
    for k, p in clear.clear_state_dict_keys(fresh).items():
        assert torch.equal(p, trained[k])
    flux = tiny_flux()
    clear.apply_clear(flux, radius=2)
    with pytest.raises(ValueError, match="CLEAR weights for a sd3 model, not flux"):
        clear.load_clear_weights(flux, path)
    assert (out / "checkpoint-3" / "clear_local_2.safetensors").is_file()
    from PIL import Image

    assert Image.open(out / "validation" / "step-000003.png").size == (32, 16)  # teacher | student, with CFG


def test_sd3_raw_prompts_and_images_train_like_the_caches(sd3, distilled, tmp_path):
    """Without the caches, distill.py encodes prompts (three encoders) and images itself: the first step's losses
    equal the cached run's (same data order, noise and timesteps)."""
    result = distill.main(["--pretrained_model_name_or_path", sd3["pipe"], "--model_family", "sd3", "--data_root",
                           str(sd3["root"] / "data"), "--output_dir", str(tmp_path / "raw"), *DISTILL,
                           "--max_train_steps", "1"])
    got, want = result["history"][0], distilled["result"]["history"][0]
    for k in ("loss", "loss_fm", "loss_distill", "loss_attn"):
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
