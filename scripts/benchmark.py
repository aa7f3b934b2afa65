"""Benchmarks: one attention call, one whole transformer step, and the paper's FLOPs table.

    # one attention call, FLUX.1-dev dims (24 heads x 128, 512 text tokens), bf16, on a GPU
    python scripts/benchmark.py attention --sizes 1024,2048,4096,8192 --radii 8,16,32 --down-factors 1,4 \
        --out benchmarks/attention_h100
    # a whole FLUX.1-dev transformer step (random weights at real width, no download)
    python scripts/benchmark.py step --sizes 1024,4096,8192 --radii 8,16 --out benchmarks/step_h100
    # attention TFLOPs per layer for the paper's settings (no device needed)
    python scripts/benchmark.py flops --out benchmarks/flops
    # ... for a released model of any family (its width, text length and layer count; also TFLOPs per step)
    python scripts/benchmark.py flops --model FLUX.2-dev --out benchmarks/flops_flux2_dev
    # under torch.compile: the whole transformer (full) or its repeated blocks (regional)
    python scripts/benchmark.py step --compile regional --sizes 1024,4096 --radii 16 --out benchmarks/step_regional
    # patch parallelism: bytes each of 8 ranks hands to torch.distributed in one attention layer
    # (CPU, gloo; random q/k/v), next to clear.parallel.expected_comm_bytes
    python scripts/benchmark.py comm --ranks 8 --sizes 2048x1024 --radii 16 --down-factors 1 --dtype bf16 \
        --out benchmarks/comm

Each run writes ``<out>.json`` (records + environment + command), ``<out>.md`` (a markdown
table) and, except for ``comm``, ``<out>.png`` (log-log time against resolution). Sizes are image
pixels, ``HEIGHTxWIDTH`` as everywhere in CLEAR (``clear.inference.parse_sizes``), or ``N`` for a
square; tokens are pixels / 16. On CUDA, times are medians of CUDA-event timings
after warm-up; elsewhere, medians of wall-clock times (CPU runs are smoke tests).

``--compile full`` compiles the timed call with ``torch.compile(..., fullgraph=True)`` (attention:
the attention call with its plan built outside; step: the whole transformer), ``--compile
regional`` (step) runs ``transformer.compile_repeated_blocks(fullgraph=True)``. ``compile_s``
is the first call's time minus the steady one: compile (and plan building) time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tqdm import tqdm

import clear
from clear import backends
from clear.attention import ClearAttention
from clear.devices import DTYPE_CHOICES, resolve_device, resolve_dtype
from clear.files import atomic_path, write_bytes
from clear.geometry import TokenLayout, Window
from clear.parallel import TEXT_MODES, PatchParallelAttention, expected_comm_bytes, plan_bands

FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``--sizes``: CLEAR's size list (``HEIGHTxWIDTH,...`` pixels; a bare ``N`` is ``NxN``), multiples of 16."""
    from clear.inference import parse_sizes as parse_pixel_sizes  # here: comm's spawned ranks need no pipelines

    try:
        sizes = parse_pixel_sizes(text)
    except ValueError as e:
        raise SystemExit(f"--sizes: {e}") from None
    for h, w in sizes:
        if h % 16 or w % 16:
            raise SystemExit(f"size {h}x{w} is not a multiple of 16 pixels")
    return sizes


def parse_tile(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def variants(radii: str, down_factors: str) -> list[tuple[int | None, int]]:
    out = [(None, 1)]
    for df in (int(d) for d in down_factors.split(",")):
        out += [(int(r), df) for r in radii.split(",")]
    return out


def variant_name(radius, df) -> str:
    return "dense" if radius is None else f"r{radius}" + (f"_df{df}" if df > 1 else "")


class Timer:
    """Median time of a callable: CUDA events on CUDA, perf_counter elsewhere."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def median(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                times.append(self.once(fn))
        return statistics.median(times)

    def peak_memory(self, fn) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device)


def bench_attention(args, device, dtype) -> list[dict]:
    timer = Timer(device, args.warmup, args.repeats)
    heads, head_dim, text = args.heads, args.head_dim, args.text_len
    records = []
    jobs = [(s, v) for s in parse_sizes(args.sizes) for v in variants(args.radii, args.down_factors)]
    for (h_px, w_px), (radius, df) in tqdm(jobs, desc="attention"):
        h, w = h_px // 16, w_px // 16
        if df > 1 and (h % df or w % df):
            continue
        layout = TokenLayout(text, h, w)
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, layout.seq_len, heads, head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        rec = dict(height=h_px, width=w_px, tokens=layout.num_image, variant=variant_name(radius, df), radius=radius,
                   down_factor=df, flops=clear.attention_flops(h, w, radius, text, df, heads * head_dim))
        rec["compile"] = args.compile
        if radius is None:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            fn = compiled(lambda: F.scaled_dot_product_attention(qt, kt, vt), args.compile)
            rec["backend"] = "sdpa"
            with torch.no_grad():
                rec["first_call_s"] = timer.once(fn)
        else:
            core = ClearAttention(radius, df, backend=args.backend, tile=args.tile, kernel_options=args.kernel_options)
            sw = torch.full((1, 1, 1, df, 1, df, 1), 1 / df**2, device=device, dtype=dtype) if df > 1 else None
            with torch.no_grad():
                rec["mask_build_s"] = timer.once(lambda: core.layout_plan(layout, device, with_grad=False))
                core._plans.clear()  # the first call below builds its plan again
                t0 = time.perf_counter()
                plan = core.layout_plan(layout, device, with_grad=False)  # built outside the compiled call
                fn = compiled(lambda: core(q, k, v, layout, sw, plan), args.compile)
                fn()
                rec["first_call_s"] = time.perf_counter() - t0
            rec["backend"] = plan.backend
        with torch.no_grad():
            rec["time_s"] = timer.median(fn)
            rec["peak_memory_bytes"] = timer.peak_memory(fn)
        rec["compile_s"] = rec["first_call_s"] - rec["time_s"]
        rec["tflops_per_s"] = rec["flops"] / rec["time_s"] / 1e12
        records.append(rec)
        q = k = v = fn = None  # free before the next size allocates
    return records


def compiled(fn, mode: str):
    """``fn`` for ``--compile none|full`` (attention calls)."""
    if mode == "none":
        return fn
    if mode != "full":
        raise SystemExit(f"--compile {mode} applies to step only; attention takes none or full")
    torch._dynamo.reset()  # every record compiles afresh: its compile time is its own
    return torch.compile(fn, fullgraph=True)


def compile_transformer(model, mode: str):
    """The callable to time for ``--compile none|full|regional`` (a whole transformer)."""
    torch._dynamo.reset()
    for m in model.modules():  # undo an earlier record's regional compilation
        m._compiled_call_impl = None
    if mode == "full":
        return torch.compile(model, fullgraph=True)
    if mode == "regional":
        model.compile_repeated_blocks(fullgraph=True)
    return model


def flux_model(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    cfg = dict(FLUX_DEV)
    if args.tiny:
        cfg.update(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    if args.num_layers is not None:
        cfg["num_layers"] = args.num_layers
    if args.num_single_layers is not None:
        cfg["num_single_layers"] = args.num_single_layers
    if not args.tiny:
        cfg["num_attention_heads"] = args.heads  # step: width = heads x 128 (FLUX.1-dev: 24)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    return model.to(dtype).eval(), cfg


def bench_step(args, device, dtype) -> list[dict]:
    from diffusers import FluxPipeline

    timer = Timer(device, args.warmup, args.repeats)
    model, cfg = flux_model(args, device, dtype)
    text = args.text_len
    records = []
    jobs = [(s, v) for s in parse_sizes(args.sizes) for v in variants(args.radii, args.down_factors)]
    for (h_px, w_px), (radius, df) in tqdm(jobs, desc="step"):
        h, w = h_px // 16, w_px // 16
        if df > 1 and (h % df or w % df):
            continue
        g = torch.Generator(device).manual_seed(0)
        x = dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], device=device, dtype=dtype, generator=g),
                 encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], device=device, dtype=dtype,
                                                   generator=g),
                 pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype,
                                                generator=g),
                 timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                 img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype),
                 txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
        if cfg["guidance_embeds"]:
            x["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
        if radius is not None:
            clear.apply_clear(model, radius, df, backend=args.backend, tile=args.tile,
                              kernel_options=args.kernel_options)
        rec = dict(height=h_px, width=w_px, tokens=h * w, variant=variant_name(radius, df), radius=radius,
                   down_factor=df, layers=cfg["num_layers"] + cfg["num_single_layers"], compile=args.compile,
                   attention_flops=clear.attention_flops(h, w, radius, text, df, cfg["num_attention_heads"]
                                                         * cfg["attention_head_dim"]))
        if radius is not None:
            lay = TokenLayout(text, h, w)
            rec["backend"] = model.clear_state.core.layout_plan(lay, device, with_grad=False).backend
        target = compile_transformer(model, args.compile)
        fn = lambda: target(**x)  # noqa: E731
        with torch.no_grad():
            rec["first_call_s"] = timer.once(fn)
            rec["time_s"] = timer.median(fn)
            rec["peak_memory_bytes"] = timer.peak_memory(fn)
        rec["compile_s"] = rec["first_call_s"] - rec["time_s"]
        if radius is not None:
            clear.remove_clear(model)
        records.append(rec)
    dense = {(r["height"], r["width"]): r["time_s"] for r in records if r["radius"] is None}
    for r in records:
        r["speedup_vs_dense"] = dense[(r["height"], r["width"])] / r["time_s"]
    return records


def released_spec(name: str):
    """The ModelSpec of a released model, by name, from every family's specs."""
    from clear.families import FAMILIES

    specs = {s.name: s for f in FAMILIES.values() for s in f.specs if s.width}
    if name not in specs:
        raise SystemExit(f"--model {name!r}: choose one of {', '.join(specs)}")
    return specs[name]


def flops_table(args) -> list[dict]:
    spec = released_spec(args.model) if args.model else None
    dim = spec.width if spec else args.heads * args.head_dim
    text = spec.max_sequence_length if spec else args.text_len
    records = []
    for (h_px, w_px) in parse_sizes(args.sizes):
        for radius, df in variants(args.radii, args.down_factors):
            h, w = h_px // 16, w_px // 16
            if df > 1 and (h % df or w % df):
                continue
            f = clear.attention_flops(h, w, radius, text, df, dim)
            full = clear.attention_flops(h, w, None, text, 1, dim)
            records.append(dict(height=h_px, width=w_px, tokens=h * w, variant=variant_name(radius, df),
                                radius=radius, down_factor=df, tflops=f / 1e12, fraction_of_full=f / full))
            if spec:
                records[-1].update(model=spec.name, tflops_per_step=spec.attention_flops(h, w, radius, df) / 1e12)
    return records


def _comm_worker(rank, world, init_file, args, jobs, dtype, results):
    """One rank: for each job, one patch-parallel attention call on random q/k/v; the bytes it handed
    to each kind of message (``PatchParallelAttention.comm_log``)."""
    torch.manual_seed(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for i, (h, w, radius, df) in enumerate(jobs):
        core = ClearAttention(radius, df, args.backend, tile=args.tile)
        attn = PatchParallelAttention(core, None, args.text_mode)
        attn.plan = plan_bands(h, w, world, rank, core.window)
        n = args.text_len + attn.plan.band.rows * w
        q, k, v = (torch.randn(1, n, args.heads, args.head_dim, dtype=dtype) for _ in range(3))
        sw = torch.rand(1, 1, 1, df, 1, df, 1, dtype=dtype) if df > 1 else None
        attn.comm_log = []
        with torch.no_grad():
            attn(q, k, v, TokenLayout(args.text_len, attn.plan.band.rows, w), sw)
        measured = {}
        for sent in attn.comm_log:
            measured[sent.what] = measured.get(sent.what, 0) + sent.nbytes
        results[(i, rank)] = measured
    dist.destroy_process_group()


def bench_comm(args, dtype) -> list[dict]:
    """Bytes each of ``--ranks`` CPU processes (gloo) hands to torch.distributed in one
    patch-parallel attention layer, for every size and window, next to ``expected_comm_bytes``."""
    jobs = []
    for (h_px, w_px), (radius, df) in ((s, v) for s in parse_sizes(args.sizes)
                                       for v in variants(args.radii, args.down_factors)):
        h, w = h_px // 16, w_px // 16
        if radius is None or (df > 1 and (h % df or w % df)):
            continue
        try:
            plan_bands(h, w, args.ranks, 0, Window(radius, df))  # fail before spawning
        except ValueError as e:
            raise SystemExit(f"--sizes {h_px}x{w_px} (r={radius}, df={df}): {e}") from None
        jobs.append((h, w, radius, df))
    if not jobs:
        raise SystemExit("comm: no size and radius to measure (patch parallelism needs a radius)")
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_comm_worker, args=(args.ranks, os.path.join(tmp, "store"), args, jobs, dtype, results),
                 nprocs=args.ranks)
    elem = torch.empty(0, dtype=dtype).element_size()
    records = []
    for i, (h, w, radius, df) in enumerate(jobs):
        for rank in range(args.ranks):
            exp = expected_comm_bytes(h, w, args.ranks, rank, radius, df, args.text_len, args.heads, args.head_dim,
                                      1, elem, args.text_mode)
            got = results[(i, rank)]
            for kind in sorted(set(exp) | set(got)):
                records.append(dict(height=h * 16, width=w * 16, grid=f"{h}x{w}", radius=radius, down_factor=df,
                                    ranks=args.ranks, text_mode=args.text_mode, heads=args.heads,
                                    head_dim=args.head_dim, text_len=args.text_len, rank=rank, kind=kind,
                                    measured_bytes=got.get(kind, 0), expected_bytes=exp.get(kind, 0)))
    return records


def comm_markdown(records: list[dict], dtype: str) -> str:
    """One table per measured setting: rank, kind, measured and expected bytes."""
    lines = []
    for key in dict.fromkeys((r["grid"], r["radius"], r["down_factor"]) for r in records):
        rows = [r for r in records if (r["grid"], r["radius"], r["down_factor"]) == key]
        r = rows[0]
        lines += [f"| rank | kind | measured bytes | expected_comm_bytes |  ({r['grid']} tokens, r={r['radius']:g}, "
                  f"df={r['down_factor']}, {r['ranks']} ranks, {r['text_mode']}, {r['heads']}x{r['head_dim']} "
                  f"{dtype}, {r['text_len']} text)", "|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['kind']} | {r['measured_bytes']} | {r['expected_bytes']} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


def environment(device) -> dict:
    env = dict(date=date.today().isoformat(), time_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, python=platform.python_version(), device=str(device),
               command="python " + " ".join(sys.argv))
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def markdown(mode: str, records: list[dict], env: dict) -> str:
    head = f"<!-- {env['command']} | {env.get('device_name')} | torch {env['torch']} | {env['date']} -->"
    if mode == "comm":
        return head + "\n" + comm_markdown(records, env["dtype"].removeprefix("torch.")) + "\n"
    if mode == "flops":
        cols = [("height", "H px"), ("width", "W px"), ("variant", "variant"), ("tflops", "TFLOPs/layer"),
                ("fraction_of_full", "of full")]
        if records and "model" in records[0]:
            cols = [("model", "model"), *cols, ("tflops_per_step", "TFLOPs/step")]
    elif mode == "attention":
        cols = [("height", "H px"), ("width", "W px"), ("variant", "variant"), ("backend", "backend"),
                ("compile", "compile"), ("time_s", "ms"), ("tflops_per_s", "useful TFLOP/s"),
                ("mask_build_s", "mask build ms"), ("first_call_s", "first call ms"), ("compile_s", "compile ms"),
                ("peak_memory_bytes", "peak GiB")]
    else:
        cols = [("height", "H px"), ("width", "W px"), ("tokens", "tokens"), ("variant", "variant"),
                ("backend", "backend"), ("compile", "compile"), ("time_s", "step s"), ("speedup_vs_dense", "speed-up"),
                ("first_call_s", "first call s"), ("compile_s", "compile s"), ("peak_memory_bytes", "peak GiB")]

    def fmt(key, value):
        if value is None:
            return "–"
        if key in ("time_s", "mask_build_s", "first_call_s", "compile_s") and mode == "attention":
            return f"{value * 1e3:.2f}"
        if key == "peak_memory_bytes":
            return f"{value / 2**30:.2f}"
        if isinstance(value, float):
            return f"{value:.3g}" if key != "time_s" else f"{value:.3f}"
        return str(value)

    lines = [head, "| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in cols) + " |" for r in records]
    return "\n".join(lines) + "\n"


def plot(mode: str, records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("tflops", "attention TFLOPs per layer") if mode == "flops" else ("time_s", "time (s)")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(r["variant"] for r in records):
        pts = sorted((r["tokens"], r[key]) for r in records if r["variant"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image tokens")
    ax.set_ylabel(label)
    ax.set_title(f"CLEAR {mode}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def save(mode: str, records: list[dict], env: dict, out: Path) -> None:
    write_bytes(out.with_suffix(".json"), json.dumps(dict(mode=mode, environment=env, records=records),
                                                     indent=1).encode())
    write_bytes(out.with_suffix(".md"), markdown(mode, records, env).encode())
    if mode != "comm":  # bytes, not times: the tables say it all
        plot(mode, records, out.with_suffix(".png"))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["attention", "step", "flops", "comm"])
    p.add_argument("--sizes", default="1024,2048,4096,8192", help="pixels, e.g. 1024,2048x4096")
    p.add_argument("--radii", default="8,16,32")
    p.add_argument("--down-factors", default="1,4")
    p.add_argument("--heads", type=int, default=24, help="attention heads (step: of head size 128)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--model", default=None, help="flops: a released model (FLUX.1-dev, FLUX.2-dev, Qwen-Image, ...): "
                   "its width, text length and layers replace --heads, --head-dim and --text-len")
    p.add_argument("--backend", default="auto", choices=backends.choices())
    p.add_argument("--tile", type=parse_tile, default=(8, 16), help="flex tile HxW (tokens), one block each")
    p.add_argument("--kernel-options", type=json.loads, default=None,
                   help='FlexAttention kernel options as JSON, e.g. \'{"BLOCK_M": 128, "BLOCK_N": 64}\' (CUDA)')
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--num-layers", type=int, default=None, help="step: double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--num-single-layers", type=int, default=None, help="step: single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--tiny", action="store_true", help="step: a tiny model (CPU smoke test)")
    p.add_argument("--compile", default="none", choices=["none", "full", "regional"],
                   help="torch.compile(fullgraph=True) the timed call (full) or the repeated blocks (regional, step)")
    p.add_argument("--ranks", type=int, default=8, help="comm: processes (CPU, gloo), one band of rows each")
    p.add_argument("--text-mode", default="exact", choices=TEXT_MODES, help="comm: text queries' merge (exact or "
                   "the paper's average)")
    p.add_argument("--out", required=True, help="output path without suffix; writes .json, .md, .png")
    args = p.parse_args(argv)

    device = torch.device("cpu") if args.mode == "comm" else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.mode == "attention":
        records = bench_attention(args, device, dtype)
    elif args.mode == "step":
        records = bench_step(args, device, dtype)
    elif args.mode == "comm":
        records = bench_comm(args, dtype)
    else:
        records = flops_table(args)
    env = environment(device)
    env.update(dtype=str(dtype), tile=list(args.tile), kernel_options=args.kernel_options)
    save(args.mode, records, env, Path(args.out))
    print(markdown(args.mode, records, env))
    return records


if __name__ == "__main__":
    main()
