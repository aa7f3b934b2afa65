"""What every model family says about itself: :class:`ModelFamily` (one per family file) and
:class:`ModelSpec` (one released model of a family: its sampling defaults, text length and
training length L0).

A family file (``clear/families/flux.py``, ``sd3.py``) defines its attention processor, a
:class:`ModelFamily` subclass implementing the methods below, and one instance of it named
``FAMILY``; the registry (:mod:`clear.families`) lists those instances. Latents are always
``[B, C, H, W]`` (VAE layout) outside :meth:`ModelFamily.transformer_inputs`;
:meth:`ModelFamily.output_layout` puts a latent-shaped target into the layout the transformer
predicts in.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..defaults import DEFAULT_MAX_PIXELS, DEFAULT_NTK_FACTOR
from ..geometry import TokenLayout, attention_flops

logger = logging.getLogger(__name__)


def check_size(height: int, width: int, multiple: int = 16, down_factor: int = 1, max_grid: int | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, names: tuple[str, str] = ("height", "width")) -> None:
    """Image sizes must be multiples of ``multiple`` pixels (FLUX and SD3: 16 = VAE factor 8 x
    patch 2; see :meth:`ModelFamily.size_rules`), at most ``max_grid`` tokens per side where the model has
    such a limit (SD3's ``pos_embed_max_size``), at most ``max_pixels`` pixels in all
    (:data:`DEFAULT_MAX_PIXELS` = 16384²; ``None``: no bound), and with ``down_factor`` the
    token grid (pixels / multiple) must be divisible by it. The one size rule of every model family
    (:meth:`ModelFamily.check_size`, :meth:`clear.inference.PipelineInfo.check_size`); ``names``: how
    the messages call the two sides (e.g. ``("--resolution", "--resolution")``)."""
    for name, v in zip(names, (height, width)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            fix = f"e.g. {max(multiple, round(v / multiple) * multiple)}" if isinstance(v, int) and v > 0 else ""
            raise ValueError(f"{name}={v} is not a positive multiple of {multiple} pixels, which this model needs "
                             f"(VAE factor x patch size); choose another {name} {fix}".rstrip())
    if max_grid is not None and max(height, width) > max_grid * multiple:
        limit = max_grid * multiple
        raise ValueError(f"{height}x{width} pixels is a {height // multiple}x{width // multiple} token grid, larger "
                         f"than this model's positional embedding table of {max_grid}x{max_grid} tokens "
                         f"(pos_embed_max_size={max_grid} in its transformer config): it generates at most {limit} "
                         f"pixels per side; choose {' and '.join(dict.fromkeys(names))} <= {limit}")
    if max_pixels is not None and height * width > max_pixels:
        side = math.isqrt(max_pixels)
        raise ValueError(f"{height}x{width} is {height * width:,} pixels, more than the bound of {max_pixels:,} "
                         f"(max_pixels, about {side}x{side}): that far out, one image's latents, activations and "
                         "decoded pixels run out of memory. Choose a smaller size, or raise the bound (--max_pixels, "
                         "or max_pixels=) if your hardware really holds it")
    if down_factor > 1:
        gh, gw = height // multiple, width // multiple
        if gh % down_factor or gw % down_factor:
            step = multiple * down_factor
            raise ValueError(f"{height}x{width} pixels is a {gh}x{gw} token grid, not divisible by down_factor="
                             f"{down_factor}; with this variant choose sizes that are multiples of {step} pixels")


@dataclass(frozen=True)
class ModelSpec:
    """One released model of a family: how it is recognised from its transformer config, the
    sampling settings its publisher recommends (diffusers docs / model cards), its T5 length
    (used alike by data generation, caches, training and inference) and its training length
    ``training_tokens`` (text + image tokens of one attention call at the training size: the
    L0 of proportional attention, see :meth:`clear.ClearAttention.scale`)."""

    name: str
    recognise: Callable[[Mapping], bool]  # transformer config -> whether it is this model
    steps: int
    guidance: float
    max_sequence_length: int  # T5 tokens
    training_tokens: int  # L0
    # the released size, for FLOPs (clear.attention_flops, scripts/benchmark.py flops --model): channels of one
    # attention call (heads x head_dim) and attention layers of one forward; None where not recorded
    width: int | None = None
    layers: int | None = None

    def attention_flops(self, height: int, width: int, radius: float | None, down_factor: int = 1,
                        text_len: int | None = None) -> int:
        """Attention FLOPs of one forward (every attention layer) at a ``height x width`` token grid, with
        this model's width and ``text_len`` text tokens (default: its ``max_sequence_length``)."""
        if self.width is None or self.layers is None:
            raise ValueError(f"{self.name}: no width / layer count recorded for FLOPs")
        text = self.max_sequence_length if text_len is None else text_len
        return self.layers * attention_flops(height, width, radius, text, down_factor, self.width)

    def defaults(self) -> dict:
        """``steps``, ``guidance`` and ``max_sequence_length`` as a dict (``clear.inference.default_settings``)."""
        return dict(steps=self.steps, guidance=self.guidance, max_sequence_length=self.max_sequence_length)


@dataclass(frozen=True)
class ModelFamily:
    """Everything that differs between model families, for applying CLEAR, training and inference.
    Subclasses implement the methods that raise :class:`NotImplementedError`."""

    name: str  # clear.model_family's name, the --model_family value, checkpoints' clear.family metadata
    pipeline_class: str  # the text-to-image pipeline (diffusers class name)
    transformer_class: str  # the transformer a pipeline of this family holds (model_index.json)
    model_classes: tuple[str, ...]  # classes CLEAR applies to (a model's MRO is searched for them)
    processor: type  # the attention processor (a clear.processors.ClearProcessorBase)
    text_first: bool  # whether text tokens come before image tokens in the joint sequence
    specs: tuple[ModelSpec, ...]  # released models, the first whose recognise() holds is the one
    # stream name (attn_loss_layers' "single:4") -> the model's block list; its block lists are checkpoint key prefixes
    streams: tuple[tuple[str, str], ...]
    repeated_blocks: tuple[str, ...]  # block classes for diffusers' regional compilation
    text_components: tuple[str, ...]  # pipeline components that encode prompts
    t5_tokenizer: str  # the component that limits max_sequence_length
    attn_loss_layers: str  # default layers of L_attn (see clear.distill.attention_layers)
    # inference: pipelines recognised in model_index.json, the SDEdit pipeline, whether positions are RoPE
    # (NTK scaling applies), whether CLEAR weights are released, a Hub id for messages
    pipelines: tuple[str, ...] = ()
    img2img_class: str = ""
    # training from data (scripts/distill.py, the cache scripts): the VAE class of the pipeline, and the text
    # features a prompt cache holds (the first: token embeddings; the second, if any, goes to transformer_inputs'
    # pooled_prompt_embeds argument: FLUX.1 / SD3 pooled text, Qwen-Image the text mask)
    vae_class: str = "AutoencoderKL"
    prompt_features: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds")
    rope: bool = False
    released_weights: bool = False
    example: str = ""
    # the most text tokens (max_sequence_length) the family's pipelines accept (FluxPipeline and SD3's refuse more
    # than 512, QwenImagePipeline more than 1024); None: no bound known
    max_text_tokens: int | None = 512
    # a video family: its grids are (frames, height, width) and apply_clear takes a temporal_radius
    video: bool = False
    # the attention module of a block whose output enters L_attn (clear.distill.attention_layers): FLUX's "attn"
    block_attention: str = "attn"

    # -- the released models -------------------------------------------------------------
    def spec(self, transformer_config: Mapping) -> ModelSpec:
        """The released model a transformer config (a dict or a loaded model's config) is."""
        for spec in self.specs:
            if spec.recognise(transformer_config):
                return spec
        raise ValueError(f"no {self.name} model spec recognises this transformer config; known: "
                         f"{', '.join(s.name for s in self.specs)}")

    def model_spec(self, pretrained_model_name_or_path: str) -> ModelSpec:
        """The released model a pipeline folder / Hub id is, from its transformer config (no weights read)."""
        return self.spec(self.transformer_config(pretrained_model_name_or_path))

    def guidance_kwargs(self, guidance: float, given: Mapping | None = None) -> dict:
        """The pipeline call arguments that sample with ``guidance`` (FLUX, SD3: ``guidance_scale``). ``given``:
        the call's other arguments (a family that adds a negative prompt leaves one given there alone)."""
        return {"guidance_scale": guidance}

    def default_guidance_scale(self, transformer_config) -> float:
        """Guidance for generating data and validation images with this model."""
        return self.spec(transformer_config).guidance

    # -- block names ---------------------------------------------------------------------
    @property
    def block_lists(self) -> tuple[str, ...]:
        """The model's block lists (``transformer_blocks``, ...): the first part of every checkpoint key."""
        return tuple(dict.fromkeys(blocks for _, blocks in self.streams))

    def stream_blocks(self, stream: str) -> str | None:
        return dict(self.streams).get(stream)

    # -- loading -------------------------------------------------------------------------
    def pipeline_cls(self):
        import diffusers  # here: the registry imports no diffusers model

        return getattr(diffusers, self.pipeline_class)

    def folder_pipeline_cls(self, pretrained_model_name_or_path: str):
        """The pipeline class that encodes prompts and images for a pipeline folder / Hub id (the cache scripts,
        ``scripts/distill.py``); default: :attr:`pipeline_class`."""
        return self.pipeline_cls()

    def transformer_cls(self):
        import diffusers  # here: the registry imports no diffusers model

        return getattr(diffusers, self.transformer_class)

    def transformer_config(self, pretrained_model_name_or_path: str) -> dict:
        return self.transformer_cls().load_config(pretrained_model_name_or_path, subfolder="transformer")

    def pipeline(self, transformer, vae, scheduler):
        """The text-to-image pipeline around these components, without text encoders (prompts go in as embeddings)."""
        return self.pipeline_cls()(transformer=transformer, vae=vae, scheduler=scheduler,
                                   **{c: None for c in self.text_components})

    # -- sizes ---------------------------------------------------------------------------
    def size_rules(self, pretrained_model_name_or_path: str) -> tuple[int, int | None]:
        """``(pixels per token, most tokens per side or None)``, from the configs only."""
        from diffusers import AutoencoderKL  # here: the registry imports no diffusers model

        vae = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return self.grid_rules(vae_factor, self.transformer_config(pretrained_model_name_or_path))

    def grid_rules(self, vae_factor: int, transformer_config) -> tuple[int, int | None]:
        """``(pixels per token, most tokens per side or None)`` from the VAE factor and the
        transformer config (a dict or a loaded model's config)."""
        raise NotImplementedError

    def check_size(self, pretrained_model_name_or_path: str, pixels: int, down_factor: int = 1,
                   name: str = "--resolution") -> None:
        """Fail, saying what to use, unless ``pixels`` x ``pixels`` makes a token grid this model
        takes (with ``down_factor``): :func:`check_size` with this model's rules, ``name`` in its messages."""
        per_token, max_grid = self.size_rules(pretrained_model_name_or_path)
        check_size(pixels, pixels, per_token, down_factor, max_grid, max_pixels=None, names=(name, name))

    # -- a forward, as apply_clear's hook sees it ----------------------------------------
    def grid(self, bound: inspect.BoundArguments) -> tuple[int, int]:
        """The image grid (tokens high, wide) of a forward, from its bound arguments."""
        raise NotImplementedError

    def layout(self, text_len: int, grid: tuple[int, ...]) -> TokenLayout:
        """The token layout of an attention call with ``text_len`` text tokens on a forward's ``grid`` (what
        :meth:`grid` returns). Default: ``(height, width)`` of one image, text where :attr:`text_first` says;
        a video family's grid is ``(frames, height, width)``."""
        return TokenLayout(text_len, *grid, self.text_first)

    def clear_module(self, processor_name: str) -> bool:
        """Whether the attention module of ``processor_name`` (a key of the model's ``attn_processors``) gets
        CLEAR; the others keep their own processors. Default: every attention module."""
        return True

    def text_lens(self, bound: inspect.BoundArguments) -> tuple[int, ...]:
        """The text length of each attention layout of a forward (one per kind of attention call)."""
        raise NotImplementedError

    def attention_kwargs(self, model: torch.nn.Module) -> str | None:
        """The forward argument of ``model`` whose dict diffusers hands to every attention processor (through its
        blocks): what carries each forward's :class:`clear.processors.ForwardPlan`. ``None`` where the model's
        forward does not pass such a dict to its blocks. Default: ``joint_attention_kwargs``."""
        return "joint_attention_kwargs"

    def arrangement(self, bound: inspect.BoundArguments, grid: tuple[int, int]):
        """A :class:`clear.processors.Arrangement` when this forward's joint sequence is not CLEAR's layout as
        it is (reference-image tokens after the image, padded text tokens), else ``None`` (the default): then
        :meth:`text_lens` gives the layouts. A family whose processor attends through
        :func:`clear.processors.attend_arranged` overrides it."""
        return None

    # -- training ------------------------------------------------------------------------
    def check_trains_from_data(self) -> None:
        """Refuse the data, cache and distillation commands (scripts/generate_data.py, the cache scripts,
        scripts/distill.py) where they are not built for this family; default: they are."""

    def training_guidance(self, transformer_config, guidance_scale: float) -> float | None:
        """The guidance the transformer takes in training (an embedded guidance value, or None)."""
        raise NotImplementedError

    def encode_prompt(self, pipe, prompts: list[str], device, max_sequence_length: int,
                      negative: bool = False) -> dict[str, torch.Tensor]:
        """:attr:`prompt_features` (FLUX.1 / SD3: ``{"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}``)
        as the pipeline's ``encode_prompt`` gives them, every row ``[L, ...]`` of the same length (the prompt cache
        stacks rows of different batches); ``negative``: also the empty prompt's, for classifier-free guidance
        (``negative_*``), where the family uses it. Keys are pipeline call arguments."""
        raise NotImplementedError

    def vae_cls(self):
        import diffusers

        return getattr(diffusers, self.vae_class)

    def encode_image(self, pipe, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"latent_mean", "latent_std"}`` of images ``[B, 3, H, W]`` in ``[-1, 1]``, encoded by ``pipe``'s VAE
        (a pipeline of this family; only its VAE is used). Training samples ``x0 = mean + std * eps`` and applies
        :meth:`latent_scaling`. Default (AutoencoderKL): the posterior's moments in the VAE's ``[B, C, h, w]``."""
        dist = pipe.vae.encode(images).latent_dist
        return {"latent_mean": dist.mean, "latent_std": dist.std}

    def latent_scaling(self, pretrained_model_name_or_path: str) -> tuple[float, float]:
        """``(shift, scale)`` that turn a sample of :meth:`encode_image`'s moments into the transformer's latents,
        ``(x - shift) * scale``, read from configs only. Default: the AutoencoderKL config's shift and scale."""
        from diffusers import AutoencoderKL

        cfg = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae")
        return float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"])

    def transformer_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                           pooled_prompt_embeds: torch.Tensor, guidance: float | None,
                           num_train_timesteps: int = 1000) -> dict:
        """Keyword arguments of the transformer's forward for noisy latents ``[B, C, H, W]`` at the
        scheduler's ``timesteps`` (``sigma * num_train_timesteps``)."""
        raise NotImplementedError

    def output_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> the layout of the transformer's prediction."""
        raise NotImplementedError

    # -- resolution extrapolation ----------------------------------------------------------
    def check_img2img(self) -> None:
        """Refuse upscaling (SDEdit) stages where diffusers has no img2img pipeline for this family."""
        if not self.img2img_class:
            raise NotImplementedError(f"diffusers has no img2img (SDEdit) pipeline for {self.pipeline_class}, so "
                                      f"{self.name} models cannot run upscaling stages: generate at one size (CLEAR "
                                      "runs at any size), without --sizes")

    def ntk_rope(self, models, ntk_factor: float | None):
        """A context within which ``models`` (transformer and ControlNets of this family) use NTK-scaled
        RoPE. ``ntk_factor`` ``None`` or 1: nothing changes. A family without RoPE (the default) refuses
        any other factor; a family with RoPE overrides this."""
        if ntk_factor is not None and float(ntk_factor) != 1.0:
            raise TypeError(f"ntk_factor={float(ntk_factor):g}: {self.name} models have no RoPE (their positions are "
                            "not RoPE), so NTK scaling does not apply")
        return contextlib.nullcontext()

    def check_text_length(self, max_sequence_length: int | None) -> None:
        """``max_sequence_length`` (``None``: the model's default) is a whole number of text tokens >= 1 and at
        most :attr:`max_text_tokens`; checked before anything loads (a 0 must not turn into the default)."""
        n = max_sequence_length
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_sequence_length={n!r}: the number of text tokens must be a whole number >= 1 "
                             "(leave it out for the model's default)")
        if self.max_text_tokens is not None and n > self.max_text_tokens:
            raise ValueError(f"max_sequence_length={n}: {self.name} pipelines take at most {self.max_text_tokens} text "
                             f"tokens; pass at most {self.max_text_tokens} (or leave it out for the model's default)")

    def resolve_ntk_factor(self, ntk_factor: float | None) -> float | None:
        """The NTK factor an upscaling stage uses. With RoPE: ``None`` = :data:`clear.defaults.DEFAULT_NTK_FACTOR`
        (10), 1 = off; a factor must be finite and > 0. Without: nothing, with a logged note; an explicit factor
        other than 1 is an error, it cannot be honoured."""
        if ntk_factor is not None and not (isinstance(ntk_factor, (int, float)) and math.isfinite(ntk_factor)
                                           and ntk_factor > 0):
            raise ValueError(f"ntk_factor={ntk_factor:g}: the NTK factor scales RoPE's base and must be a finite "
                             f"number > 0 (1 = off); leave --ntk_factor out for the default {DEFAULT_NTK_FACTOR:g}")
        if self.rope:
            return DEFAULT_NTK_FACTOR if ntk_factor is None else float(ntk_factor)
        if ntk_factor is not None and float(ntk_factor) != 1.0:
            raise ValueError(f"ntk_factor={float(ntk_factor):g}: {self.name} models have no RoPE (their positions are "
                             "a fixed table of sin-cos embeddings cropped to the image), so NTK-scaled RoPE does not "
                             "apply; leave --ntk_factor out (or pass 1)")
        if ntk_factor is None:
            logger.info("%s has no RoPE: NTK-scaled RoPE does not apply and is skipped", self.name)
        return None

