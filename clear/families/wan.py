"""Wan 2.1 / 2.2 video transformers (WanTransformer3DModel): T2V 1.3B and 14B, I2V 14B, TI2V-5B, A14B.

Everything CLEAR knows about the family: its attention processor (the self-attention ``attn1`` of every
block; the cross-attention ``attn2``, text and I2V image context, keeps diffusers' own processor), how a
forward gives the video grid (the latent shape ``[B, C, T, H, W]`` over ``patch_size``: ``T/pt x H/ph x
W/pw`` tokens, frame-major as the model flattens them), the released models (:data:`SPECS`, their sizes
in :data:`SIZES` and the FLOPs of a denoising step, :func:`step_flops`), block names (``blocks.N.attn1``:
checkpoint keys), encoders and transformer inputs (UMT5 text ``[B, 512, 4096]``, unpatched latents
``[B, C, T, H, W]``, timestep in ``[0, 1000]``, no guidance embedding) and the pipelines.

The window (:mod:`clear.geometry`): a query at latent frame t, token row y, column x sees the key at
(t', y', x') iff ``((t-t')/rt)^2 + ((y-y')/r)^2 + ((x-x')/r)^2 < 1``, ``rt`` the ``temporal_radius`` of
:func:`clear.apply_clear` (``None``: every frame). Self-attention in Wan has no text tokens, so the layout
is the video alone. Pooled tokens (``down_factor > 1``) are ``df x df`` cells of each frame, seen by every
query.

Wan 2.2 A14B pipelines hold two transformers (``transformer`` for high noise, ``transformer_2`` for low
noise): apply CLEAR to each and give each its own checkpoint (one file per expert; both are
``WanTransformer3DModel`` with the same keys, so the ``clear.model`` metadata cannot tell them apart: keep
the file names apart).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..geometry import TokenLayout, video_flops
from ..processors import ClearProcessorBase
from .base import ModelFamily, ModelSpec


def apply_wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on ``x [B, S, heads, D]`` with ``freqs_cos/sin [1, S, 1, D]`` (diffusers'
    ``WanAttnProcessor``, where it is a function local to ``__call__``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanClearAttnProcessor(ClearProcessorBase):
    """CLEAR for the self-attention (``attn1``) of ``WanTransformerBlock``: q/k/v projections, RMS norms across
    heads, RoPE, then the 3-D window over the ``frames x height x width`` tokens of this forward."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 clear_forward=None):
        # here: the registry imports no diffusers model
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None:
            raise ValueError("the CLEAR Wan processor is for self-attention (attn1); cross-attention (attn2) keeps "
                             "diffusers' WanAttnProcessor: apply CLEAR with clear.apply_clear(transformer, ...)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_wan_rope(query, *rotary_emb), apply_wan_rope(key, *rotary_emb)
        layout, plan = self._video_layout_and_plan(clear_forward, attention_mask, query.shape[1])
        out = self.core(query, key, value, layout, self.spatial_weight, plan).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _video_layout_and_plan(self, clear_forward, attention_mask, seq_len: int):
        """The video layout of this call and its forward's plan for it (:meth:`ClearProcessorBase._layout_and_plan`:
        WanTransformer3DModel hands no attention kwargs to its blocks, so the forward in progress, set by the
        forward pre-hook from the latent shape). Wan's self-attention holds the video tokens only."""
        layout, plan = self._layout_and_plan(clear_forward, attention_mask, seq_len)
        if layout.text_len:
            grid = "x".join(map(str, (layout.frames, layout.height, layout.width)))
            raise ValueError(f"a self-attention call of {seq_len} tokens in a forward whose latent grid is {grid} "
                             f"tokens ({layout.num_image})")
        return layout, plan


# ------------------------------------------------------------------------------------------
# The released sizes and the FLOPs of a step
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WanSize:
    """A released transformer's size (diffusers' config names): ``dim`` = heads x 128, ``ffn``, ``layers``,
    ``in_channels``/``out_channels`` of the latents, ``image_context`` tokens of I2V's CLIP image (0: none),
    and the VAE's ``spatial`` / ``temporal`` compression."""

    dim: int
    ffn: int
    layers: int
    in_channels: int = 16
    out_channels: int = 16
    image_context: int = 0
    spatial: int = 8
    temporal: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Tokens ``(frames, rows, cols)`` of a clip of ``num_frames`` frames at ``height x width`` pixels."""
        pt, ph, pw = self.patch
        frames = (num_frames - 1) // self.temporal + 1
        return frames // pt, height // (self.spatial * ph), width // (self.spatial * pw)


TEXT_TOKENS = 512  # UMT5 tokens of every Wan pipeline (the I2V processor hard-codes them)

# diffusers' configs (scripts/convert_wan_to_diffusers.py); the A14B experts are each the 14B transformer
SIZES = {
    "Wan2.1-T2V-1.3B": WanSize(dim=12 * 128, ffn=8960, layers=30),
    "Wan2.1-T2V-14B": WanSize(dim=40 * 128, ffn=13824, layers=40),
    "Wan2.1-I2V-14B": WanSize(dim=40 * 128, ffn=13824, layers=40, in_channels=36, image_context=257),
    "Wan2.2-TI2V-5B": WanSize(dim=24 * 128, ffn=14336, layers=30, in_channels=48, out_channels=48, spatial=16),
    "Wan2.2-T2V-A14B": WanSize(dim=40 * 128, ffn=13824, layers=40),
    "Wan2.2-I2V-A14B": WanSize(dim=40 * 128, ffn=13824, layers=40, in_channels=36),
}


def step_flops(size: WanSize, frames: int, height: int, width: int, radius: float | None = None,
               temporal_radius: float | None = None, down_factor: int = 1) -> dict[str, int]:
    """FLOPs of one transformer forward on a ``frames x height x width`` token grid (2 per multiply-add):
    ``self_attention`` (``4 * pairs * dim`` per layer, CLEAR's window when ``radius`` is given, the pooled
    keys' ``df x df`` weighting neglected), ``cross_attention`` (``4 * N * (512 + image context) * dim``),
    ``linear`` (q/k/v/out of both attentions, the FFN, patch embedding and output projection) and ``total``."""
    n, d, lay = frames * height * width, size.dim, size.layers
    ctx = TEXT_TOKENS + size.image_context
    per_layer_linear = (2 * n * d * d * 4  # self-attention q, k, v, out
                        + 2 * n * d * d * 2 + 2 * ctx * d * d * 2  # cross-attention q, out on video; k, v on context
                        + 2 * n * d * size.ffn * 2)  # FFN up and down
    patch = 2 * n * d * (size.in_channels + size.out_channels) * size.patch[0] * size.patch[1] * size.patch[2]
    out = dict(self_attention=lay * video_flops(frames, height, width, radius, temporal_radius, down_factor, d),
               cross_attention=lay * 4 * n * ctx * d, linear=lay * per_layer_linear + patch)
    out["total"] = sum(out.values())
    return out


# the table of docs/families.md: (name, shown as), sizes (HEIGHT, WIDTH) at 81 frames, CLEAR windows (r, rt)
TABLE_MODELS = (("Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B"), ("Wan2.2-TI2V-5B", "Wan2.2-TI2V-5B"),
                ("Wan2.1-T2V-14B", "Wan2.1-T2V-14B, each Wan2.2-A14B expert"), ("Wan2.1-I2V-14B", "Wan2.1-I2V-14B"))
TABLE_SIZES = (("480p", 480, 832), ("720p", 720, 1280))
TABLE_WINDOWS = ((16, 4), (8, 2), (16, None))


def flops_table(num_frames: int = 81) -> str:
    """The markdown table of docs/families.md: per released model and size, the tokens, the TFLOPs of one
    transformer forward with full attention, the self-attention's share of it, and for each CLEAR window the
    self-attention FLOPs it keeps and the bound on the forward's speed-up (full FLOPs / CLEAR FLOPs). TI2V-5B's
    720p is 1280x704 (its VAE compresses 16x: sides are multiples of 32)."""
    head = ["model", "size (81 frames)", "tokens T×H×W", "TFLOPs / forward", "self-attention share"]
    head += [f"r={r}, rt={rt if rt is not None else 'all'}: attention kept, speed-up bound" for r, rt in TABLE_WINDOWS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---:|" + "---:|" * len(TABLE_WINDOWS)]
    for name, shown in TABLE_MODELS:
        size = SIZES[name]
        for tag, height, width in TABLE_SIZES:
            height = height - height % (size.spatial * size.patch[1])
            grid = size.grid(num_frames, height, width)
            full = step_flops(size, *grid)
            cells = []
            for r, rt in TABLE_WINDOWS:
                local = step_flops(size, *grid, radius=r, temporal_radius=rt)
                cells.append(f"{100 * local['self_attention'] / full['self_attention']:.1f}%, "
                             f"{full['total'] / local['total']:.2f}×")
            tokens = f"{grid[0]}×{grid[1]}×{grid[2]} = {grid[0] * grid[1] * grid[2]:,}"
            lines.append(f"| {shown} | {tag} {width}×{height} | {tokens} | {full['total'] / 1e12:,.0f} | "
                         f"{100 * full['self_attention'] / full['total']:.0f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The family
# ------------------------------------------------------------------------------------------

class WanFamily(ModelFamily):
    """Wan 2.1 / 2.2: UMT5 text, unpatched 5-D latents, timestep in [0, 1000], classifier-free guidance for
    sampling only."""

    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int, int]:
        model, latents = bound.arguments["self"], bound.arguments["hidden_states"]
        if latents.ndim != 5:
            raise ValueError(f"Wan latents are [B, C, frames, height, width], got shape {tuple(latents.shape)}")
        pt, ph, pw = model.config.patch_size
        t, h, w = latents.shape[-3:]
        if t % pt or h % ph or w % pw:
            raise ValueError(f"the latent size {t}x{h}x{w} is not divisible by the patch size {pt}x{ph}x{pw}")
        return t // pt, h // ph, w // pw

    def layout(self, text_len, grid):
        frames, height, width = grid
        return TokenLayout(text_len, height, width, True, frames)

    def attention_kwargs(self, model):
        # WanTransformer3DModel takes attention_kwargs but hands them to no block: the processors read the forward
        # in progress (clear.processors.InProgress)
        return None

    def clear_module(self, processor_name):
        return processor_name.endswith("attn1.processor")  # self-attention; attn2 (text, image context) unchanged

    def text_lens(self, bound):
        return (0,)  # Wan's self-attention holds the video tokens only

    def grid_rules(self, vae_factor, transformer_config):
        return vae_factor * int(transformer_config.get("patch_size", (1, 2, 2))[1]), None

    def size_rules(self, pretrained_model_name_or_path):
        from diffusers import AutoencoderKLWan  # here: the registry imports no diffusers model

        vae = AutoencoderKLWan.load_config(pretrained_model_name_or_path, subfolder="vae")
        return self.grid_rules(int(vae.get("scale_factor_spatial") or 8),
                               self.transformer_config(pretrained_model_name_or_path))

    def training_guidance(self, transformer_config, guidance_scale):
        return None

    def check_trains_from_data(self):
        raise NotImplementedError(
            "training Wan from data is not built: the data, cache and distillation commands handle images (tar "
            "shards of pictures, AutoencoderKL posteriors, 4-D latents), not clips. The objective itself runs on Wan "
            "(clear.distill.distill_losses with 5-D latents [B, C, frames, H, W] and UMT5 embeddings; "
            "tests/test_wan.py takes distillation steps): drive it from your own clip loader (docs/families.md)")

    def encode_prompt(self, pipe, prompts, device, max_sequence_length, negative=False):
        embeds, neg = pipe.encode_prompt(prompt=list(prompts),
                                         negative_prompt=[""] * len(prompts) if negative else None,
                                         do_classifier_free_guidance=negative, num_videos_per_prompt=1,
                                         max_sequence_length=max_sequence_length, device=device)
        out = {"prompt_embeds": embeds}
        if negative:
            out["negative_prompt_embeds"] = neg
        return out

    def transformer_inputs(self, latents, timesteps, prompt_embeds, pooled_prompt_embeds, guidance,
                           num_train_timesteps=1000):
        # WanPipeline: the scheduler's timesteps as they are, latents [B, C, T, H, W]
        return dict(hidden_states=latents.to(prompt_embeds.dtype), timestep=timesteps,
                    encoder_hidden_states=prompt_embeds, return_dict=False)

    def output_layout(self, latents):
        return latents


def _heads(c) -> int:
    return int(c.get("num_attention_heads", 0))


# The released models, most specific first. Wan2.1-T2V-14B and each expert of Wan2.2-T2V-A14B have the same
# config: they are one spec (the A14B pipeline's two transformers are told apart by the pipeline, not the config).
# L0 = the training clip's tokens (81 frames -> 21 latent frames): 480p for 1.3B, 720p for the 14B models,
# 1280x704 for TI2V-5B (its VAE compresses 16x).
SPECS = (
    ModelSpec("Wan2.2-TI2V-5B", lambda c: int(c.get("in_channels", 16)) == 48, steps=50, guidance=5.0,
              max_sequence_length=TEXT_TOKENS, training_tokens=21 * 22 * 40),
    ModelSpec("Wan2.1-T2V-1.3B", lambda c: _heads(c) == 12 and c.get("num_layers") == 30, steps=50, guidance=5.0,
              max_sequence_length=TEXT_TOKENS, training_tokens=21 * 30 * 52),
    ModelSpec("Wan2.1-I2V-14B", lambda c: _heads(c) == 40 and bool(c.get("image_dim")), steps=50, guidance=5.0,
              max_sequence_length=TEXT_TOKENS, training_tokens=21 * 45 * 80),
    ModelSpec("Wan2.2-I2V-A14B", lambda c: _heads(c) == 40 and int(c.get("in_channels", 16)) == 36, steps=40,
              guidance=3.5, max_sequence_length=TEXT_TOKENS, training_tokens=21 * 45 * 80),
    ModelSpec("Wan-T2V-14B", lambda c: _heads(c) == 40 and c.get("num_layers") == 40, steps=50, guidance=5.0,
              max_sequence_length=TEXT_TOKENS, training_tokens=21 * 45 * 80),
    ModelSpec("Wan", lambda c: True, steps=50, guidance=5.0, max_sequence_length=TEXT_TOKENS,
              training_tokens=21 * 30 * 52),
)

FAMILY = WanFamily(
    name="wan", pipeline_class="WanPipeline", transformer_class="WanTransformer3DModel",
    model_classes=("WanTransformer3DModel",), processor=WanClearAttnProcessor, text_first=True, specs=SPECS,
    streams=(("self", "blocks"),), repeated_blocks=("WanTransformerBlock",),
    text_components=("text_encoder", "tokenizer"), t5_tokenizer="tokenizer", attn_loss_layers="self:4",
    pipelines=("WanPipeline", "WanImageToVideoPipeline"), vae_class="AutoencoderKLWan",
    prompt_features=("prompt_embeds",), rope=False, released_weights=False, example="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    video=True, block_attention="attn1",
)
