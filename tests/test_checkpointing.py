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
