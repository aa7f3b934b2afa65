"""clear.checkpointing on its own (no training run): a checkpoint's manifest finds a damaged file, rotation keeps
the newest complete checkpoints, and changed settings split into refused and harmless ones. distill.py's use of
them (resume, divergence, full disks) is tested end to end in tests/test_training.py."""

from clear.checkpointing import checkpoint_problem, latest_complete, rotate, settings_changes, write_manifest


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


def test_settings_changes_separates_harmless_ones():
    refused, allowed = settings_changes({"learning_rate": 1e-3, "seed": 0, "report_to": "none", "gone": 1},
                                        {"learning_rate": 1e-3, "seed": 1, "report_to": "wandb"}, {"report_to"})
    assert refused == ["gone: was 1, now '(not set)'", "seed: was 0, now 1"]
    assert allowed == ["report_to: was 'none', now 'wandb'"]


def test_manifest_records_a_sha256_per_file_and_finds_a_changed_byte(tmp_path):
    import hashlib
    import json

    from clear.checkpointing import MANIFEST

    folder = tmp_path / "checkpoint-1"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "optimizer.bin").write_bytes(b"x" * 100)
    (folder / "pytorch_model" / "states.pt").write_bytes(b"y" * 10)
    write_manifest(folder)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert files["optimizer.bin"] == {"size": 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest()}
    assert set(files) == {"optimizer.bin", "pytorch_model/states.pt"}
    assert checkpoint_problem(folder) is None
    (folder / "optimizer.bin").write_bytes(b"x" * 99 + b"!")  # same size, other content
    assert checkpoint_problem(folder) == ("optimizer.bin is not the file that was written (its SHA-256 differs from "
                                          "the one in manifest.json)")
    assert checkpoint_problem(folder, verify=False) is None  # sizes only (rotation)


def test_a_checkpoint_without_its_manifest_is_not_complete(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(b"x")
    assert checkpoint_problem(folder).startswith("it has no manifest.json (written last, when a checkpoint is "
                                                 "complete): copy the whole folder")
