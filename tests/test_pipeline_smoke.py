"""The tiny pipeline round-trips through save_pretrained / from_pretrained and runs with CLEAR applied."""

import numpy as np
import torch
from diffusers import FluxPipeline

import clear


def test_tiny_pipeline_with_clear(tiny_flux_pipeline_dir):
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline_dir)
    kw = dict(prompt="a small blue plane", height=32, width=48, num_inference_steps=2, max_sequence_length=16,
              output_type="np")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    clear.apply_clear(pipe.transformer, radius=100)  # covers the 8x12 grid: same image
    same = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    clear.apply_clear(pipe.transformer, radius=2, down_factor=2)
    local = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert ref.shape == (1, 32, 48, 3)
    np.testing.assert_allclose(same, ref, atol=1e-5)
    assert np.abs(local - ref).max() > 1e-4
