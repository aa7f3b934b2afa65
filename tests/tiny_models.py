"""Tiny random-weight diffusers models and their inputs, shared by the tests."""

from __future__ import annotations

import torch

FLUX_CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_flux(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX_CONFIG, **overrides}).eval()


def tiny_flux_controlnet(seed: int = 1):
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in FLUX_CONFIG.items()}
    cfg.update(num_layers=1, num_single_layers=1)
    cn = FluxControlNetModel(**cfg).eval()
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
