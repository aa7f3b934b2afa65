"""scripts/benchmark.py runs on CPU at tiny sizes and writes JSON, markdown and a PNG plot (a smoke test; speed
targets are judged from GPU runs, never from tests)."""

import json
import os
import subprocess
import sys

import pytest
from scripts_loader import SCRIPTS, load_script

import clear
from clear.parallel import expected_comm_bytes

benchmark = load_script("benchmark")


def _outputs(out):
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out.with_suffix(".md").read_text()
    assert md.count("\n|") >= len(data["records"]) + 1
    return data


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "att"
    benchmark.main(["attention", "--sizes", "128,64x96", "--radii", "2", "--down-factors", "1,2", "--heads", "2",
                    "--head-dim", "16", "--text-len", "8", "--warmup", "0", "--repeats", "1", "--backend", "flex",
                    "--tile", "4x8", "--out", str(out)])
    data = _outputs(out)
    names = [(r["height"], r["width"], r["variant"]) for r in data["records"]]
    assert names == [(128, 128, "dense"), (128, 128, "r2"), (128, 128, "r2_df2"),
                     (64, 96, "dense"), (64, 96, "r2"), (64, 96, "r2_df2")]
    for r in data["records"]:
        assert r["time_s"] > 0
        assert r["flops"] == clear.attention_flops(r["height"] // 16, r["width"] // 16, r["radius"], 8,
                                                   r["down_factor"], 32)
        if r["radius"] is not None:
            assert r["backend"] == "flex" and r["mask_build_s"] > 0
    assert data["environment"]["command"].startswith("python ")
    assert data["environment"]["tile"] == [4, 8]


def test_step_benchmark_smoke(tmp_path):
    out = tmp_path / "step"
    benchmark.main(["step", "--tiny", "--sizes", "128", "--radii", "2", "--down-factors", "1", "--text-len", "8",
                    "--warmup", "0", "--repeats", "1", "--out", str(out)])
    data = _outputs(out)
    assert [r["variant"] for r in data["records"]] == ["dense", "r2"]
    assert data["records"][0]["speedup_vs_dense"] == 1.0


def test_model_benchmark_smoke(tmp_path):
    """A whole FLUX model per grid: full attention, the floor (attention returns V), CLEAR backends and auto, for a
    forward and a training step; speed-ups against full attention; peak RSS read."""
    out = tmp_path / "model"
    records = benchmark.main(["model", "--heads", "2", "--num-layers", "1", "--num-single-layers", "1", "--grids",
                              "8", "--train-grids", "6x4", "--radius", "2", "--text-len", "8", "--variants",
                              "full,floor,auto,dense,tiled", "--warmup", "0", "--repeats", "1", "--out", str(out)])
    data = _outputs(out)
    assert [(r["grid"], r["step"], r["variant"]) for r in records] == [
        ("8x8", "forward", v) for v in ("full", "floor", "clear:auto", "clear:dense", "clear:tiled")] + [
        ("6x4", "train", v) for v in ("full", "clear:auto", "clear:dense", "clear:tiled")]
    by = {(r["step"], r["variant"]): r for r in data["records"]}
    assert by[("forward", "full")]["speedup_vs_full"] == 1.0 and "backend" not in by[("forward", "full")]
    assert by[("forward", "clear:tiled")]["backend"] == "tiled" and by[("train", "clear:dense")]["backend"] == "dense"
    assert all(r["time_s"] > 0 and r["first_call_s"] > 0 for r in records)
    assert "s per training step" in out.with_suffix(".md").read_text()
    assert all(r["peak_rss_bytes"] is None and r["min_s"] <= r["time_s"] for r in records)  # no --rss-grids
    with pytest.raises(SystemExit, match="--variants: unknown"):
        benchmark.main(["model", "--variants", "full,sparse", "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_model_benchmark_measures_peak_memory_in_a_process_per_variant(tmp_path):
    """Peak resident memory of one step, each variant in a fresh process (spawned: the script as run)."""
    out = tmp_path / "rss"
    run = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "model", "--heads", "2", "--num-layers",
                          "1", "--num-single-layers", "1", "--grids", "24", "--train-grids", "", "--radius", "2",
                          "--text-len", "8", "--variants", "full,tiled", "--rss-grids", "24", "--warmup", "0",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    assert [r["variant"] for r in records] == ["full", "clear:tiled"]
    assert all(isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] >= 0 for r in records)


def test_auto_benchmark_measures_every_backend_that_can_run_and_ships_only_when_asked(tmp_path):
    out = tmp_path / "auto"
    shipped = clear.backends.MEASURED_DIR / "cpu.json"
    before = shipped.read_bytes() if shipped.exists() else None
    records = benchmark.main(["auto", "--shapes", "2x8:3", "--grids", "6", "--radii", "2", "--down-factors", "1,2",
                              "--flex-grids", "", "--repeats", "1", "--out", str(out)])
    assert (shipped.read_bytes() if shipped.exists() else None) == before  # no --ship: auto's file untouched
    by = {(r["radius"], r["down_factor"], r["with_grad"]): r for r in records}
    assert set(by) == {(None, 1, False), (None, 1, True), (2.0, 1, False), (2.0, 1, True), (2.0, 2, False),
                       (2.0, 2, True)}
    assert all(r["seconds"]["flex"] is None for r in records)  # on CPU only on --flex-grids (each compiles)
    assert by[(None, 1, False)]["seconds"]["tiled"] is None  # windows only
    assert all(by[(2.0, df, grad)]["seconds"][n] > 0 for n in ("dense", "tiled") for df in (1, 2)
               for grad in (False, True))
    for r in records:
        assert r["fastest"] == min((n for n, t in r["seconds"].items() if t is not None), key=r["seconds"].get)
    assert json.loads(out.with_suffix(".json").read_text())["records"] == records
    assert not out.with_suffix(".partial.json").exists()
    # a run that stopped resumes: its finished records are kept, not measured again
    kept = dict(by[(None, 1, False)], seconds={"dense": 123.0, "flex": None, "tiled": None}, fastest="dense")
    out.with_suffix(".partial.json").write_text(json.dumps(dict(records=[kept])))
    again = benchmark.main(["auto", "--shapes", "2x8:3", "--grids", "6", "--radii", "2", "--down-factors", "1",
                            "--flex-grids", "", "--repeats", "1", "--out", str(out)])
    assert again[0] == kept and len(again) == 4


def test_flops_table_and_size_validation(tmp_path):
    records = benchmark.main(["flops", "--sizes", "1024,8192", "--radii", "8,16", "--down-factors", "1",
                              "--out", str(tmp_path / "f")])
    by = {(r["height"], r["variant"]): r for r in records}
    assert by[(1024, "dense")]["tflops"] == pytest.approx(4 * (4096 + 512) ** 2 * 3072 / 1e12)
    assert by[(8192, "r8")]["fraction_of_full"] < 0.005  # the paper's "99.5% fewer attention computations"
    with pytest.raises(SystemExit, match="not a multiple of 16"):
        benchmark.main(["flops", "--sizes", "1000", "--out", str(tmp_path / "g")])
    # one size syntax with clear.inference.parse_sizes (HEIGHTxWIDTH), plus the square shorthand N
    assert benchmark.parse_sizes("1024, 2048X4096,512") == [(1024, 1024), (2048, 4096), (512, 512)]
    with pytest.raises(SystemExit, match="'2048\\*4096' is not a size like 2048x4096"):
        benchmark.parse_sizes("2048*4096")


@pytest.mark.slow  # torch.compile of the dense attention on CPU
def test_attention_benchmark_compiled(tmp_path):
    out = tmp_path / "attc"
    records = benchmark.main(["attention", "--sizes", "64", "--radii", "2", "--down-factors", "1", "--heads", "2",
                              "--head-dim", "16", "--text-len", "8", "--warmup", "0", "--repeats", "1", "--backend",
                              "dense", "--compile", "full", "--out", str(out)])
    assert [(r["variant"], r["backend"], r["compile"]) for r in records] == [("dense", "sdpa", "full"),
                                                                             ("r2", "dense", "full")]
    for r in records:
        assert r["compile_s"] == pytest.approx(r["first_call_s"] - r["time_s"])
    assert "| compile |" in out.with_suffix(".md").read_text()


def test_attention_benchmark_refuses_regional_compile(tmp_path):
    with pytest.raises(SystemExit, match="applies to step only"):
        benchmark.main(["attention", "--sizes", "64", "--radii", "2", "--compile", "regional",
                        "--out", str(tmp_path / "x")])


def test_comm_mode_measures_the_designed_bytes(tmp_path):
    """`benchmark.py comm` (the bytes measurement that was `python -m clear.parallel`): 2 gloo ranks, each runs one
    patch-parallel attention layer; what each rank hands to torch.distributed equals expected_comm_bytes."""
    out = tmp_path / "comm"
    run = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "comm", "--ranks", "2", "--sizes", "128x96",
                          "--radii", "3", "--down-factors", "1,2", "--heads", "2", "--head-dim", "8", "--text-len", "5",
                          "--dtype", "bf16", "--out", str(out)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    by = {(r["down_factor"], r["rank"], r["kind"]): r for r in records}
    assert set(by) == {(df, rank, kind) for df in (1, 2) for rank in (0, 1) for kind in ("halo", "text")} | {
        (2, rank, "pooled") for rank in (0, 1)}
    for df in (1, 2):
        for rank in (0, 1):
            expected = expected_comm_bytes(8, 6, 2, rank, 3, df, text_len=5, heads=2, head_dim=8, elem_bytes=2)
            assert {k: r["measured_bytes"] for (d, rk, k), r in by.items() if (d, rk) == (df, rank)} == expected
            assert {k: r["expected_bytes"] for (d, rk, k), r in by.items() if (d, rk) == (df, rank)} == expected
    # the halo: K and V of 2 rows x 6 tokens x 16 channels in bf16, to the one neighbour
    assert by[(1, 0, "halo")]["measured_bytes"] == 2 * 2 * 6 * 16 * 2
    table = ("| rank | kind | measured bytes | expected_comm_bytes |  (8x6 tokens, r=3, df=2, 2 ranks, exact, "
             "2x8 bfloat16, 5 text)")
    assert table in run.stdout and table in out.with_suffix(".md").read_text()
    assert "| 1 | pooled | 384 | 384 |" in run.stdout  # 2 x (2x3 pooled tokens) x 16 channels x 2 bytes
    assert not out.with_suffix(".png").exists()


def test_comm_mode_checks_the_split_before_spawning(tmp_path):
    with pytest.raises(SystemExit, match="needs a halo of 7 rows"):
        benchmark.main(["comm", "--ranks", "3", "--sizes", "64", "--radii", "8", "--down-factors", "1",
                        "--out", str(tmp_path / "c")])


def test_flops_of_a_released_model_of_another_family(tmp_path):
    """--model takes the width, text length and layer count of a released model of any family."""
    records = benchmark.main(["flops", "--model", "FLUX.2-dev", "--sizes", "1024", "--radii", "16",
                              "--down-factors", "1", "--out", str(tmp_path / "f2")])
    by = {r["variant"]: r for r in records}
    full = 4 * (4096 + 512) ** 2 * 6144
    assert by["dense"]["tflops"] == pytest.approx(full / 1e12)
    assert by["dense"]["tflops_per_step"] == pytest.approx(56 * full / 1e12)
    qwen = benchmark.main(["flops", "--model", "Qwen-Image", "--sizes", "1024", "--radii", "16", "--down-factors",
                           "1", "--out", str(tmp_path / "q")])
    assert {r["model"] for r in qwen} == {"Qwen-Image"}
    assert qwen[0]["tflops_per_step"] == pytest.approx(60 * 4 * (4096 + 512) ** 2 * 3072 / 1e12)
    with pytest.raises(SystemExit, match="--model 'FLUX.3': choose one of"):
        benchmark.main(["flops", "--model", "FLUX.3", "--out", str(tmp_path / "x")])
