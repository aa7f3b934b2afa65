"""Test environment: every cache inside the repo's ignored .cache/, Hub offline; the shared fixtures.

The tests by layer, each module named after the feature it protects (its reliability cases included):

- unit: test_geometry (the window rule, counts), test_geometry_video (the 3-D window), test_backends (every backend
  against the dense oracle), test_backends_video (tiled and flex on video layouts),
  test_flex_blocks, test_flex_compiled, test_checkpointing, test_data, test_devices, test_file_permissions;
- integration, CLEAR on stock diffusers models against their own attention with an explicit mask:
  test_flux_attention, test_sd3_attention, test_flux2, test_qwenimage, test_wan, test_quantized, test_compile,
  test_parallel, test_interleaved_forwards (two grids, one backward, gradient checkpointing); and the layers above
  them: test_families (the registry, a third family, whole pipelines),
  test_weights (files, download, refused files, LoRA), test_generation, test_evaluation;
- end to end, scripts and pipelines: test_inference (+ test_inference_sd3), test_wan_pipelines (video), test_training,
  test_benchmark, test_notebooks, test_mini_*, test_docs.

Shared helpers live in three modules and here, never in a test module: tiny_models.py (tiny models, pipelines,
inputs, CLEAR checkpoints, loading a saved pipeline), scripts_loader.py (scripts run in-process),
reference_attention.py (diffusers' processors with an explicit mask), toy_family.py (a third family). Tests
that take tens of seconds are marked ``slow``.
"""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tests"
for var, sub in [("TMPDIR", "tmp"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
                 ("HF_HOME", "hf"), ("JUPYTER_CONFIG_DIR", "jupyter"), ("MPLCONFIGDIR", "mpl"), ("TRITON_CACHE_DIR", "triton")]:
    os.environ.setdefault(var, str(_CACHE / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

tempfile.tempdir = os.environ["TMPDIR"]

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def flux():
    from tiny_models import tiny_flux

    return tiny_flux()


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-like pipeline saved with save_pretrained; load it with FluxPipeline.from_pretrained."""
    from tiny_models import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory):
    """A tiny SD3.5-Medium-like pipeline saved with save_pretrained (VAE factor 2 x patch 2 = 4 pixels per
    token, pos_embed_max_size 32: at most 128 pixels per side)."""
    from tiny_models import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(str(path))
    return str(path)


@pytest.fixture
def fresh_accelerate_state():
    """Clears accelerate's singletons after a test that ran a script's main() in-process."""
    from scripts_loader import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def generate_cli():
    """scripts/generate.py as a module (call ``.main(argv)``)."""
    from scripts_loader import load_script

    return load_script("generate")


@pytest.fixture
def forbid_loading(monkeypatch):
    """Loading a FLUX or SD3 pipeline fails the test: the settings must be checked first."""
    import diffusers

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the settings were checked")

    for name in ("FluxPipeline", "StableDiffusion3Pipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", boom)
