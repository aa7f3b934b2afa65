"""Distillation fails loudly instead of silently: non-finite steps, honest resume (settings, data,
damaged checkpoints), one run per output folder, every check before the models load, full
disks, truncated shards, distinct bad-sample counts, and the release's L_attn layers."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clear
from clear.checkpointing import (
    LOCK,
    MANIFEST,
    checkpoint_problem,
    latest_complete,
    rotate,
    settings_changes,
    write_manifest,
)
from clear.distill import attention_layers
from clear.families import FAMILIES
from scripts_loader import load_script
from test_training import DISTILL, REPO, data, run_env  # noqa: F401 (data: the shared module fixture)
from tiny_models import tiny_flux

cache_latent_codes, cache_prompt_embeds = load_script("cache_latent_codes"), load_script("cache_prompt_embeds")
distill = load_script("distill")

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def distill_args(data, out, *extra):
    return ["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(data["root"] / "data"),
            "--output_dir", str(out), "--use_cached_prompt_embed", "--use_cached_latent", *DISTILL,
            "--learning_rate", "1e-3", *extra]


def listing(folder: Path) -> dict:
    """Every file under ``folder`` with its size: to show that a refused run wrote nothing."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Replaces the heavy part (models, loop) with a recorder: a check that refuses first leaves it uncalled."""
    calls = []
    monkeypatch.setattr(distill, "train", lambda *a, **k: calls.append(a) or {"lock": _lock_holder(a[0])})
    return calls


def _lock_holder(args):
    return json.loads((Path(args.output_dir) / LOCK).read_text())


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step."""
    from scripts_loader import reset_accelerate_state

    out = tmp_path_factory.mktemp("reliability") / "run"
    result = distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    reset_accelerate_state()
    return dict(out=out, result=result)


def copy_run(run2, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run2["out"], out)
    return out


# ------------------------------------------------------------------------------------------
# 1. non-finite training
# ------------------------------------------------------------------------------------------

def test_divergence_stops_before_saving_and_keeps_the_last_finite_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    args = distill_args(data, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30", "--max_train_steps", "6",
                        "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    with pytest.raises(SystemExit) as e:
        distill.main(args)
    message = str(e.value.code)
    assert message.startswith("training diverged at step 2: ") and "nan" in message, message
    assert "the last checkpoint, checkpoint-1, holds finite weights" in message
    assert "--allow_changed_settings" in message  # how to resume with a lower learning rate
    # step 1 (finite, if absurd) was saved; nothing of step 2, no final weights, no temp folder, no lock
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    weights = load_file(str(out / "checkpoint-1" / "clear_local_2.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert checkpoint_problem(out / "checkpoint-1") is None


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    """An optimizer step that leaves a NaN in the weights (injected) with a finite loss and gradient:
    the checkpoint of that step is refused before anything is written."""
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^step 1: the CLEAR weights \S+ are not finite; nothing was saved"):
        distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_deepspeed_divergence_stops_before_saving(data, tmp_path):
    """Under DeepSpeed ZeRO-2 (fp32, CPU) the optimizer step runs inside backward: the check reads the
    global gradient norm DeepSpeed returns and the losses, and stops before the checkpoint of that step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "deepspeed_cpu.yaml"), str(REPO / "scripts" / "distill.py"),
           *distill_args(data, out, "--learning_rate", "1e30", "--max_grad_norm", "1e30", "--max_train_steps", "4",
                         "--checkpointing_steps", "1", "--checkpoints_total_limit", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "training diverged at step 2: " in proc.stderr, proc.stderr[-5000:]
    assert "the last checkpoint, checkpoint-1, holds finite weights" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no final weights, no temp folder, no lock
    weights = load_file(str(out / "checkpoint-1" / "clear_local_2.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_rotation_keeps_the_newest_complete_checkpoint(tmp_path):
    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "optimizer.bin").write_bytes(b"x" * 100)
        write_manifest(folder)
    with open(tmp_path / "checkpoint-3" / "optimizer.bin", "r+b") as f:
        f.truncate(10)
    assert checkpoint_problem(tmp_path / "checkpoint-3") == "optimizer.bin has 10 bytes, 100 were written"
    assert [p.name for p in rotate(tmp_path, keep=1)] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # damaged: not counted
    assert latest_complete(tmp_path) == (tmp_path / "checkpoint-2", [(tmp_path / "checkpoint-3",
                                                                      "optimizer.bin has 10 bytes, 100 were written")])


# ------------------------------------------------------------------------------------------
# 3. honest resume
# ------------------------------------------------------------------------------------------

def test_checkpoints_record_settings_dataset_and_manifest(run2):
    ckpt = run2["out"] / "checkpoint-2"
    settings = json.loads((ckpt / "run_settings.json").read_text())
    assert settings["learning_rate"] == 1e-3 and settings["seed"] == 0 and settings["num_processes"] == 1
    state = json.loads((ckpt / "data_state.rank0.json").read_text())
    assert state["dataset"]["num_samples"] == 5 and len(state["dataset"]["sha256"]) == 64
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"clear_local_2.safetensors", "run_settings.json", "data_state.rank0.json", "optimizer.bin"} <= set(manifest)
    assert not (run2["out"] / LOCK).exists()  # released at the end


def test_resume_refuses_changed_settings_before_loading_models(run2, data, tmp_path, no_training):
    out = copy_run(run2, tmp_path)
    before = listing(out)
    args = distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    with pytest.raises(SystemExit) as e:
        distill.main(args + ["--learning_rate", "5e-4", "--seed", "3", "--train_batch_size", "1",
                             "--checkpointing_steps", "5"])
    message = str(e.value.code)
    assert ("checkpoint-2 was written with other settings, and these change the optimisation or the data order"
            in message)
    for line in ("learning_rate: was 0.001, now 0.0005", "seed: was 0, now 3", "train_batch_size: was 2, now 1"):
        assert line in message
    assert "checkpointing_steps" not in message and "max_train_steps" not in message  # harmless ones pass
    assert "--allow_changed_settings" in message
    assert no_training == [] and listing(out) == before


def test_resume_with_allowed_changes_logs_them(run2, data, tmp_path, caplog):
    out = copy_run(run2, tmp_path)
    args = distill_args(data, out, "--max_train_steps", "3", "--checkpointing_steps", "3",
                        "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4", "--allow_changed_settings")
    with caplog.at_level(logging.INFO, logger="distill"):
        result = distill.main(args)
    assert result["start_step"] == 2 and result["global_step"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--allow_changed_settings: resuming" in w and "learning_rate: was 0.001, now 0.0005" in w
               for w in warned), warned
    info = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "checkpointing_steps: was 1, now 3" in info and "max_train_steps: was 2, now 3" in info
    assert json.loads((out / "checkpoint-3" / "run_settings.json").read_text())["learning_rate"] == 5e-4


def test_resume_trains_with_the_changed_learning_rate_and_schedule(run2, data, tmp_path, monkeypatch):
    """--allow_changed_settings with a new learning rate, schedule, warm-up and weight decay: the resumed steps use
    them (the restored scheduler and optimizer states do not bring the checkpoint's back), and the checkpoint records
    them. The expected rates are diffusers' linear schedule with warm-up, from the new base rate."""
    from diffusers.optimization import get_scheduler

    out = copy_run(run2, tmp_path)
    shutil.rmtree(out / "checkpoint-2")
    used = []  # (lr, weight_decay) of each optimizer step
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        used.append((self.param_groups[0]["lr"], self.param_groups[0]["weight_decay"]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    changed = ["--learning_rate", "5e-4", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
               "--adam_weight_decay", "0.25"]
    result = distill.main(distill_args(data, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                       "--resume_from_checkpoint", "latest", "--allow_changed_settings", *changed))
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
    reference = get_scheduler("linear", optimizer=sgd, num_warmup_steps=2, num_training_steps=3)
    want = []
    for _ in range(3):  # the rate of optimizer steps 1, 2, 3; the resumed run makes steps 2 and 3
        want.append(reference.get_last_lr()[0])
        sgd.step()
        reference.step()
    assert result["start_step"] == 1 and want[1:] == [2.5e-4, 5e-4]
    assert used == [(lr, 0.25) for lr in want[1:]], used
    assert [logs["lr"] for logs in result["history"]] == [5e-4, 0.0]  # the rate after each step, as logged
    settings = json.loads((out / "checkpoint-3" / "run_settings.json").read_text())
    assert (settings["learning_rate"], settings["lr_scheduler"], settings["lr_warmup_steps"],
            settings["adam_weight_decay"]) == (5e-4, "linear", 2, 0.25)


def test_resume_refuses_a_changed_dataset(run2, data, tmp_path, no_training):
    out = copy_run(run2, tmp_path)
    fewer = tmp_path / "data"
    fewer.mkdir()
    for shard in ("shard-00000.tar", "shard-00001.tar"):  # shard-00002 (1 sample) removed after the kill
        shutil.copy(data["root"] / "data" / shard, fewer)
    args = distill_args(data, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                        "--data_root", str(fewer), "--cache_dir", str(data["root"] / "data_cache"))
    before = listing(out)
    with pytest.raises(SystemExit, match=r"the dataset in \S+ changed since checkpoint-2 was written: it had 5 "
                                         r"samples, now 4\. The saved data position refers to the old data"):
        distill.main(args)
    assert no_training == [] and listing(out) == before


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run2, data, tmp_path, caplog):
    out = copy_run(run2, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)
    args = distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                        "--resume_from_checkpoint", "latest")
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(args)
    assert result["start_step"] == 1 and len(result["history"]) == 1
    assert any(f"checkpoint-2 is damaged (optimizer.bin has {size // 2} bytes, {size} were written): resuming from "
               "checkpoint-1 instead; the damaged one is kept as checkpoint-2.damaged" in r.getMessage()
               for r in caplog.records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-2.damaged"]
    assert checkpoint_problem(out / "checkpoint-2") is None
    want = load_file(str(run2["out"] / "checkpoint-2" / "clear_local_2.safetensors"))
    got = load_file(str(out / "checkpoint-2" / "clear_local_2.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # the same step from the same state: the same weights
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    with pytest.raises(SystemExit, match=r"checkpoint-2.damaged is not a checkpoint folder"):
        distill.main(args[:-1] + [str(out / "checkpoint-2.damaged")])


def test_a_locked_output_dir_is_refused_naming_the_holder(data, tmp_path, no_training, caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename, "since": "2026-01-01 00:00:00"}
        (out / LOCK).write_text(json.dumps(lock))
        with pytest.raises(SystemExit) as e:
            distill.main(distill_args(data, out, "--max_train_steps", "1"))
    finally:
        holder.kill()
        holder.wait()
    message = str(e.value.code)
    assert f"is in use by another run (pid {holder.pid} on {lock['host']}, since 2026-01-01 00:00:00)" in message
    assert "choose another --output_dir" in message
    assert no_training == [] and json.loads((out / LOCK).read_text()) == lock
    assert list(listing(out)) == [LOCK]  # nothing else written

    # the holder is gone now: its lock is stale and taken over, with a warning; released at the end
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(distill_args(data, out, "--max_train_steps", "1"))
    assert result["lock"]["pid"] == os.getpid()  # held while training
    assert any(f"its holder, pid {holder.pid} on {lock['host']}, is no longer running" in r.getMessage()
               for r in caplog.records)
    assert not (out / LOCK).exists()


def test_an_unwritable_output_dir_is_refused_before_loading_models(data, tmp_path, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^--output_dir \S+a_file/run is not a writable folder \(Not a directory\)"):
        distill.main(distill_args(data, blocker / "run", "--max_train_steps", "1"))
    assert no_training == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "optimizer.bin"),
                                   RuntimeError("basic_ios::clear: iostream error")], ids=["ENOSPC", "iostream"])
def test_a_full_disk_names_the_checkpoint_and_the_free_space(data, tmp_path, monkeypatch, error):
    from accelerate import Accelerator

    def full_disk(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        raise error

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        distill.main(distill_args(data, out, "--max_train_steps", "2", "--checkpointing_steps", "1"))
    message = str(e.value.code)
    cause = "the disk is full (No space left on device: optimizer.bin)" if isinstance(error, OSError) else \
        "a write failed (basic_ios::clear: iostream error)"
    assert message.startswith(f"could not write the checkpoint {out / 'checkpoint-1'}: {cause}; "), message
    assert " free on that disk. The earlier checkpoints are intact" in message
    free = message.split("; ")[1].split(" free on")[0]
    assert free.split()[-1] in ("B", "KB", "MB", "GB", "TB") and float(free.split()[0]) >= 0
    assert list(out.iterdir()) == []  # the partial checkpoint-1.tmp is removed, the lock released


# ------------------------------------------------------------------------------------------
# 5. a truncated shard: one line, no traceback
# ------------------------------------------------------------------------------------------

def _truncated_copy(data, tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    blob = (data["root"] / "data" / "shard-00000.tar").read_bytes()
    with tarfile.open(data["root"] / "data" / "shard-00000.tar") as tf:
        second = tf.getmembers()[1]
    (root / "shard-00000.tar").write_bytes(blob[: second.offset_data + 10])  # cut inside the second member
    return root


def test_a_truncated_shard_exits_with_its_message_and_no_traceback(data, tmp_path):
    root = _truncated_copy(data, tmp_path)
    want = f"{root / 'shard-00000.tar'} is not a readable (uncompressed) tar file"
    for script in (cache_prompt_embeds, cache_latent_codes):
        with pytest.raises(SystemExit, match=r"re-download or regenerate it") as e:
            script.main(["--pretrained_model_name_or_path", data["pipeline"], "--data_root", str(root)])
        assert str(e.value.code).startswith(want)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "distill.py"), *distill_args(
        data, tmp_path / "run", "--data_root", str(root), "--cache_dir", str(data["root"] / "data_cache"))],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before the output folder is touched


# ------------------------------------------------------------------------------------------
# 6. bad samples: distinct files, once
# ------------------------------------------------------------------------------------------

def test_bad_samples_count_distinct_files_across_epochs(data, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(data["root"] / "data", root)
    bad_ids = [f"uncached{i}" for i in range(5)]
    for sid in bad_ids:  # samples whose features are not in the cache
        (root / f"{sid}.json").write_text('{"prompt": "a red cat"}')
    out = tmp_path / "run"
    args = distill_args(data, out, "--data_root", str(root), "--cache_dir", str(data["root"] / "data_cache"),
                        "--max_train_steps", "12", "--checkpointing_steps", "6")
    with caplog.at_level(logging.WARNING, logger="distill"):
        result = distill.main(args)
    bad = result["bad_samples"]
    state = json.loads((out / "checkpoint-12" / "data_state.rank0.json").read_text())
    assert state["samples_drawn"] >= 2 * 10  # two epochs of the 10 samples or more: every bad one met twice
    assert sorted(bad.ids()) == bad_ids and len(bad) == 5 and bad.encounters >= 10
    assert result["history"][-1]["bad_samples"] == 5
    assert len(state["bad_samples"]["items"]) == 5 and state["bad_samples"]["encounters"] == bad.encounters
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    assert sorted(m.split()[3].rstrip(":") for m in skipped) == bad_ids  # each logged once
    assert bad.report().startswith(f"skipped 5 bad sample(s) ({bad.encounters} times in all): 5 not cached")


# ------------------------------------------------------------------------------------------
# 7. the release's attention-loss layers
# ------------------------------------------------------------------------------------------

def test_flux_default_attention_loss_layers_are_the_releases():
    """FLUX.1-dev's layout (19 double, 38 single blocks; tiny width): the default selects single
    blocks 1, 5, ..., 37, i.e. the attention modules whose index among all 57 is divisible by 4."""
    model = tiny_flux(num_layers=19, num_single_layers=38)
    clear.apply_clear(model, radius=2, backend="dense")
    assert FAMILIES["flux"].attn_loss_layers == "single:4:1"
    chosen = attention_layers(model)
    assert chosen == [f"single_transformer_blocks.{i}.attn" for i in range(1, 38, 4)]
    every = [n for n, m in model.named_modules() if hasattr(m, "processor") and n.endswith(".attn")]
    assert len(every) == 57 and chosen == [n for i, n in enumerate(every) if i % 4 == 0 and n.startswith("single")]
    training_doc = (REPO / "docs" / "training.md").read_text()
    assert "single:4:1" in training_doc and "1, 5, …, 37" in training_doc


def test_settings_changes_separates_harmless_ones():
    refused, allowed = settings_changes({"learning_rate": 1e-3, "seed": 0, "report_to": "none", "gone": 1},
                                        {"learning_rate": 1e-3, "seed": 1, "report_to": "wandb"}, {"report_to"})
    assert refused == ["gone: was 1, now '(not set)'", "seed: was 0, now 1"]
    assert allowed == ["report_to: was 'none', now 'wandb'"]


def test_bad_samples_state_stays_one_entry_per_file():
    from clear.data import BadSample, BadSamples

    bad = BadSamples()
    first = [BadSample("a", "bad image: x"), BadSample("b", "bad json: y")]
    assert bad.add(first) == first and bad.add(BadSample("a", "bad image: x")) == [] and bad.add(first) == []
    assert len(bad) == 2 and bad.encounters == 5 and bad.state_dict()["items"] == [["a", "bad image: x"],
                                                                                   ["b", "bad json: y"]]
    old = BadSamples()  # a checkpoint written before the count was per file lists every encounter
    old.load_state_dict({"items": [["a", "bad image: x"], ["a", "bad image: x"], ["b", "bad json: y"]]})
    assert old.ids() == ["a", "b"] and old.encounters == 3
