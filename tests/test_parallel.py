"""Patch-parallel CLEAR (clear.parallel) on CPU with gloo: 3 processes spawned once for the
whole module (2-rank cases use a sub-group of ranks 0 and 1), tiny FLUX models.

Each worker runs every case, records numbers, and saves them; the tests below read them."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from datetime import timedelta

import pytest
from scripts_loader import load_script
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clear
from clear.geometry import Window
from clear.parallel import expected_comm_bytes, halo_rows, parallelize, plan_bands, split_rows, unparallelize
from tiny_models import FLUX_CONFIG, flux_inputs, tiny_flux

WORLD = 3
BATCH, TEXT = 2, 7
CHANNELS = FLUX_CONFIG["num_attention_heads"] * FLUX_CONFIG["attention_head_dim"]
LAYERS = FLUX_CONFIG["num_layers"] + FLUX_CONFIG["num_single_layers"]

# name: (ranks, height, width, radius, down_factor, backend, proportional_attention);
# flex runs eagerly on 2x4 tiles (so some blocks are skipped, some full, some partial)
EXACT = {
    "2 ranks even": (2, 8, 6, 3, 1, "dense", False),
    "2 ranks uneven r=2.5 proportional": (2, 9, 5, 2.5, 1, "dense", True),
    "2 ranks df=2 flex": (2, 8, 10, 3, 2, "flex", False),
    "3 ranks uneven, bands as thin as the halo": (3, 7, 5, 3, 1, "dense", False),
    "3 ranks uneven df=2": (3, 10, 6, 2, 2, "dense", False),
}
# halo volume: same radius and width at two heights, twice the width, a larger radius
VOLUME = {"base": (8, 6, 3), "taller": (16, 6, 3), "wider": (8, 12, 3), "larger radius": (16, 6, 5)}


def _model(radius, down_factor, backend, proportional=False):
    model = tiny_flux()
    clear.apply_clear(model, radius=radius, down_factor=down_factor, backend=backend, tile=(2, 4),
                      proportional_attention=proportional)
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():  # learned pooling weights, not the uniform init
        if name.endswith("spatial_weight"):
            p.data = torch.rand(p.shape, generator=g)
    return model


class _WireCounter:
    """Counts the bytes this rank hands to torch.distributed, independently of clear's own log."""

    def __init__(self):
        self.counts = Counter()
        self._orig = dist.batch_isend_irecv, dist.all_gather, dist.all_reduce

    def __enter__(self):
        send, gather, reduce = self._orig

        def batch(ops):
            self.counts["send"] += sum(o.tensor.numel() * o.tensor.element_size() for o in ops
                                       if o.op.__name__ == "isend")
            return send(ops)

        def all_gather(out, t, *a, **k):
            self.counts["all_gather"] += t.numel() * t.element_size()
            return gather(out, t, *a, **k)

        def all_reduce(t, *a, **k):
            self.counts["all_reduce"] += t.numel() * t.element_size()
            return reduce(t, *a, **k)

        dist.batch_isend_irecv, dist.all_gather, dist.all_reduce = batch, all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv, dist.all_gather, dist.all_reduce = self._orig


def _first_block_outputs(model, x):
    seen = {}
    hook = model.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.update(text=out[0], image=out[1]))
    with torch.no_grad():
        out = model(**x).sample
    hook.remove()
    return out, seen


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    pair = dist.new_group([0, 1])
    res = {}
    for name, (ranks, h, w, r, df, backend, prop) in EXACT.items():
        if rank >= ranks:
            continue
        model, x = _model(r, df, backend, prop), flux_inputs(h, w, text_len=TEXT, batch=BATCH)
        with torch.no_grad():
            ref = model(**x).sample
        attn = parallelize(model, group=pair if ranks == 2 else None, text_mode="exact")
        attn.comm_log = []
        with _WireCounter() as wire, torch.no_grad():
            out = model(**x).sample
        res[name] = dict(err=(out - ref).abs().max().item(), log=list(attn.comm_log), wire=dict(wire.counts))

    # average vs exact, 3 ranks: the first layer's image stream is identical, the text stream is not
    model, x = _model(3, 1, "dense"), flux_inputs(11, 4, text_len=TEXT, batch=BATCH)
    ref, ref_first = _first_block_outputs(model, x)
    runs = {}
    for mode in ("exact", "average"):
        parallelize(model, text_mode=mode)
        runs[mode] = _first_block_outputs(model, x)
    band = plan_bands(11, 4, 3, rank, Window(3)).band
    own = slice(band.start * 4, band.stop * 4)
    res["modes"] = dict(
        image_equal=torch.equal(runs["exact"][1]["image"], runs["average"][1]["image"]),
        text_diff=(runs["exact"][1]["text"] - runs["average"][1]["text"]).abs().max().item(),
        exact_text_err=(runs["exact"][1]["text"] - ref_first["text"]).abs().max().item(),
        exact_image_err=(runs["exact"][1]["image"] - ref_first["image"][:, own]).abs().max().item(),
        out_diff=(runs["exact"][0] - runs["average"][0]).abs().max().item(),
        average_finite=bool(runs["average"][0].isfinite().all()))
    unparallelize(model)
    with torch.no_grad():
        res["modes"]["unparallelized_err"] = (model(**x).sample - ref).abs().max().item()

    # communication volume per layer, 2 ranks
    if rank < 2:
        for name, (h, w, r) in VOLUME.items():
            model = _model(r, 1, "dense")
            attn = parallelize(model, group=pair)
            attn.comm_log = []
            with torch.no_grad():
                model(**flux_inputs(h, w, text_len=TEXT, batch=BATCH))
            res[f"volume {name}"] = list(attn.comm_log)

    # a band thinner than the halo fails on every rank before any message (no hang)
    model = _model(3, 1, "dense")
    parallelize(model)
    try:
        with torch.no_grad():
            model(**flux_inputs(5, 4, text_len=TEXT, batch=1))
    except ValueError as e:
        res["thin"] = str(e)

    # the whole pipeline, 2 ranks: rank 0 decodes the image of single-process CLEAR
    if rank < 2:
        from tiny_models import tiny_flux_pipeline

        pipe = tiny_flux_pipeline()
        for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):  # built directly: still in train mode
            part.eval()
        clear.apply_clear(pipe.transformer, radius=3, backend="dense")
        call = dict(prompt="a small blue plane", height=32, width=36, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=16, output_type="np")
        ref = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        parallelize(pipe.transformer, group=pair)
        out = clear.patch_parallel_pipeline_call(pipe, **call, generator=torch.Generator().manual_seed(0))
        res["pipeline"] = None if out is None else float(abs(out.images - ref).max())

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    out_dir = tempfile.mkdtemp()
    init_file = os.path.join(out_dir, "store")
    mp.spawn(_worker, args=(WORLD, init_file, out_dir), nprocs=WORLD)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_mode_equals_single_process(results, case):
    ranks = EXACT[case][0]
    for r in range(ranks):
        assert results[r][case]["err"] < 1e-5, (case, r, results[r][case]["err"])


def test_average_mode_differs_only_in_the_text_stream(results):
    for r in range(WORLD):
        m = results[r]["modes"]
        assert m["image_equal"], "the first layer's image stream must not depend on text_mode"
        assert m["text_diff"] > 1e-4, "average mode should change text queries' outputs"
        assert m["exact_text_err"] < 1e-5 and m["exact_image_err"] < 1e-5
        assert m["out_diff"] > 0 and m["average_finite"]
        assert m["unparallelized_err"] < 1e-6


def _per_layer(log):
    by = Counter()
    for s in log:
        by[s.what] += s.nbytes
    return {k: (v if k == "output" else v // LAYERS) for k, v in by.items()}


@pytest.mark.parametrize("case", list(EXACT))
def test_comm_volume_matches_design(results, case):
    ranks, h, w, r, df, _, _ = EXACT[case]
    for rank in range(ranks):
        got = results[rank][case]
        per_layer = _per_layer(got["log"])
        expected = expected_comm_bytes(h, w, ranks, rank, r, df, text_len=TEXT, heads=FLUX_CONFIG["num_attention_heads"],
                                       head_dim=FLUX_CONFIG["attention_head_dim"], batch=BATCH, elem_bytes=4)
        assert {k: v for k, v in per_layer.items() if k != "output"} == expected
        # the design, spelled out: K and V of `halo` rows x width, to each neighbour
        neighbours = (rank > 0) + (rank < ranks - 1)
        assert expected["halo"] == neighbours * 2 * BATCH * halo_rows(Window(r)) * w * CHANNELS * 4
        # what actually went to torch.distributed equals the log
        wire = Counter()
        for s in got["log"]:
            wire[s.op] += s.nbytes
        assert dict(wire) == got["wire"]
        most = max(b.rows for b in split_rows(h, ranks, df))
        assert per_layer["output"] == BATCH * most * w * FLUX_CONFIG["in_channels"] * 4


def test_halo_volume_scales_with_radius_times_width_not_image_size(results):
    halo = {name: [_per_layer(results[rank][f"volume {name}"])["halo"] for rank in range(2)] for name in VOLUME}
    assert halo["taller"] == halo["base"]  # twice the rows: same halo
    assert halo["wider"] == [2 * v for v in halo["base"]]  # twice the width: twice the halo
    assert halo["larger radius"] == [2 * v for v in halo["base"]]  # r 3 -> 5: halo rows 2 -> 4
    assert halo["base"][0] == 2 * BATCH * 2 * 6 * CHANNELS * 4


def test_band_thinner_than_halo_fails_clearly(results):
    for r in range(WORLD):
        msg = results[r]["thin"]
        assert "halo of 2 rows" in msg and "use at most 2 ranks" in msg, msg
    with pytest.raises(ValueError, match="halo of 4 rows.*at most 2 ranks"):
        plan_bands(10, 8, 3, 0, Window(5))
    with pytest.raises(ValueError, match="too few for 4 ranks"):
        split_rows(6, 4, down_factor=2)
    with pytest.raises(ValueError, match="not divisible by down_factor=4"):
        split_rows(10, 2, down_factor=4)
    assert [b.rows for b in split_rows(22, 3, down_factor=2)] == [8, 8, 6]
    assert halo_rows(Window(16)) == 15 and halo_rows(Window(2.5)) == 2 and halo_rows(Window(1)) == 0


def test_pipeline_rank0_gets_single_process_image(results):
    assert results[0]["pipeline"] < 1e-5
    assert results[1]["pipeline"] is None


def test_parallelize_needs_distributed_and_clear():
    model = tiny_flux()
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallelize(model)


@pytest.mark.parametrize("h,above,below,width,radius,n_rest,tile", [
    (4, 2, 2, 6, 3, 9, (8, 16)), (5, 0, 2, 20, 3, 130, (2, 4)), (7, 4, 0, 9, 4.5, 3, (2, 4)), (16, 15, 15, 40, 16, 7, (8, 16)),
])
def test_band_block_mask_equals_flex_own(h, above, below, width, radius, n_rest, tile):
    """The band's analytic block mask == FlexAttention's create_block_mask of the same mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    from clear.backends.flex_blocks import TileOrder, band_block_mask, band_mask_mod
    from clear.geometry import TokenLayout

    win = Window(radius)
    q_order = TileOrder(TokenLayout(0, h, width), win, *tile)
    kv_order = TileOrder(TokenLayout(0, above + h + below, width), win, *tile)
    kv_len = kv_order.num_slots + n_rest
    a = band_block_mask(q_order, kv_order, above, n_rest)
    b = create_block_mask(band_mask_mod(kv_order, above), None, None, q_order.num_slots, kv_len,
                          device="cpu", BLOCK_SIZE=q_order.block_size)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
    assert torch.equal(a.to_dense(), b.to_dense())


def test_generate_script_under_torchrun_matches_one_process(tiny_flux_pipeline_dir, tmp_path):
    """`torchrun --nproc_per_node 2 scripts/generate.py --parallel patch` writes (on rank 0 only) the image of
    the single-process script."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    args = ["--model", tiny_flux_pipeline_dir, "--prompt", "a red house", "--height", "32", "--width", "48",
            "--steps", "2", "--max_sequence_length", "16", "--device", "cpu", "--quiet", "--radius", "3",
            "--checkpoint", "none"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), str(root / "scripts/generate.py"),
                          *args, "--parallel", "patch", "--out", str(tmp_path / "parallel.png")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("patch-parallel x2 (exact)") == 1, run.stdout  # rank 0 alone writes and reports

    script = load_script("generate")
    script.main([*args, "--out", str(tmp_path / "single.png")])
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("parallel", "single"))
    assert np.abs(a - b).max() <= 1  # equal up to float error and 8-bit rounding
    meta = Image.open(tmp_path / "parallel.png").text
    assert (meta["clear:parallel"], meta["clear:world_size"], meta["clear:text_mode"]) == ("patch", "2", "exact")
