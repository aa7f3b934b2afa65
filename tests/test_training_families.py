"""Training from data for FLUX.2 and Qwen-Image (clear/families/flux2.py, qwenimage.py): both cache scripts and
scripts/distill.py on a small written data set (5 random 16 px images with prompts), on the tiny pipelines.

Qwen-Image and FLUX.2-klein run everything from text: their tiny Qwen2.5-VL / Qwen3 text encoders and byte-level
tokenizers are built offline. FLUX.2-dev's text encoder (Mistral 3) needs its processor from the Hub, so its prompt
cache is written by the cache writer with fixed random embeddings in the cached layout (the transformer-level
input); its latent cache comes from the script and Flux2Pipeline's own VAE encoding. Each case: the caches equal
the pipeline's own encoders, a 2-step distill.py run stays finite, its first loss is the library objective
(clear.distill.distill_losses) on the same batch built here from the cache files, its checkpoint loads back (and is
refused by the other family), and training from raw images (and raw prompts, where the text encoder is built)
gives the cached run's first loss."""

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scripts_loader import load_script, reset_accelerate_state

import clear
from clear.data import (LATENT_CODES, PROMPT_EMBEDS, DistillDataset, TrainingBatches, check_cache, read_image,
                        write_feature_cache)
from clear.distill import attention_layers, distill_losses, sample_timesteps
from clear.families import get_family
from clear.shards import index_samples
from tiny_models import tiny_flux2_klein_pipeline, tiny_flux2_pipeline, tiny_qwenimage_pipeline

cache_latent_codes, cache_prompt_embeds = load_script("cache_latent_codes"), load_script("cache_prompt_embeds")
distill = load_script("distill")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPTS = ["a small blue plane", "a red cat", "a dog in the city at night", "a house over the river", "a tree"]
# Qwen-Image text tokens (byte-level, the template's rest included): longer than every prompt, so the cache holds
# padded rows (mask 0)
TEXT_LEN = 192
DISTILL = ["--resolution", "16", "--radius", "2", "--attn_backend", "dense", "--train_batch_size", "2",
           "--dataloader_num_workers", "0", "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "1e-3",
           "--max_train_steps", "2", "--checkpointing_steps", "2"]


def write_data(root):
    """5 loose samples: <key>.jpg (random 16x16) + <key>.json with the prompt."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(PROMPTS):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        (root / f"{i:04d}.jpg").write_bytes(buf.getvalue())
        (root / f"{i:04d}.json").write_text(json.dumps({"prompt": prompt}))
    return root


def flux2_stand_in_embeds(prompts):
    """FLUX.2's stand-in text: fixed random [8, 32] token embeddings per prompt (its Mistral 3 is not built offline)."""
    rows = [torch.randn(8, 32, generator=torch.Generator().manual_seed(PROMPTS.index(p))) for p in prompts]
    return {"prompt_embeds": torch.stack(rows)}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-qwen")
    pipe = tiny_qwenimage_pipeline(text_encoder=True)
    pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 1.0])  # not a no-op
    pipe.save_pretrained(root / "pipe")
    model = ["--pretrained_model_name_or_path", str(root / "pipe"), "--data_root", str(write_data(root / "data"))]
    prompts = cache_prompt_embeds.main(model + ["--max_sequence_length", str(TEXT_LEN), "--batch_size", "3"])
    latents = cache_latent_codes.main(model + ["--resolution", "16", "--batch_size", "3"])
    return dict(root=root, pipeline=str(root / "pipe"), model=model, prompts=prompts, latents=latents,
                cache=root / "data_cache", text=["--max_sequence_length", str(TEXT_LEN)])


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-flux2")
    _set_bn(tiny_flux2_pipeline()).save_pretrained(root / "pipe")
    data = write_data(root / "data")
    model = ["--pretrained_model_name_or_path", str(root / "pipe"), "--data_root", str(data)]
    prompts = write_feature_cache(index_samples(data), PROMPT_EMBEDS, root / "data_cache",
                                  read=lambda s: json.loads(s.read("json"))["prompt"], encode=flux2_stand_in_embeds,
                                  metadata={"model": str(root / "pipe"), "family": "flux2", "max_sequence_length": 8},
                                  progress=False)
    latents = cache_latent_codes.main(model + ["--resolution", "16", "--batch_size", "3"])
    return dict(root=root, pipeline=str(root / "pipe"), model=model, prompts=prompts, latents=latents,
                cache=root / "data_cache", text=["--max_sequence_length", "8"])


def _set_bn(pipe):
    g = torch.Generator().manual_seed(5)
    pipe.vae.bn.running_mean.copy_(torch.randn(pipe.vae.bn.running_mean.shape, generator=g) * 0.1)
    pipe.vae.bn.running_var.copy_(torch.rand(pipe.vae.bn.running_var.shape, generator=g) + 0.5)  # not a no-op
    return pipe


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-klein")
    _set_bn(tiny_flux2_klein_pipeline()).save_pretrained(root / "pipe")
    model = ["--pretrained_model_name_or_path", str(root / "pipe"), "--data_root", str(write_data(root / "data"))]
    prompts = cache_prompt_embeds.main(model + ["--max_sequence_length", "16", "--batch_size", "3"])
    latents = cache_latent_codes.main(model + ["--resolution", "16", "--batch_size", "3"])
    return dict(root=root, pipeline=str(root / "pipe"), model=model, prompts=prompts, latents=latents,
                cache=root / "data_cache", text=["--max_sequence_length", "16"])


def test_flux2_klein_prompt_cache_is_the_pipelines_own_encoding(klein):
    """Flux2KleinPipeline.encode_prompt (Qwen3 hidden layers 9, 18, 27 side by side), 16 tokens; the folder's own
    pipeline class encodes, not Flux2Pipeline's Mistral template."""
    from diffusers import Flux2KleinPipeline

    assert klein["prompts"].written == 5 and klein["latents"].written == 5
    pipe = Flux2KleinPipeline.from_pretrained(klein["pipeline"], transformer=None, vae=None)
    for sample, prompt in list(zip(index_samples(klein["root"] / "data"), PROMPTS))[:2]:
        got = load_file(str(klein["cache"] / "prompt_embeds" / f"{sample.id}.safetensors"))
        assert set(got) == {"prompt_embeds"} and got["prompt_embeds"].shape == (16, 48)
        torch.testing.assert_close(got["prompt_embeds"], pipe.encode_prompt(prompt, max_sequence_length=16)[0][0])
    check_cache(klein["cache"], PROMPT_EMBEDS, "flux2", max_sequence_length=16)


def test_qwenimage_caches_equal_the_pipeline_encoders(qwen):
    """Prompts: QwenImagePipeline.encode_prompt's embeddings and mask, padded to --max_sequence_length (mask 0);
    latents: mean + std * eps is QwenImageImg2ImgPipeline._encode_vae_image's latent for the same noise."""
    from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline

    assert qwen["prompts"].written == 5 and qwen["latents"].written == 5
    pipe = QwenImagePipeline.from_pretrained(qwen["pipeline"], transformer=None)
    cache, samples = qwen["cache"], index_samples(qwen["root"] / "data")
    valid = []
    for sample, prompt in zip(samples, PROMPTS):
        got = load_file(str(cache / "prompt_embeds" / f"{sample.id}.safetensors"))
        assert got["prompt_embeds"].shape == (TEXT_LEN, 32) and got["prompt_embeds_mask"].shape == (TEXT_LEN,)
        want, mask = pipe.encode_prompt(prompt, max_sequence_length=TEXT_LEN)
        n = want.shape[1]
        valid.append(int(got["prompt_embeds_mask"].sum()))
        assert valid[-1] == n < TEXT_LEN and mask is None  # one prompt alone: every token valid
        torch.testing.assert_close(got["prompt_embeds"][:n], want[0])
        assert not got["prompt_embeds"][n:].any() and not got["prompt_embeds_mask"][n:].any()
    assert len(set(valid)) > 1  # prompts of different lengths

    img2img = QwenImageImg2ImgPipeline(**{**pipe.components, "transformer": None})
    for sample in samples[:2]:
        lat = load_file(str(cache / "latent_codes" / f"{sample.id}.safetensors"))
        assert lat["latent_mean"].shape == lat["latent_std"].shape == (4, 8, 8) and (lat["latent_std"] > 0).all()
        with torch.no_grad():
            want = img2img._encode_vae_image(read_image(sample, 16)[None, :, None],
                                             generator=torch.Generator().manual_seed(7))[:, :, 0]
        eps = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(lat["latent_mean"] + lat["latent_std"] * eps[0], want[0])
    check_cache(cache, PROMPT_EMBEDS, "qwenimage", max_sequence_length=TEXT_LEN)
    check_cache(cache, LATENT_CODES, "qwenimage", resolution=16)
    with pytest.raises(ValueError, match="made with a qwenimage model's encoders, but this run trains a flux2 model"):
        check_cache(cache, LATENT_CODES, "flux2")


def test_flux2_latent_cache_is_the_pipelines_own_encoding(flux2):
    """Flux2Pipeline._encode_vae_image (posterior mode, 2x2-patchified, batch-normalised): [16, 4, 4], std 0."""
    from diffusers import Flux2Pipeline

    assert flux2["prompts"].written == 5 and flux2["latents"].written == 5
    pipe = Flux2Pipeline.from_pretrained(flux2["pipeline"], transformer=None, text_encoder=None, tokenizer=None)
    for sample in index_samples(flux2["root"] / "data")[:2]:
        lat = load_file(str(flux2["cache"] / "latent_codes" / f"{sample.id}.safetensors"))
        image = read_image(sample, 16)[None]
        with torch.no_grad():
            want = pipe._encode_vae_image(image, generator=None)[0]
            plain = Flux2Pipeline._patchify_latents(pipe.vae.encode(image).latent_dist.mode())[0]
        assert lat["latent_mean"].shape == (16, 4, 4) and not lat["latent_std"].any()
        torch.testing.assert_close(lat["latent_mean"], want)
        assert (want - plain).abs().max() > 1e-2  # the batch-norm statistics were applied
    check_cache(flux2["cache"], LATENT_CODES, "flux2", resolution=16)


def _distill(case, out, *extra, cached=("--use_cached_prompt_embed", "--use_cached_latent")):
    result = distill.main([*case["model"], "--output_dir", str(out), *cached, *DISTILL, *case["text"], *extra])
    reset_accelerate_state()
    return result


def _first_batch_losses(case, family):
    """The library objective on distill.py's first batch, built here from the cache files: the same samples (its data
    order), x0 = mean + std * eps and the noise and timesteps drawn from the step's seed, the fresh student."""
    fam = get_family(family)
    dataset = DistillDataset(index_samples(case["root"] / "data"), 16)
    ids = TrainingBatches(dataset, 2, seed=0).next()["ids"]
    text = [load_file(str(case["cache"] / "prompt_embeds" / f"{i}.safetensors")) for i in ids]
    lat = [load_file(str(case["cache"] / "latent_codes" / f"{i}.safetensors")) for i in ids]
    g = torch.Generator().manual_seed(distill.step_seed(0, 0, 0, 0))
    mean, std = torch.stack([x["latent_mean"] for x in lat]), torch.stack([x["latent_std"] for x in lat])
    x0 = mean + std * torch.randn(mean.shape, generator=g)  # FLUX.2 and Qwen-Image: no further shift or scale
    noise = torch.randn(x0.shape, generator=g)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(case["pipeline"], subfolder="scheduler")
    timesteps, sigmas = sample_timesteps(scheduler, 2, generator=g)
    second = torch.stack([x["prompt_embeds_mask"] for x in text]) if family == "qwenimage" else None
    teacher = fam.transformer_cls().from_pretrained(case["pipeline"], subfolder="transformer").requires_grad_(False)
    student = fam.transformer_cls().from_pretrained(case["pipeline"], subfolder="transformer")
    clear.apply_clear(student, radius=2, backend="dense")
    with torch.no_grad():
        return distill_losses(student, teacher, x0, noise, timesteps, sigmas,
                              torch.stack([x["prompt_embeds"] for x in text]), second, attention_layers(student),
                              fam.training_guidance(teacher.config, fam.default_guidance_scale(teacher.config)),
                              family=fam).items()


@pytest.mark.parametrize("fixture", ["flux2", "klein", "qwen"])
def test_distill_runs_on_the_caches_like_the_library_objective(fixture, request, tmp_path):
    case = request.getfixturevalue(fixture)
    family = "qwenimage" if fixture == "qwen" else "flux2"
    # Qwen-Image also renders validation images (teacher | student, true CFG with the empty prompt's embeddings)
    validation = (["--validation_prompt", "a red cat", "--num_validation_inference_steps", "2"]
                  if family == "qwenimage" else [])
    result = _distill(case, tmp_path / "run", *validation)
    assert result["global_step"] == 2 and len(result["history"]) == 2
    for logs in result["history"]:
        assert all(np.isfinite([logs[k] for k in ("loss", "loss_fm", "loss_distill", "loss_attn")]))
        assert logs["loss_distill"] > 0 and logs["loss_attn"] > 0 and logs["bad_samples"] == 0
    want = _first_batch_losses(case, family)
    for k, v in want.items():
        assert result["history"][0][k] == pytest.approx(v, rel=1e-4), k

    # the checkpoint loads back into a fresh model of the family; the other family refuses it
    path = tmp_path / "run" / "clear_local_2.safetensors"
    assert (tmp_path / "run" / "checkpoint-2" / "clear_local_2.safetensors").is_file()
    if validation:
        from PIL import Image

        assert Image.open(tmp_path / "run" / "validation" / "step-000002.png").size == (32, 16)
    fam = get_family(family)
    fresh = fam.transformer_cls().from_pretrained(case["pipeline"], subfolder="transformer")
    clear.apply_clear(fresh, radius=2)
    clear.load_clear_weights(fresh, path)
    trained = clear.clear_state_dict_keys(result["student"])
    original = fam.transformer_cls().from_pretrained(case["pipeline"], subfolder="transformer").state_dict()
    for k, p in clear.clear_state_dict_keys(fresh).items():
        assert torch.equal(p, trained[k])
    assert any(not torch.equal(trained[k], original[k]) for k in trained if k in original)
    other = {"flux2": tiny_qwenimage_pipeline, "qwenimage": tiny_flux2_pipeline}[family]().transformer
    clear.apply_clear(other, radius=2)
    with pytest.raises(ValueError, match=f"CLEAR weights for a {family} model"):
        clear.load_clear_weights(other, path)

    # raw images (and Qwen-Image's raw prompts) through the family's encoders: the cached run's first losses
    raw = _distill(case, tmp_path / "raw", "--max_train_steps", "1",
                   cached=("--use_cached_prompt_embed",) if fixture == "flux2" else ())
    for k in ("loss", "loss_fm", "loss_distill", "loss_attn"):
        assert raw["history"][0][k] == pytest.approx(result["history"][0][k], rel=1e-4), k
