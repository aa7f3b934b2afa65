"""CLEAR checkpoints: round trips, the released layout, download, and every bad input's error: files that are
not float, not finite or do not say their radius are refused before anything changes (from Python and from the
command lines), and CLEAR weights live under PEFT adapters (LoRA) in either order."""

import logging
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clear
import clear.inference as inf
import clear.weights as weights
from scripts_loader import cli_error, load_script
from tiny_models import FLUX_CONFIG, TINY_ARGS, clear_checkpoint, flux_inputs, tiny_flux


def released_layout(df: int = 1, seed: int = 0) -> dict:
    """A synthetic file in the released key layout, written from the FLUX module structure (not by clear)."""
    g = torch.Generator().manual_seed(seed)
    dim = FLUX_CONFIG["num_attention_heads"] * FLUX_CONFIG["attention_head_dim"]
    tensors = {}
    for prefix, projs in [("transformer_blocks", ("to_q", "to_k", "to_v", "to_out.0")),
                          ("single_transformer_blocks", ("to_q", "to_k", "to_v"))]:
        for i in range(2):
            for proj in projs:
                tensors[f"{prefix}.{i}.attn.{proj}.weight"] = torch.randn(dim, dim, generator=g)
                tensors[f"{prefix}.{i}.attn.{proj}.bias"] = torch.randn(dim, generator=g)
            if df > 1:
                tensors[f"{prefix}.{i}.attn.processor.spatial_weight"] = torch.rand(1, 1, 1, df, 1, df, 1, generator=g)
    return tensors


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(model).values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_round_trip(tmp_path, flux):
    clear.apply_clear(flux, radius=3, down_factor=2)
    randomize(flux)
    path = clear.save_clear_weights(flux, tmp_path / "sub" / "w.safetensors")
    assert not [f for f in os.listdir(tmp_path / "sub") if f != "w.safetensors"]  # no temp file left behind
    other = tiny_flux(seed=7)
    clear.apply_clear(other, radius=3, down_factor=2)
    clear.load_clear_weights(other, path)
    a, b = clear.clear_state_dict_keys(flux), clear.clear_state_dict_keys(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # only the CLEAR parameters travel: other weights of `other` are untouched
    assert not torch.equal(flux.x_embedder.weight, other.x_embedder.weight)


def test_saved_layout_is_the_released_layout(tmp_path, flux):
    clear.apply_clear(flux, radius=16, down_factor=2)
    from safetensors import safe_open

    path = clear.save_clear_weights(flux, tmp_path / "w.safetensors")
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(released_layout(df=2))
        assert f.metadata()["clear.radius"] == "16"


@pytest.mark.parametrize("df", [1, 2])
def test_load_released_layout(tmp_path, flux, df):
    tensors = released_layout(df)
    name = "clear_local_16" + (f"_down_{df}" if df > 1 else "") + ".safetensors"
    save_file(tensors, tmp_path / name)
    clear.apply_clear(flux, radius=16, down_factor=df)
    clear.load_clear_weights(flux, tmp_path / name)
    params = clear.clear_state_dict_keys(flux)
    assert all(torch.equal(params[k], tensors[k]) for k in tensors)
    assert torch.equal(flux.single_transformer_blocks[1].attn.to_v.bias, tensors["single_transformer_blocks.1.attn.to_v.bias"])


def test_load_into_fused_projections(tmp_path):
    save_file(released_layout(), tmp_path / "clear_local_3.safetensors")
    x = flux_inputs(6, 10)
    outs = []
    for fuse in (False, True):
        model = tiny_flux()
        if fuse:
            model.fuse_qkv_projections()
        clear.apply_clear(model, radius=3)
        clear.load_clear_weights(model, tmp_path / "clear_local_3.safetensors")
        with torch.no_grad():
            outs.append(model(**x).sample)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def _bad(tmp_path, tensors, name="clear_local_16.safetensors", metadata=None):
    save_file(tensors, tmp_path / name, metadata=metadata)
    return tmp_path / name


def test_errors(tmp_path, flux):
    with pytest.raises(ValueError, match="call clear.apply_clear"):
        clear.load_clear_weights(flux, "nowhere.safetensors")
    clear.apply_clear(flux, radius=16)
    good = released_layout()

    t = dict(good); t.pop("transformer_blocks.1.attn.to_out.0.bias")
    with pytest.raises(ValueError, match=r"missing keys: transformer_blocks\.1\.attn\.to_out\.0\.bias"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    t = dict(good); t["transformer_blocks.5.attn.to_q.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: transformer_blocks\.5\.attn\.to_q\.weight"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    t = dict(good); t["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match=r"wrong shape.*to_q\.weight: file \(16, 32\) vs model \(32, 32\)"):
        clear.load_clear_weights(flux, _bad(tmp_path, t))

    with pytest.raises(ValueError, match=r"down_factor=2 but CLEAR was applied with down_factor=1"):
        clear.load_clear_weights(flux, _bad(tmp_path, released_layout(df=2), "clear_local_16_down_2.safetensors"))

    with pytest.raises(ValueError, match=r"trained for radius=8 but CLEAR was applied with radius=16"):
        clear.load_clear_weights(flux, _bad(tmp_path, good, "clear_local_8.safetensors"))
    clear.load_clear_weights(flux, tmp_path / "clear_local_8.safetensors", strict_radius=False)  # on purpose

    with pytest.raises(ValueError, match=r"for a sd3 model, not flux"):
        clear.load_clear_weights(flux, _bad(tmp_path, good, "mine.safetensors", {"clear.family": "sd3"}))

    path = _bad(tmp_path, good, "clear_local_16.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        clear.load_clear_weights(flux, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clear.load_clear_weights(flux, tmp_path / "missing.safetensors")

    clear.apply_clear(flux, radius=16, down_factor=2)
    with pytest.raises(ValueError, match=r"down_factor=1 but CLEAR was applied with down_factor=2"):
        clear.load_clear_weights(flux, _bad(tmp_path, good))


def test_variants():
    assert set(clear.RELEASED) == {"clear_local_8", "clear_local_16", "clear_local_32", "clear_local_8_down_4",
                                   "clear_local_16_down_4"}
    v = clear.Variant.parse("ckpt/clear_local_16_down_4.safetensors")
    assert (v.radius, v.down_factor, v.filename) == (16, 4, "clear_local_16_down_4.safetensors")
    with pytest.raises(ValueError, match="not a CLEAR variant name"):
        clear.Variant.parse("flux.safetensors")


def test_download_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # 1. already in local_dir: no Hub call at all
    (tmp_path / "ckpt").mkdir()
    save_file(released_layout(), tmp_path / "ckpt" / "clear_local_8.safetensors")
    assert clear.download_weights(8, local_dir=tmp_path / "ckpt") == str(tmp_path / "ckpt" / "clear_local_8.safetensors")

    # 2. not released
    with pytest.raises(ValueError, match="no released CLEAR weights for clear_local_12"):
        clear.download_weights(12, local_dir=tmp_path / "ckpt")

    # 3. offline, not anywhere: the error says where to put the file
    with pytest.raises(FileNotFoundError, match=r"put it at .*ckpt/clear_local_16_down_4\.safetensors"):
        clear.download_weights(16, 4, local_dir=tmp_path / "ckpt")

    # 4. offline, in the Hugging Face cache: the real hf_hub_download finds it
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--Huage001--CLEAR"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(released_layout(), repo / "snapshots" / commit / "clear_local_16.safetensors")
    path = clear.download_weights(16, local_dir=tmp_path / "ckpt")
    assert path.endswith("clear_local_16.safetensors") and os.path.isfile(path)
    model = tiny_flux()
    clear.apply_clear(model, radius=16)
    clear.load_clear_weights(model, path)


def snapshot(model):
    return {k: v.detach().clone() for k, v in clear.clear_state_dict_keys(model).items()}


def unchanged(model, before):
    after = clear.clear_state_dict_keys(model)
    return all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------------
# Refused files: float, finite, and a radius it can verify (checked before anything changes)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_non_float_checkpoint_refused_naming_the_key(tmp_path, dtype):
    src = clear_checkpoint(tmp_path / "src.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(src)
    key = "single_transformer_blocks.1.attn.to_v.weight"
    tensors[key] = torch.ones_like(tensors[key]).to(dtype)
    path = tmp_path / "clear_local_2.safetensors"
    save_file(tensors, str(path))
    model = tiny_flux()
    clear.apply_clear(model, 2)
    before = snapshot(model)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"non-float tensors.*{re.escape(key)} \({name}\)"):
        clear.load_clear_weights(model, path)
    assert unchanged(model, before)
    # the header check before any pipeline loads says the same
    with pytest.raises(ValueError, match=rf"non-float tensors.*{re.escape(key)} \({name}\)"):
        inf.check_checkpoint(path, 2, 1, "flux")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_checkpoint_refused_naming_the_key(tmp_path, value):
    from safetensors.torch import load_file

    tensors = load_file(clear_checkpoint(tmp_path / "src.safetensors"))
    key = "transformer_blocks.1.attn.to_out.0.bias"
    tensors[key][3] = value
    path = tmp_path / "clear_local_2.safetensors"
    save_file(tensors, str(path))
    model = tiny_flux()
    clear.apply_clear(model, 2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"holds NaN or inf values in {re.escape(key)}: the weights are broken"):
        clear.load_clear_weights(model, path)
    assert unchanged(model, before)


def test_unverifiable_radius_needs_acknowledgement(tmp_path, caplog):
    path = clear_checkpoint(tmp_path / "my_weights.safetensors", radius=2, metadata=False)  # no metadata, own name
    model = tiny_flux()
    clear.apply_clear(model, 8)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not say which radius it was trained for .* \(radius=8\): if it was "
                                         r"trained for that radius, rename it clear_local_8\.safetensors, or pass "
                                         r"strict_radius=False \(on the command line: --no_strict_radius\)"):
        clear.load_clear_weights(model, path)
    assert unchanged(model, before)
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

    path = clear_checkpoint(tmp_path / "attn_weights.safetensors", radius=2, metadata=False)
    argv = ["--model", tiny_flux_pipeline_dir, "--prompt", "a red house", *TINY_ARGS, "--radius", "2",
            "--checkpoint", path, "--out", str(tmp_path / "r2.png")]
    message = cli_error(generate_cli, argv, monkeypatch)
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


def test_empty_save_refused_and_nothing_written(tmp_path, monkeypatch):
    model = tiny_flux()
    clear.apply_clear(model, 2)
    monkeypatch.setattr(weights, "_PROJECTIONS", ("to_missing",))  # projections where CLEAR does not look
    path = tmp_path / "w" / "clear_local_2.safetensors"
    with pytest.raises(ValueError, match=r"nothing to save to .*clear_local_2\.safetensors: the model has no CLEAR "
                                         "attention projections"):
        clear.save_clear_weights(model, path)
    assert not path.parent.exists() or not list(path.parent.iterdir())


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


def test_downloads_pin_a_revision(tmp_path, monkeypatch):
    """Every Hub call of download_weights names a revision: the pinned HUB_REVISION, or the caller's (argument,
    resolve_checkpoint, the generate scripts' --weights_revision)."""
    import huggingface_hub

    from clear.commands import generate as generate_cmd
    from clear.inference import resolve_checkpoint

    calls = []

    def fake_download(repo_id, filename, local_dir=None, local_files_only=False, revision=None, **kw):
        calls.append((revision, local_files_only))
        path = tmp_path / "hub" / str(revision) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(released_layout(), path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for reachable in (None, "HF_HUB_OFFLINE is set"):  # online, then from the local cache only
        monkeypatch.setattr(weights, "hub_unreachable", lambda: reachable)
        calls.clear()
        clear.download_weights(16, local_dir=tmp_path / f"ckpt-{reachable is None}")
        assert calls == [(weights.HUB_REVISION, reachable is not None)]
    assert weights.HUB_REVISION and isinstance(weights.HUB_REVISION, str)
    calls.clear()
    clear.download_weights(8, local_dir=tmp_path / "a", revision="0123abc")
    resolve_checkpoint("released", 8, local_dir=tmp_path / "b", revision="4567def")
    assert [c[0] for c in calls] == ["0123abc", "4567def"]
    p = __import__("argparse").ArgumentParser()
    generate_cmd.add_arguments(p)
    assert p.parse_args(["--weights_revision", "89ab"]).weights_revision == "89ab"
    assert p.parse_args([]).weights_revision is None  # None: HUB_REVISION


# ------------------------------------------------------------------------------------------
# LoRA (PEFT adapters) and CLEAR
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
    path = clear_checkpoint(tmp_path / "clear_local_2.safetensors")
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

    src = clear_checkpoint(tmp_path / "clear_local_2.safetensors")
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


def test_clear_after_fused_lora_refused(tmp_path):
    path = clear_checkpoint(tmp_path / "clear_local_2.safetensors")
    model = tiny_flux()
    model.add_adapter(_lora_config())
    _set_lora(model, _lora_weights(model))
    clear.apply_clear(model, 2)
    model.fuse_lora()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot load CLEAR weights: a LoRA is fused into the attention projections "
                                         r"\(.*\).*Load CLEAR first and fuse the LoRA afterwards"):
        clear.load_clear_weights(model, path)
    assert unchanged(model, before)
    with pytest.raises(ValueError, match="cannot save CLEAR weights: a LoRA is fused"):
        clear.save_clear_weights(model, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()
    model.unfuse_lora()  # after unfusing, loading works again and the LoRA stays on top
    clear.load_clear_weights(model, path)


def test_pipeline_load_lora_weights_either_order_and_fuse(tmp_path):
    """The diffusers path users take (``pipe.load_lora_weights``, ``pipe.fuse_lora``) on a tiny FluxPipeline."""
    from safetensors.torch import load_file
    from tiny_models import tiny_flux_pipeline

    path = clear_checkpoint(tmp_path / "clear_local_2.safetensors")
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
