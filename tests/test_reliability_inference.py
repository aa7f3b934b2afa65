"""Reliability of inference, checkpoints and LoRA (issue 13): no silent wrong output, every check
that needs no weights before they load, honest messages, the release's proportional scale, and
CLEAR weights under PEFT adapters. CPU, tiny models; each test asserts the exit status or the
exception, the message, and that nothing wrong was written or loaded."""

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import clear
import clear.inference as inf
import clear.weights as weights
from clear.attention import pool_tokens
from clear.geometry import TokenLayout, Window, allowed_mask
from tiny_models import flux_inputs, tiny_flux

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--height", "32", "--width", "48", "--steps", "2", "--max_sequence_length", "16", "--device", "cpu", "--quiet"]


def _clear_file(path, radius=2, down_factor=1, seed=3, scale=0.3, fill=None, metadata=True):
    """A CLEAR checkpoint of the tiny FLUX transformer: perturbed weights, or every value ``fill``."""
    model = tiny_flux()
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


def _snapshot(model):
    return {k: v.detach().clone() for k, v in clear.clear_state_dict_keys(model).items()}


def _unchanged(model, before):
    after = clear.clear_state_dict_keys(model)
    return all(torch.equal(after[k], before[k]) for k in before)


def _run_cli(generate_cli, argv, monkeypatch) -> str:
    """scripts/generate.py's command line in-process: returns the message it exits with (status 1)."""
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.cli()
    code = exit_info.value.code
    assert isinstance(code, str) and code.startswith("error: "), code  # sys.exit(str): exit status 1
    return code


@pytest.fixture
def no_loading(monkeypatch):
    """Records every attempt to read a pipeline's config or weights (there must be none)."""
    from diffusers import DiffusionPipeline, FluxPipeline

    calls = []

    def record(name):
        def fail(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called before the settings were checked")
        return fail

    monkeypatch.setattr(FluxPipeline, "from_pretrained", record("FluxPipeline.from_pretrained"))
    monkeypatch.setattr(DiffusionPipeline, "load_config", record("DiffusionPipeline.load_config"))
    return calls


# ------------------------------------------------------------------------------------------
# 1. Non-finite values: an error, never a black PNG
# ------------------------------------------------------------------------------------------


def test_nan_checkpoint_and_nan_guidance_exit_with_a_message_and_no_png(generate_cli, tiny_flux_pipeline_dir,
                                                                        tmp_path, monkeypatch):
    nan_file = _clear_file(tmp_path / "nan.safetensors", fill=float("nan"))
    out = tmp_path / "out" / "img.png"
    msg = _run_cli(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY, "--radius", "2", "--checkpoint", nan_file,
                                  "--out", str(out)], monkeypatch)
    assert "holds NaN or inf values in" in msg and "transformer_blocks.0.attn.to_k.bias" in msg
    assert not out.parent.exists() or not list(out.parent.iterdir())

    msg = _run_cli(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY, "--radius", "2", "--checkpoint", "none",
                                  "--guidance", "nan", "--out", str(out)], monkeypatch)
    assert msg == "error: guidance=nan is not a finite number; pass e.g. 3.5 (or leave it out for the model's default)"
    assert not out.exists()


def test_weights_that_blow_up_stop_generation_without_a_png(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                            monkeypatch):
    """Finite weights whose attention logits overflow (1e30): NaN latents after the first step."""
    huge = _clear_file(tmp_path / "clear_local_2.safetensors", fill=1e30)
    out = tmp_path / "img.png"
    calls = []
    original_build = generate_cli.build_pipeline

    def build(args):  # count denoising steps: the run stops at the first one
        pipe = original_build(args)
        pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
        return pipe

    monkeypatch.setattr(generate_cli, "build_pipeline", build)
    msg = _run_cli(generate_cli, ["--model", tiny_flux_pipeline_dir, *TINY, "--radius", "2", "--checkpoint", huge,
                                  "--out", str(out)], monkeypatch)
    assert "NaN/inf values" in msg and "after denoising step 1 " in msg and "no image is returned" in msg
    assert len(calls) == 1  # stopped after step 1 of 2
    assert list(tmp_path.iterdir()) == [tmp_path / "clear_local_2.safetensors"]  # no PNG, no temporary file


def test_decoded_image_with_nan_is_refused():
    class Pipe:
        numpy_to_pil = staticmethod(lambda a: ["pil"])

    images = np.full((1, 4, 4, 3), 0.5, dtype=np.float32)
    assert inf.finite_image(Pipe(), images) == "pil"
    images[0, 1, 2, 0] = np.nan
    images[0, 3, 3, 1] = np.inf
    with pytest.raises(inf.NonFiniteImageError, match=r"the decoded image holds 2 NaN/inf values of 48"):
        inf.finite_image(Pipe(), images)


# ------------------------------------------------------------------------------------------
# 2. load_clear_weights: float, finite, and a radius it can verify
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_non_float_checkpoint_refused_naming_the_key(tmp_path, dtype):
    src = _clear_file(tmp_path / "src.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(src)
    key = "single_transformer_blocks.1.attn.to_v.weight"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    path = tmp_path / "clear_local_2.safetensors"
    save_file(tensors, str(path))
    model = tiny_flux()
    clear.apply_clear(model, 2)
    before = _snapshot(model)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"non-float tensors.*{re.escape(key)} \({name}\)"):
        clear.load_clear_weights(model, path)
    assert _unchanged(model, before)
    # the header check before any pipeline loads says the same
    with pytest.raises(ValueError, match=rf"non-float tensors.*{re.escape(key)} \({name}\)"):
        inf.check_checkpoint(path, 2, 1, "flux")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_checkpoint_refused_naming_the_key(tmp_path, value):
    from safetensors.torch import load_file

    tensors = load_file(_clear_file(tmp_path / "src.safetensors"))
    key = "transformer_blocks.1.attn.to_out.0.bias"
    tensors[key][3] = value
    path = tmp_path / "clear_local_2.safetensors"
    save_file(tensors, str(path))
    model = tiny_flux()
    clear.apply_clear(model, 2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"holds NaN or inf values in {re.escape(key)}: the weights are broken"):
        clear.load_clear_weights(model, path)
    assert _unchanged(model, before)


def test_unverifiable_radius_needs_acknowledgement(tmp_path, caplog):
    path = _clear_file(tmp_path / "my_weights.safetensors", radius=2, metadata=False)  # no metadata, own name
    model = tiny_flux()
    clear.apply_clear(model, 8)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"does not say which radius it was trained for .* \(radius=8\): if it was "
                                         r"trained for that radius, rename it clear_local_8\.safetensors, or pass "
                                         r"strict_radius=False \(on the command line: --no_strict_radius\)"):
        clear.load_clear_weights(model, path)
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match=r"does not say which radius.*clear_local_16: if it was trained for that "
                                         r"variant, rename it clear_local_16\.safetensors"):
        inf.check_checkpoint(path, 16, 1, "flux")  # before any pipeline loads
    inf.check_checkpoint(path, 16, 1, "flux", strict_radius=False)  # acknowledged
    with pytest.raises(ValueError, match=r"down_factor=1 but the chosen variant is clear_local_16_down_2"):
        inf.check_checkpoint(path, 16, 2, "flux", strict_radius=False)  # what the file does say is still checked
    with caplog.at_level(logging.WARNING, logger="clear.weights"):
        clear.load_clear_weights(model, path, strict_radius=False)
    assert "cannot be checked against the chosen window; loading it into CLEAR radius=8" in caplog.text
    from safetensors.torch import load_file

    assert all(torch.equal(clear.clear_state_dict_keys(model)[k], t) for k, t in load_file(path).items())
    # renamed like a released file, the same bytes load (the name states the radius)
    os.replace(path, tmp_path / "clear_local_8.safetensors")
    clear.load_clear_weights(model, tmp_path / "clear_local_8.safetensors")


def test_the_command_lines_can_load_a_file_without_its_radius(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                              monkeypatch):
    """The first release's distill.py wrote attn_weights.safetensors with no radius in it: generate.py and
    generate_eval_set.py refuse it naming --no_strict_radius, and load it with that flag."""
    from clear.commands import generate_eval_set
    from scripts_loader import load_script

    path = _clear_file(tmp_path / "attn_weights.safetensors", radius=2, metadata=False)
    argv = ["--model", tiny_flux_pipeline_dir, "--prompt", "a red house", *TINY, "--radius", "2",
            "--checkpoint", path, "--out", str(tmp_path / "r2.png")]
    message = _run_cli(generate_cli, argv, monkeypatch)
    assert "does not say which radius it was trained for" in message and "--no_strict_radius" in message, message
    assert not (tmp_path / "r2.png").exists()
    written = generate_cli.main(argv + ["--no_strict_radius"])
    assert Image.open(written["image"]).size == (48, 32)

    eval_args = ["--prompts", "p.txt", "--out", str(tmp_path / "eval"), "--model", tiny_flux_pipeline_dir,
                 "--height", "32", "--width", "48", "--device", "cpu", "--radius", "2", "--checkpoint", path]
    options = vars(load_script("generate_eval_set").parse_args(eval_args + ["--no_strict_radius"]))
    assert options["strict_radius"] is False
    window = dict(model=tiny_flux_pipeline_dir, height=32, width=48, radius=2, checkpoint=path, device="cpu")
    with pytest.raises(ValueError, match="--no_strict_radius"):
        generate_eval_set.preflight(**window)
    _, _, spec = generate_eval_set.preflight(**window, strict_radius=False)
    assert spec.checkpoint == path and spec.strict_radius is False


# ------------------------------------------------------------------------------------------
# 4. Every check that needs no weights runs before they load
# ------------------------------------------------------------------------------------------


def test_settings_refused_before_anything_loads(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch,
                                                no_loading):
    base = ["--model", tiny_flux_pipeline_dir, *TINY, "--checkpoint", "none"]
    out = ["--out", str(tmp_path / "x.png")]
    cases = [
        (["--radius", "0"], r"--radius 0 --down_factor 1: radius must be a positive number of tokens"),
        (["--radius", "-5"], r"--radius -5 --down_factor 1: radius must be a positive number of tokens"),
        (["--steps", "0"], r"steps=0: the number of denoising steps must be a whole number >= 1"),
        (["--upscale", "64x96", "--upscale_steps", "0"], r"upscale_steps=0: the number of denoising steps"),
        (["--guidance", "inf"], r"guidance=inf is not a finite number"),
        (["--upscale", "64x96", "--strength", "0.2", "--upscale_steps", "3"],
         r"strength=0.2 with 3 steps leaves no denoising step; use steps >= 5"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            generate_cli.main([*base, *extra, *out])
    assert no_loading == [] and not (tmp_path / "x.png").exists()


def test_size_bound_refused_with_a_message(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch):
    base = ["--model", tiny_flux_pipeline_dir, "--steps", "2", "--device", "cpu", "--checkpoint", "none",
            "--out", str(tmp_path / "x.png")]
    from diffusers import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    msg = _run_cli(generate_cli, [*base, "--height", "100000", "--width", "100000"], monkeypatch)
    assert msg == ("error: 100000x100000 is 10,000,000,000 pixels, more than the bound of 268,435,456 (max_pixels, "
                   "about 16384x16384): that far out, one image's latents, activations and decoded pixels run out "
                   "of memory. Choose a smaller size, or raise the bound (--max_pixels, or max_pixels=) if your "
                   "hardware really holds it")
    with pytest.raises(ValueError, match=r"64x96 is 6,144 pixels, more than the bound of 4,096"):
        generate_cli.main([*base, "--height", "32", "--width", "48", "--upscale", "64x96", "--max_pixels", "4096"])
    with pytest.raises(ValueError, match=r"more than the bound of 2,000"):  # the Python API has the same bound
        inf.check_size(32, 64, 4, max_pixels=2000)
    inf.check_size(100_000, 100_000, max_pixels=None)  # an explicit None: no bound


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_refused_before_loading(generate_cli, tiny_flux_pipeline_dir, tmp_path, monkeypatch,
                                                  no_loading):
    argv = ["--model", tiny_flux_pipeline_dir, "--height", "32", "--width", "48", "--checkpoint", "none",
            "--out", str(tmp_path / "x.png")]
    msg = _run_cli(generate_cli, [*argv, "--device", "cuda"], monkeypatch)
    assert msg.startswith("error: --device cuda: CUDA is not available on this machine (torch ")
    assert "Use --device cpu" in msg
    msg = _run_cli(generate_cli, [*argv, "--device", "gpu0"], monkeypatch)
    assert msg.startswith("error: --device 'gpu0' is not a device name")
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):  # the Python API too
        inf.load_pipeline(tiny_flux_pipeline_dir, "cuda:1")
    assert no_loading == []


def test_unwritable_out_refused_before_any_denoising_step(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                          monkeypatch, no_loading):
    base = ["--model", tiny_flux_pipeline_dir, *TINY, "--radius", "2", "--checkpoint", "none"]
    folder = tmp_path / "existing.png"
    folder.mkdir()
    msg = _run_cli(generate_cli, [*base, "--out", str(folder)], monkeypatch)
    assert msg == (f"error: --out {folder} is an existing folder; pass a file name inside it, "
                   f"e.g. {folder / 'image.png'}")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    msg = _run_cli(generate_cli, [*base, "--out", str(a_file / "sub" / "img.png")], monkeypatch)
    assert msg == (f"error: --out {a_file / 'sub' / 'img.png'}: {a_file} is a file, so no folder can be made there; "
                   "choose another path")
    assert no_loading == []  # neither the config nor the weights were read: no pipeline, no denoising step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png", "notes.txt"] and not list(folder.iterdir())
    if os.geteuid() != 0:  # root writes into read-only folders, so only other users can see this refusal
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            msg = _run_cli(generate_cli, [*base, "--out", str(ro / "img.png")], monkeypatch)
            assert f"the folder {ro} is not writable" in msg
        finally:
            ro.chmod(0o755)


def test_library_checks_before_the_pipeline_runs(tiny_flux_pipeline_dir):
    pipe = inf.load_pipeline(tiny_flux_pipeline_dir, "cpu", "float32")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    for kwargs, message in [(dict(steps=0), "steps=0"), (dict(guidance=float("nan")), "guidance=nan"),
                            (dict(steps=1.5), "steps=1.5")]:
        with pytest.raises(ValueError, match=message):
            inf.generate(pipe, "a cat", 32, 48, max_sequence_length=16, **kwargs)
    with pytest.raises(ValueError, match="more than the bound of 1,000"):
        inf.generate(pipe, "a cat", 32, 48, max_sequence_length=16, max_pixels=1000)
    with pytest.raises(ValueError, match="upscale_steps=0"):
        inf.generate_highres(pipe, "a cat", [(48, 64)], (32, 48), upscale_steps=0, progress=False)
    with pytest.raises(ValueError, match="radius must be a positive number"):
        inf.ClearSpec(0)
    assert calls == []


# ------------------------------------------------------------------------------------------
# 5. Messages: local paths, offline, leftovers, retries, --help
# ------------------------------------------------------------------------------------------


def test_misspelled_local_model_is_no_such_folder(generate_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flux_dev").mkdir(parents=True)
    argv = ["--height", "32", "--width", "48", "--checkpoint", "none", "--device", "cpu", "--out", "x.png"]
    msg = _run_cli(generate_cli, ["--model", "./models/flux-dev", *argv], monkeypatch)
    assert msg == (f"error: --model ./models/flux-dev: no such folder ({tmp_path / 'models' / 'flux-dev'} does not "
                   f"exist; the nearest existing folder is {tmp_path / 'models'}, which holds: flux_dev). Check the "
                   "spelling, or pass a Hub id such as black-forest-labs/FLUX.1-dev")
    msg = _run_cli(generate_cli, ["--model", "models/flux-dev", *argv], monkeypatch)  # ./models exists: a path
    assert "--model models/flux-dev: no such folder" in msg
    msg = _run_cli(generate_cli, ["--model", str(tmp_path / "nowhere" / "flux"), *argv], monkeypatch)
    assert f"no such folder ({tmp_path / 'nowhere' / 'flux'} does not exist; the nearest existing folder is " \
           f"{tmp_path}, which holds: models)" in msg


def test_offline_hub_id_message_says_hf_auth_login(generate_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _run_cli(generate_cli, ["--model", "someone/not-cached", "--checkpoint", "none", "--device", "cpu"],
                   monkeypatch)
    assert "a Hub id that is not in the local Hugging Face cache, and the Hub is unreachable (HF_HUB_OFFLINE is set)" \
        in msg
    assert "`hf auth login`" in msg and "huggingface-cli" not in msg
    assert list(tmp_path.iterdir()) == []


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """hf_hub_download(local_dir=...) makes local_dir/.cache/huggingface/ before it fails: it is removed again."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake_download(repo_id, filename, local_dir=None, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        (Path(local_dir) / ".cache" / "huggingface" / "download").mkdir(parents=True)
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(weights, "hub_unreachable", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\(ConnectionError: connection reset by peer\), and it is not in the "
                                                r"local Hugging Face cache\. Download it by hand and put it at "
                                                r"ckpt/clear_local_16\.safetensors \(for a gated or private repo, "
                                                r"`hf auth login` first\)"):
        clear.download_weights(16)
    assert list(tmp_path.iterdir()) == []  # no ckpt/, no ckpt/.cache/huggingface/
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.safetensors").write_text("x")
    with pytest.raises(FileNotFoundError):
        clear.download_weights(16)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["mine.safetensors"]  # the user's folder is kept


def test_unresolvable_hub_fails_at_once_without_retries(tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    assert weights.hub_unreachable().startswith("cannot resolve hub.invalid")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with caplog.at_level(logging.DEBUG), pytest.raises(FileNotFoundError, match=r"\(cannot resolve hub\.invalid"):
        clear.download_weights(8)
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match=r"a Hub id that is not in the local Hugging "
                                                                      r"Face cache, and the Hub is unreachable "
                                                                      r"\(cannot resolve hub\.invalid"):
        inf.check_model("someone/not-cached")
    assert time.perf_counter() - start < 5  # the hub's retries alone take ~25 s
    assert "Retrying" not in caplog.text + "".join(capfd.readouterr())
    assert list(tmp_path.iterdir()) == []


def test_cached_hub_model_generates_with_the_hub_unreachable(generate_cli, tiny_flux_pipeline_dir, tmp_path,
                                                             monkeypatch, capfd, caplog):
    """A Hub id in the local cache, no network (host does not resolve), HF_HUB_OFFLINE not set: configs and
    weights come from the cache at once, without the hub's retries."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    repo = Path(constants.HF_HUB_CACHE) / f"models--clear-tests--tiny-flux-{os.getpid()}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    try:
        shutil.copytree(tiny_flux_pipeline_dir, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        out = tmp_path / "img.png"
        start = time.perf_counter()
        with caplog.at_level(logging.DEBUG):
            written = generate_cli.main(["--model", f"clear-tests/tiny-flux-{os.getpid()}", *TINY, "--radius", "2",
                                         "--checkpoint", "none", "--out", str(out)])
        assert written == {"image": str(out)} and Image.open(out).size == (48, 32)
        assert time.perf_counter() - start < 60  # the hub's retries: ~25 s for each file read
        assert "Retrying" not in caplog.text + "".join(capfd.readouterr())
    finally:
        shutil.rmtree(repo, ignore_errors=True)


@pytest.mark.parametrize("script", ["generate", "generate_highres"])
def test_help_is_fast_and_imports_nothing_heavy(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--help"], capture_output=True,
                          text=True, env=env, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "--max_pixels" in proc.stdout and "--proportional_formula" in proc.stdout
    assert seconds < 3, f"--help took {seconds:.1f} s"
    probe = ("import importlib.util, json, sys\n"
             f"spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'scripts' / (script + '.py'))!r})\n"
             "m = importlib.util.module_from_spec(spec); sys.path.insert(0, %r); spec.loader.exec_module(m)\n"
             "m.build_parser().parse_args(['--height', '32', '--radius', '0'])\n"
             "print(json.dumps(sorted(k for k in ('torch', 'diffusers', 'transformers', 'safetensors', "
             "'huggingface_hub', 'numpy') if k in sys.modules)))") % str(ROOT / "scripts")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# ------------------------------------------------------------------------------------------
# 7. Proportional attention: the release's scale for down-sampled variants
# ------------------------------------------------------------------------------------------


def test_proportional_scale_release_formula_for_down_sampled_variants():
    layout = TokenLayout(7, 8, 12)
    n, l0, d = layout.seq_len, 64 * 64 + 512, 16
    release = math.sqrt(math.log(10 * n, l0) / d)
    plain = math.sqrt(math.log(n, l0) / d)
    assert clear.ClearAttention(3, 2, proportional_attention=True).scale(layout, d) == pytest.approx(release, 1e-12)
    assert clear.ClearAttention(3, 2, proportional_attention="release").scale(layout, d) == pytest.approx(release)
    assert clear.ClearAttention(3, 2, proportional_attention="plain").scale(layout, d) == pytest.approx(plain, 1e-12)
    assert clear.ClearAttention(3, 1, proportional_attention=True).scale(layout, d) == pytest.approx(plain, 1e-12)
    assert clear.ClearAttention(3, 2, proportional_attention=False).scale(layout, d) == 0.25
    with pytest.raises(ValueError, match="proportional_attention must be one of"):
        clear.ClearAttention(3, 2, proportional_attention="yes")
    # FLUX.1 at 4096² with df = 4: the two formulas are ~10% apart
    big = TokenLayout(512, 256, 256)
    ratio = clear.ClearAttention(16, 4, proportional_attention=True).scale(big, 128) / \
        clear.ClearAttention(16, 4, proportional_attention="plain").scale(big, 128)
    assert ratio == pytest.approx(math.sqrt(math.log(10 * big.seq_len) / math.log(big.seq_len)))
    assert 1.09 < ratio < 1.11
    # and the attention output is SDPA with that scale over [keys | pooled keys]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 2, d, generator=g) for _ in range(3))
    sw = torch.rand(1, 1, 1, 2, 1, 2, 1, generator=g)
    img = layout.image_slice
    kk = torch.cat([k, pool_tokens(k[:, img], 8, 12, sw)], 1)
    vv = torch.cat([v, pool_tokens(v[:, img], 8, 12, sw)], 1)
    mask = allowed_mask(layout, Window(3, 2))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask,
                                         scale=release).transpose(1, 2)
    core = clear.ClearAttention(3, 2, backend="dense", proportional_attention=True)
    torch.testing.assert_close(core(q, k, v, layout, sw), ref)


def test_highres_upscaling_uses_the_chosen_proportional_formula(tiny_flux_pipeline_dir):
    pipe = inf.load_pipeline(tiny_flux_pipeline_dir, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a: seen.append(m.clear_state.core.proportional_attention if m.clear_state else None))
    for formula in (True, "plain"):
        inf.generate_highres(pipe, "a cat", [(48, 64)], (32, 48), clear=inf.ClearSpec(2, 2), steps=2, upscale_steps=2,
                             strength=0.5, proportional=formula, max_sequence_length=16, progress=False,
                             base_image=Image.new("RGB", (48, 32)))
    assert seen == [True, "plain"]
    assert pipe.transformer.clear_state.core.proportional_attention is False  # put back


# ------------------------------------------------------------------------------------------
# 8. LoRA (PEFT adapters) and CLEAR
# ------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)


def _lora_weights(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.2 for n, p in model.named_parameters() if ".lora_" in n}


def _set_lora(model, lora):
    params = dict(model.named_parameters())
    assert set(lora) <= set(params) and lora
    with torch.no_grad():
        for n, t in lora.items():
            params[n].copy_(t)


def _merged_reference(clear_path, lora):
    """CLEAR weights with each LoRA delta (alpha/r) B @ A added by hand: what CLEAR + LoRA must compute."""
    model = tiny_flux()
    clear.apply_clear(model, 2)
    clear.load_clear_weights(model, clear_path)
    params = clear.clear_state_dict_keys(model)
    with torch.no_grad():
        for name in lora:
            if name.endswith("lora_A.default.weight"):
                proj = name[: -len(".lora_A.default.weight")]
                b = lora[proj + ".lora_B.default.weight"]
                params[proj + ".weight"].add_(b @ lora[name] * (8 / 4))
    return model


def test_clear_and_lora_in_either_order_give_the_same_output(tmp_path):
    path = _clear_file(tmp_path / "clear_local_2.safetensors")
    x = flux_inputs(6, 10, seed=1)

    clear_then_lora = tiny_flux()
    clear.apply_clear(clear_then_lora, 2)
    clear.load_clear_weights(clear_then_lora, path)
    clear_then_lora.add_adapter(_lora_config())
    lora = _lora_weights(clear_then_lora)
    _set_lora(clear_then_lora, lora)

    lora_then_clear = tiny_flux()
    lora_then_clear.add_adapter(_lora_config())
    _set_lora(lora_then_clear, lora)
    clear.apply_clear(lora_then_clear, 2)
    clear.load_clear_weights(lora_then_clear, path)

    with torch.no_grad():
        a, b = clear_then_lora(**x).sample, lora_then_clear(**x).sample
        merged = _merged_reference(path, lora)(**x).sample
        clear_only = tiny_flux()
        clear.apply_clear(clear_only, 2)
        clear.load_clear_weights(clear_only, path)
        without_lora = clear_only(**x).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, merged, rtol=1e-5, atol=1e-5)  # CLEAR weights + the LoRA's delta
    assert (a - without_lora).abs().max() > 1e-2  # the LoRA keeps its effect


def test_save_load_round_trip_under_an_adapter_is_exact(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = _clear_file(tmp_path / "clear_local_2.safetensors")
    model = tiny_flux()
    model.add_adapter(_lora_config())
    lora = _lora_weights(model)
    _set_lora(model, lora)
    clear.apply_clear(model, 2)
    clear.load_clear_weights(model, src)
    saved = clear.save_clear_weights(model, tmp_path / "again" / "clear_local_2.safetensors")
    original = load_file(src)
    with safe_open(saved, "pt") as f:
        assert set(f.keys()) == set(original) and len(original) == 28  # the released layout: no base_layer, no lora
        assert all(torch.equal(f.get_tensor(k), original[k]) for k in original)

    other = tiny_flux(seed=9)
    other.add_adapter(_lora_config())
    _set_lora(other, lora)
    clear.apply_clear(other, 2)
    clear.load_clear_weights(other, saved)
    mine, theirs = clear.clear_state_dict_keys(model), clear.clear_state_dict_keys(other)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "transformer_blocks.0.attn.to_q.weight" in theirs
    assert theirs["transformer_blocks.0.attn.to_q.weight"] is other.transformer_blocks[0].attn.to_q.base_layer.weight
    params = dict(other.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in lora.items())  # the adapter is untouched


def test_empty_save_refused_and_nothing_written(tmp_path, monkeypatch):
    model = tiny_flux()
    clear.apply_clear(model, 2)
    monkeypatch.setattr(weights, "_PROJECTIONS", ("to_missing",))  # projections where CLEAR does not look
    path = tmp_path / "w" / "clear_local_2.safetensors"
    with pytest.raises(ValueError, match=r"nothing to save to .*clear_local_2\.safetensors: the model has no CLEAR "
                                         "attention projections"):
        clear.save_clear_weights(model, path)
    assert not path.parent.exists() or not list(path.parent.iterdir())


def test_clear_after_fused_lora_refused(tmp_path):
    path = _clear_file(tmp_path / "clear_local_2.safetensors")
    model = tiny_flux()
    model.add_adapter(_lora_config())
    _set_lora(model, _lora_weights(model))
    clear.apply_clear(model, 2)
    model.fuse_lora()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot load CLEAR weights: a LoRA is fused into the attention projections "
                                         r"\(.*\).*Load CLEAR first and fuse the LoRA afterwards"):
        clear.load_clear_weights(model, path)
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match="cannot save CLEAR weights: a LoRA is fused"):
        clear.save_clear_weights(model, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()
    model.unfuse_lora()  # after unfusing, loading works again and the LoRA stays on top
    clear.load_clear_weights(model, path)


def test_pipeline_load_lora_weights_either_order_and_fuse(tmp_path):
    """The diffusers path users take (``pipe.load_lora_weights``, ``pipe.fuse_lora``) on a tiny FluxPipeline."""
    from safetensors.torch import load_file
    from tiny_models import tiny_flux_pipeline

    path = _clear_file(tmp_path / "clear_local_2.safetensors")
    x = flux_inputs(6, 10, guidance=True)
    outputs = []
    for clear_first in (True, False):
        pipe = tiny_flux_pipeline()
        t = pipe.transformer
        g = torch.Generator().manual_seed(0)
        lora = {}
        for name, m in t.named_modules():
            if name.endswith(tuple(f"attn.{p}" for p in LORA_TARGETS)):
                lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.2
                lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.2
        if clear_first:
            clear.apply_clear(t, 2)
            clear.load_clear_weights(t, path)
        pipe.load_lora_weights(lora, adapter_name="style")
        if not clear_first:
            clear.apply_clear(t, 2)
            clear.load_clear_weights(t, path)
        with torch.no_grad():
            outputs.append(t(**x).sample)
        saved = load_file(clear.save_clear_weights(t, tmp_path / f"saved_{clear_first}.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in load_file(path).items()) and len(saved) == 28
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)

    pipe.fuse_lora()
    with pytest.raises(ValueError, match="a LoRA is fused into the attention projections"):
        clear.load_clear_weights(t, path)
    pipe.unfuse_lora()
    clear.load_clear_weights(t, path)
    with torch.no_grad():
        torch.testing.assert_close(t(**x).sample, outputs[1], rtol=0, atol=0)  # unfused: the same model again
