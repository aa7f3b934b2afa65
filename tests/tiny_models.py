"""Tiny random-weight diffusers models and their inputs, shared by the tests."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

import clear
import clear.inference as inf

# scripts/generate.py's options for a quick run of a tiny pipeline (tests/conftest.py saves them)
TINY_ARGS = ["--height", "32", "--width", "48", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu",
             "--quiet"]

FLUX_CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX_CONFIG, **overrides}).eval()


def tiny_flux_controlnet(seed: int = 1, **overrides):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    cn = FluxControlNetModel(**{**FLUX_CONFIG, "num_layers": 1, "num_single_layers": 1, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-initialises the output and condition projections
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.2)
    return cn


def image_ids(height: int, width: int, row0: int = 0) -> torch.Tensor:
    ids = torch.zeros(height * width, 3)
    ids[:, 1] = torch.arange(row0, row0 + height).repeat_interleave(width).float()
    ids[:, 2] = torch.arange(width).repeat(height).float()
    return ids


def flux_inputs(height: int, width: int, text_len: int = 7, batch: int = 2, seed: int = 0, guidance: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden_states=torch.randn(batch, height * width, FLUX_CONFIG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, FLUX_CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, FLUX_CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
    )
    if guidance:
        x["guidance"] = torch.full((batch,), 3.5)
    return x


# ------------------------------------------------------------------------------------------
# A whole tiny FluxPipeline, built from local objects only and saved with save_pretrained
# ------------------------------------------------------------------------------------------

_WORDS = ("a an the small blue red green plane cat dog house tree sky over under of in on with photo painting "
          "city night day mountain river car boat portrait").split()


def tiny_vocab() -> dict:
    import string

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}
    for w in _WORDS:
        vocab.setdefault(w + "</w>", len(vocab))
    for c in string.ascii_lowercase + string.digits + ",.!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return vocab


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """FluxPipeline with tiny random CLIP, T5, VAE (vae_scale_factor 2: sizes must be multiples of 4 pixels)
    and a tiny FLUX transformer. Tokenizers are built from an in-memory vocabulary."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    vocab = tiny_vocab()
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5_tok = T5Tokenizer(vocab=[(k, 0.0 if k.startswith("<") else -float(len(k))) for k in vocab], extra_ids=0,
                         model_max_length=512)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=FLUX_CONFIG["pooled_projection_dim"],
                                        intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                        projection_dim=32, max_position_embeddings=77, eos_token_id=4,
                                        bos_token_id=3, pad_token_id=4))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=FLUX_CONFIG["joint_attention_dim"], d_ff=37, d_kv=8,
                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = tiny_flux(seed, guidance_embeds=guidance_embeds)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def save_tiny_flux_pipeline(path, **kwargs) -> str:
    tiny_flux_pipeline(**kwargs).save_pretrained(str(path))
    return str(path)


SD3_CONFIG = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                  pos_embed_max_size=32)


def tiny_sd3(seed: int = 0, **overrides):
    """SD3-like (``dual_attention_layers=()``) or SD3.5-Medium-like (``dual_attention_layers=(0,)``, ``qk_norm``)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**SD3_CONFIG, **overrides}).eval()


def sd3_inputs(height: int, width: int, text_len: int = 6, batch: int = 2, seed: int = 0):
    """``height``/``width`` in latent pixels (token grid = latent / patch size 2)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, SD3_CONFIG["in_channels"], height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, SD3_CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, SD3_CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
    )


def _tiny_clip_with_projection(vocab, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=projection, max_position_embeddings=77, eos_token_id=4, bos_token_id=3, pad_token_id=4))


def tiny_sd3_pipeline(seed: int = 0, dual_attention_layers=(0,)):
    """StableDiffusion3Pipeline (three text encoders) around a tiny SD3.5-Medium-like transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    vocab = tiny_vocab()
    torch.manual_seed(seed)
    clip1 = _tiny_clip_with_projection(vocab, 16, SD3_CONFIG["pooled_projection_dim"] // 2)
    clip2 = _tiny_clip_with_projection(vocab, 16, SD3_CONFIG["pooled_projection_dim"] // 2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=SD3_CONFIG["joint_attention_dim"], d_ff=37, d_kv=8,
                                 num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    t5_tok = T5Tokenizer(vocab=[(k, 0.0 if k.startswith("<") else -float(len(k))) for k in vocab], extra_ids=0,
                         model_max_length=256)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    transformer = tiny_sd3(seed, dual_attention_layers=dual_attention_layers,
                           qk_norm="rms_norm" if dual_attention_layers else None)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip1, tokenizer=tok, text_encoder_2=clip2, tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=t5_tok)


def tiny_flux_controlnet_pipeline(seed: int = 0):
    """FluxControlNetPipeline: the tiny FLUX pipeline's components plus a tiny FluxControlNetModel."""
    from diffusers import FluxControlNetPipeline

    base = tiny_flux_pipeline(seed)
    cn = tiny_flux_controlnet(seed + 1, guidance_embeds=True)
    return FluxControlNetPipeline(controlnet=cn, **base.components)


# ------------------------------------------------------------------------------------------
# FLUX.2 (Flux2Transformer2DModel): 2 heads x 16, 4 RoPE axes; its pipeline without a text encoder
# ------------------------------------------------------------------------------------------

FLUX2_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                    axes_dims_rope=(4, 4, 4, 4))


def tiny_flux2(seed: int = 0, **overrides):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**{**FLUX2_CONFIG, **overrides}).eval()


def flux2_inputs(height: int, width: int, text_len: int = 7, batch: int = 2, seed: int = 0, references=(),
                 guidance: bool = True) -> dict:
    """Flux2Pipeline's transformer inputs for a ``height x width`` token grid, with reference images of the
    given token grids after it (t = 10, 20, ...)."""
    from diffusers import Flux2Pipeline

    g = torch.Generator().manual_seed(seed)
    c = FLUX2_CONFIG["in_channels"]
    latents = torch.randn(batch, c, height, width, generator=g)
    text = torch.randn(batch, text_len, FLUX2_CONFIG["joint_attention_dim"], generator=g)
    hidden, ids = Flux2Pipeline._pack_latents(latents), Flux2Pipeline._prepare_latent_ids(latents)
    if references:
        refs = [torch.randn(1, c, h, w, generator=g) for h, w in references]
        hidden = torch.cat([hidden, torch.cat([Flux2Pipeline._pack_latents(r) for r in refs], 1).expand(batch, -1, -1)],
                           1)
        ids = torch.cat([ids, Flux2Pipeline._prepare_image_ids(refs).expand(batch, -1, -1)], 1)
    x = dict(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.rand(batch, generator=g),
             txt_ids=Flux2Pipeline._prepare_text_ids(text), img_ids=ids, return_dict=False)
    if guidance:
        x["guidance"] = torch.full((batch,), 4.0)
    return x


def tiny_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                              layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                              use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux2_pipeline(seed: int = 0):
    """Flux2Pipeline around a tiny FLUX.2 transformer and VAE (4 pixels per token: VAE factor 2 x 2x2 patches);
    no text encoder (prompts go in as ``prompt_embeds``: a tiny Mistral 3 needs a processor from the Hub)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    torch.manual_seed(seed)
    vae = tiny_flux2_vae()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=tiny_flux2(seed))


def tiny_flux2_klein_pipeline(seed: int = 0):
    """Flux2KleinPipeline: a tiny Qwen3 text encoder (27 layers of width 16: klein's encode_prompt stacks hidden
    layers 9, 18, 27 into 48-wide text) with a byte-level Qwen2 tokenizer and chat template built in memory, the
    tiny FLUX.2 VAE and a tiny FLUX.2 transformer taking that text."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = Qwen2Tokenizer(vocab=_byte_vocab(), merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                           num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=2,
                                           head_dim=8, max_position_embeddings=512)).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux2_vae(), text_encoder=encoder,
                              tokenizer=tok, transformer=tiny_flux2(seed, joint_attention_dim=48))


# ------------------------------------------------------------------------------------------
# Qwen-Image (QwenImageTransformer2DModel): 2 heads x 16; its pipeline without a text encoder
# ------------------------------------------------------------------------------------------

QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_qwenimage(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**QWEN_CONFIG, **overrides}).eval()


def qwenimage_inputs(height: int, width: int, text_len: int = 7, batch: int = 2, seed: int = 0, valid=None,
                     references=()) -> dict:
    """QwenImagePipeline's transformer inputs for a ``height x width`` token grid; ``valid``: the number of
    valid text tokens of each row (the rest padded, ``encoder_hidden_states_mask`` 0), None = no mask;
    ``references``: token grids of the edit pipelines' input pictures, after the image."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, height, width), *((1, h, w) for h, w in references)]
    tokens = sum(h * w for _, h, w in shapes)
    x = dict(hidden_states=torch.randn(batch, tokens, QWEN_CONFIG["in_channels"], generator=g),
             encoder_hidden_states=torch.randn(batch, text_len, QWEN_CONFIG["joint_attention_dim"], generator=g),
             timestep=torch.rand(batch, generator=g), img_shapes=[shapes] * batch, return_dict=False)
    if valid is not None:
        x["encoder_hidden_states_mask"] = (torch.arange(text_len)[None, :] < torch.tensor(valid)[:, None]).long()
    return x


def tiny_qwenimage_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def _byte_vocab() -> dict:
    """GPT-2's byte-to-unicode alphabet as a vocabulary (a byte-level BPE without merges: one token per byte)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_qwen_text_encoder(seed: int = 0):
    """A tiny Qwen2.5-VL (text width 32, one layer) and a byte-level Qwen2 tokenizer built in memory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_vocab(), merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=QWEN_CONFIG["joint_attention_dim"], intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=None,
                         eos_token_id=None),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=QWEN_CONFIG["joint_attention_dim"], fullatt_block_indexes=[0]),
        vocab_size=len(tok))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), tok


def tiny_qwenimage_pipeline(seed: int = 0, text_encoder: bool = False):
    """QwenImagePipeline around a tiny Qwen-Image transformer and VAE (4 pixels per token: VAE factor 2 x 2x2
    packing). ``text_encoder``: with a tiny Qwen2.5-VL and byte-level tokenizer (prompts as text); without, prompts
    go in as ``prompt_embeds`` with ``prompt_embeds_mask``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(seed)
    vae = tiny_qwenimage_vae()
    encoder, tokenizer = tiny_qwen_text_encoder(seed) if text_encoder else (None, None)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                             tokenizer=tokenizer, transformer=tiny_qwenimage(seed))


# ------------------------------------------------------------------------------------------
# Saved pipelines and CLEAR checkpoints
# ------------------------------------------------------------------------------------------


def load_tiny_pipeline(path):
    """A saved tiny pipeline loaded as the command line does (CPU, float32), its progress bar off."""
    pipe = inf.load_pipeline(path, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clear_checkpoint(path, radius=2, down_factor=1, seed=3, family="flux", scale=0.3, fill=None, metadata=True):
    """A CLEAR checkpoint for the family's tiny transformer with perturbed (non-original) weights, or every value
    ``fill``; ``metadata=False`` writes the bare tensors (no radius recorded), as the first release did."""
    model = tiny_flux() if family == "flux" else tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm")
    clear.apply_clear(model, radius, down_factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(model).values():
            if fill is None:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.fill_(fill)
    if metadata:
        return clear.save_clear_weights(model, path)
    save_file({k: v.detach().clone() for k, v in clear.clear_state_dict_keys(model).items()}, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------
# Wan (video)
# ------------------------------------------------------------------------------------------

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def tiny_wan(seed: int = 0, i2v: bool = False, **overrides):
    """A tiny random ``WanTransformer3DModel`` (2 layers, 2 heads x 16, patch (1, 2, 2)); ``i2v``: with Wan 2.1
    I2V's image context (``image_dim``, ``added_kv_proj_dim``) in its cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    extra = dict(image_dim=12, added_kv_proj_dim=32, in_channels=8) if i2v else {}
    return WanTransformer3DModel(**{**WAN_CONFIG, **extra, **overrides}).eval()


def wan_inputs(frames: int, height: int, width: int, batch: int = 2, seed: int = 0, text_len: int = 6,
               i2v: bool = False, in_channels: int | None = None) -> dict:
    """Forward inputs of :func:`tiny_wan` for a ``frames x height x width`` token grid (latents ``[B, C, frames,
    2 height, 2 width]``); ``i2v``: 512 text tokens (the I2V processor's fixed length) and 5 image-context tokens."""
    g = torch.Generator().manual_seed(seed)
    channels = in_channels or (8 if i2v else 4)
    out = dict(hidden_states=torch.randn(batch, channels, frames, 2 * height, 2 * width, generator=g),
               timestep=torch.rand(batch, generator=g) * 1000,
               encoder_hidden_states=torch.randn(batch, 512 if i2v else text_len, 16, generator=g), return_dict=False)
    if i2v:
        out["encoder_hidden_states_image"] = torch.randn(batch, 5, 12, generator=g)
    return out


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False, image_to_video: bool = False):
    """WanPipeline with a tiny random UMT5 (T5 tokenizer from the in-memory vocabulary), a tiny Wan VAE (8x
    spatial, 4x temporal: sizes multiples of 16 pixels, ``num_frames = 4k + 1``) and tiny transformers;
    ``two_experts``: Wan 2.2 A14B's layout, ``transformer`` (high noise) and ``transformer_2`` (low noise) with
    ``boundary_ratio`` 0.5; ``image_to_video``: a ``WanImageToVideoPipeline`` (Wan 2.2 I2V: no image encoder)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    vocab = tiny_vocab()
    tok = T5Tokenizer(vocab=[(k, 0.0 if k.startswith("<") else -float(len(k))) for k in vocab], extra_ids=0,
                      model_max_length=512)
    torch.manual_seed(seed)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_ff=37, d_kv=8, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    cls = WanPipeline
    if image_to_video:  # Wan 2.2 I2V's layout: no CLIP image encoder; latents + mask + image latents in
        from diffusers import WanImageToVideoPipeline as cls

    channels = dict(in_channels=12) if image_to_video else {}
    kw = dict(transformer=tiny_wan(seed, **channels))
    if two_experts:
        kw.update(transformer_2=tiny_wan(seed + 1, **channels), boundary_ratio=0.5)
    return cls(tokenizer=tok, text_encoder=umt5, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **kw)
