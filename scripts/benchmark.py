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
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tqdm import tqdm

import clear
from clear import backends
from clear.apply import plan_forward
from clear.attention import ClearAttention
from clear.devices import DTYPE_CHOICES, resolve_device, resolve_dtype
from clear.families import FAMILIES
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
                rec["mask_build_s"] = timer.once(lambda: core.plan(layout, device, with_grad=False))
                core._plans.clear()  # the first call below builds its plan again
                t0 = time.perf_counter()
                plan = core.plan(layout, device, with_grad=False)  # built outside the compiled call
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
    from diffusers import FluxTransformer2DModel  # here: diffusers loads after --help

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
    from diffusers import FluxPipeline  # here: diffusers loads after --help

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
            rec["backend"] = model.clear_state.core.plan(lay, device, with_grad=False).backend
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


# ------------------------------------------------------------------------------------------
# A whole model per grid: full attention, every CLEAR backend, auto, and the no-attention floor
# ------------------------------------------------------------------------------------------


def _rss_child(args, name: str, grid: tuple[int, int], train: bool, result) -> None:
    """In a fresh process: load the model, make one variant, run one step; how far the process's resident memory
    peaked above what it held before that step (bytes; Linux)."""
    device = torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    base, cfg = model_under_test(args, device, dtype)
    args.variants = name.removeprefix("clear:")
    model, ctx = model_variants(base, args)[name]
    fn = model_step(model, ctx, model_inputs(cfg, *grid, args.text_len, device, dtype), train)
    status = Path("/proc/self/status")

    def kib(field):
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(field))

    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from the current RSS
    before = kib("VmRSS:")
    fn()
    result.put((kib("VmHWM:") - before) * 1024)


def peak_rss(args, name: str, grid: tuple[int, int], train: bool) -> int:
    """Peak resident memory one step of ``name`` adds (CPU), measured in its own process: in a process that has
    run other variants, memory freed by them is reused and the peak says nothing."""
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(args, name, grid, train, result))
    proc.start()
    value = result.get(timeout=3600)
    proc.join()
    return value


def alternate(fns: dict, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each callable per repeat, the callables taking turns (so that they share the machine's state
    alike), after ``warmup`` untimed turns."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timer, times = Timer(device, 0, 1), {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer.once(fn))
    return times


def parse_grids(text: str) -> list[tuple[int, int]]:
    """``--grids``: image-token grids ``N`` (square) or ``HxW``, comma-separated."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        h, _, w = part.partition("x")
        out.append((int(h), int(w or h)))
    return out


def model_under_test(args, device, dtype):
    """``--model``: a FLUX pipeline folder's transformer (the mini: ``ckpt/mini``); else FLUX-shaped heads
    (``--heads`` x 128, ``--num-layers`` + ``--num-single-layers`` blocks, random weights)."""
    from diffusers import FluxTransformer2DModel  # here: diffusers loads after --help

    if args.model:
        model = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer")
        return model.to(device=device, dtype=dtype).eval(), dict(model.config)
    args.tiny = False
    args.num_layers = 1 if args.num_layers is None else args.num_layers
    args.num_single_layers = 2 if args.num_single_layers is None else args.num_single_layers
    return flux_model(args, device, dtype)


def model_inputs(cfg: dict, h: int, w: int, text: int, device, dtype) -> dict:
    from diffusers import FluxPipeline  # here: diffusers loads after --help

    g = torch.Generator(device).manual_seed(0)
    x = dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], device=device, dtype=dtype, generator=g),
             encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], device=device, dtype=dtype,
                                               generator=g),
             pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype, generator=g),
             timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
             img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, device, dtype),
             txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
    if cfg.get("guidance_embeds"):
        x["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return x


def _no_attention(query, key, value, **kwargs):
    """The floor: attention replaced by returning V (every projection, MLP and norm still runs)."""
    return value


def model_variants(base, args) -> dict:
    """name -> (model, context factory): full attention, the floor, and CLEAR on every backend and ``auto``,
    each on its own copy of the model so that the timed runs can alternate."""
    from diffusers.models.transformers import transformer_flux  # here: diffusers loads after --help

    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - {"full", "floor", *backends.choices()})
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from full, floor, {', '.join(backends.choices())}")
    out = {"full": (base, contextlib.nullcontext),
           "floor": (base, lambda: mock.patch.object(transformer_flux, "dispatch_attention_fn", _no_attention))}
    out = {k: v for k, v in out.items() if k in wanted or k == "full"}  # full: the speed-ups' reference
    for name in [n for n in ("auto", *backends.names()) if n in wanted]:
        m = copy.deepcopy(base)
        core = clear.apply_clear(m, args.radius, args.down_factor, backend=name, tile=args.tile)
        if name == "flex":
            core.compile_kernels = True  # the compiled kernel (eager FlexAttention materialises every score)
        out[f"clear:{name}"] = (m, contextlib.nullcontext)
    return out


def model_step(model, ctx, x: dict, train: bool):
    """One forward (``train``: forward + backward of the attention projections) of ``model`` on inputs ``x``."""
    model.train(train)
    for name, p in model.named_parameters():
        p.requires_grad_(train and ("attn" in name or "spatial" in name))

    def fn():
        with ctx():
            if not train:
                with torch.no_grad():
                    return model(**x, return_dict=False)[0]
            out = model(**x, return_dict=False)[0]
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    return fn


def bench_model(args, device, dtype) -> list[dict]:
    """Seconds per forward (and per training step: forward + backward of the attention projections) of a whole
    model per grid, the variants' timed runs alternating so that they share the machine's state alike."""
    base, cfg = model_under_test(args, device, dtype)
    text = args.text_len
    variants_ = model_variants(base, args)
    records = []
    jobs = [(grid, False) for grid in parse_grids(args.grids)] + [(g, True) for g in parse_grids(args.train_grids)]
    for (h, w), train in tqdm(jobs, desc="model"):
        x = model_inputs(cfg, h, w, text, device, dtype)
        names = [n for n in variants_ if not (train and n in ("floor", "clear:flex"))]  # flex: no CPU backward
        fns = {name: model_step(*variants_[name], x, train) for name in names}
        rec_of = {}
        for name, fn in fns.items():
            rec = dict(grid=f"{h}x{w}", tokens=h * w, text_len=text, step="train" if train else "forward",
                       variant=name, radius=args.radius, down_factor=args.down_factor)
            rec["first_call_s"] = Timer(device, 0, 1).once(fn)  # plans, compilation
            model = variants_[name][0]
            if getattr(model, "clear_state", None) is not None:
                with torch.set_grad_enabled(train):
                    rec["backend"] = next(iter(plan_forward(model, **x).plans.values())).backend
            rec_of[name] = rec
        times = alternate(fns, device, args.warmup, args.repeats)
        for name, rec in rec_of.items():
            rec["time_s"], rec["min_s"] = statistics.median(times[name]), min(times[name])
            measure_rss = device.type == "cpu" and (h, w) in parse_grids(args.rss_grids)
            rec["peak_rss_bytes"] = peak_rss(args, name, (h, w), train) if measure_rss else None
        full = rec_of["full"]["time_s"]
        for rec in rec_of.values():
            rec["speedup_vs_full"] = full / rec["time_s"]
        records += rec_of.values()
    return records


def model_markdown(records: list[dict]) -> str:
    lines = []
    for step in ("forward", "train"):
        rows = [r for r in records if r["step"] == step]
        if not rows:
            continue
        grids = list(dict.fromkeys(r["grid"] for r in rows))
        names = list(dict.fromkeys(r["variant"] for r in rows))
        what = "s per forward" if step == "forward" else "s per training step (forward + backward)"
        lines += [f"| {what} | " + " | ".join(f"{g} tokens" for g in grids) + " |", "|---|" + "---:|" * len(grids)]
        for name in names:
            cells = []
            for g in grids:
                r = next((r for r in rows if r["grid"] == g and r["variant"] == name), None)
                if r is None:
                    cells.append("–")
                    continue
                label = f" ({r['backend']})" if name == "clear:auto" and r.get("backend") else ""
                cells.append(f"{r['time_s']:.3f} s, {r['speedup_vs_full']:.2f}x{label}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| first call s / peak RSS MiB | " + " | ".join(grids) + " |", "|---|" + "---:|" * len(grids)]
        for name in names:
            cells = []
            for g in grids:
                r = next((r for r in rows if r["grid"] == g and r["variant"] == name), None)
                mem = r and r.get("peak_rss_bytes")  # measured on --rss-grids only
                cells.append("–" if r is None else f"{r['first_call_s']:.2f} / "
                             + ("–" if mem is None else f"{mem / 2**20:.0f}"))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# auto's measurements: every backend per call shape, shipped in clear/backends/measured/
# ------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``--shapes``: ``HEADSxHEAD_DIM:TEXT`` call shapes, comma-separated (the mini: 4x24:32)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        hd, _, t = part.partition(":")
        heads, _, dim = hd.partition("x")
        out.append((int(heads), int(dim), int(t or 0)))
    return out


def bench_auto(args, device, dtype) -> list[dict]:
    """Seconds of one attention call (``with_grad``: forward + backward) on every backend that can run it, per
    call shape, grid, radius, down factor; the backends alternate. ``auto`` reads the result
    (:func:`clear.backends.decide`)."""
    partial = Path(args.out).with_suffix(".partial.json")  # a run that stops resumes from its finished records
    records = json.loads(partial.read_text())["records"] if partial.exists() else []
    done = {(r["heads"], r["head_dim"], r["text"], r["grid"], r["radius"], r["down_factor"], r["with_grad"])
            for r in records}
    jobs = [(shape, grid, radius, df, grad)
            for shape in parse_shapes(args.shapes) for grid in parse_grids(args.grids)
            for radius in [None] + [float(r) for r in args.radii.split(",")]
            for df in ([1] if radius is None else [int(d) for d in args.down_factors.split(",")])
            for grad in (False, True)
            if not (grad and grid[0] * grid[1] > args.max_train_tokens) and not (df > 1 and grid[0] % df)]
    jobs = [j for j in jobs if (*j[0], f"{j[1][0]}x{j[1][1]}", j[2], j[3], j[4]) not in done]
    for (heads, dim, text), (h, w), radius, df, grad in tqdm(jobs, desc="auto"):
        layout = TokenLayout(text, h, w)
        window = Window(radius, df)
        g = torch.Generator(device).manual_seed(0)
        n_k = layout.seq_len + layout.num_pooled(window)
        q = torch.randn(1, layout.seq_len, heads, dim, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(1, n_k, heads, dim, device=device, dtype=dtype, generator=g) for _ in range(2))
        fns = {}
        for name in backends.names():
            spec = backends.get(name)
            if not spec.runs_on(device.type, grad) or (radius is None and not spec.full_attention):
                continue
            if name == "flex" and device.type != "cuda" and (h, w) not in parse_grids(args.flex_grids):
                continue  # each grid compiles its own kernel (tens of seconds on CPU)
            core = ClearAttention(radius, df, backend=name, tile=args.tile)
            if name == "flex":
                core.compile_kernels = True
            plan = core.plan(layout, device, grad)
            scale = 1 / dim**0.5
            if grad:
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                fns[name] = lambda plan=plan, qq=qq, kk=kk, vv=vv: plan.attend(qq, kk, vv, scale).sum().backward()
            else:
                fns[name] = lambda plan=plan: plan.attend(q, k, v, scale)
            del core
        with torch.set_grad_enabled(grad):
            times = alternate(fns, device, 1, args.repeats)
        # the least of the alternating repeats: the call's own cost, least disturbed by other work on the machine
        seconds = {name: (min(times[name]) if name in times else None) for name in backends.names()}
        records.append(dict(heads=heads, head_dim=dim, text=text, image=h * w, grid=f"{h}x{w}", radius=radius,
                            down_factor=df, with_grad=grad, seconds=seconds,
                            fastest=min((n for n in seconds if seconds[n] is not None), key=lambda n: seconds[n])))
        write_bytes(partial, json.dumps(dict(records=records)).encode())
    partial.unlink(missing_ok=True)
    return records


def auto_markdown(records: list[dict]) -> str:
    names = backends.names()
    lines = ["| heads x dim, text | grid | r | df | step | " + " | ".join(f"{n} ms" for n in names) + " | fastest |",
             "|---|---|---|---|---|" + "---:|" * len(names) + "---|"]
    for r in records:
        cells = ["–" if r["seconds"].get(n) is None else f"{r['seconds'][n] * 1e3:.2f}" for n in names]
        lines.append(f"| {r['heads']}x{r['head_dim']}, {r['text']} | {r['grid']} | {r['radius']} | {r['down_factor']} "
                     f"| {'train' if r['with_grad'] else 'forward'} | " + " | ".join(cells) + f" | {r['fastest']} |")
    return "\n".join(lines) + "\n"


def released_spec(name: str):
    """The ModelSpec of a released model, by name, from every family's specs."""
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
        import diffusers  # here: diffusers loads after --help

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        try:
            import triton  # here: optional: CPU machines have no triton

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
    if mode == "model":
        return head + "\n" + model_markdown(records)
    if mode == "auto":
        return head + "\n" + auto_markdown(records)
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
    import matplotlib  # here: optional: matplotlib loads only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: after the Agg backend is chosen

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
    if mode not in ("comm", "auto"):  # bytes, or a table auto reads: the tables say it all
        plot(mode, records, out.with_suffix(".png"))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["attention", "step", "model", "auto", "flops", "comm"])
    p.add_argument("--sizes", default="1024,2048,4096,8192", help="pixels, e.g. 1024,2048x4096")
    p.add_argument("--radii", default="8,16,32")
    p.add_argument("--down-factors", default="1,4")
    p.add_argument("--heads", type=int, default=24, help="attention heads (step: of head size 128)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--model", default=None, help="flops: a released model (FLUX.1-dev, FLUX.2-dev, Qwen-Image, ...): "
                   "its width, text length and layers replace --heads, --head-dim and --text-len; model: a FLUX "
                   "pipeline folder (the mini: ckpt/mini), default FLUX-shaped heads (--heads x 128, --num-layers + "
                   "--num-single-layers blocks, random weights)")
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
    p.add_argument("--grids", default="16,32,64,128", help="model/auto: image-token grids, N or HxW")
    p.add_argument("--train-grids", default="32,64", help="model: grids of the training step (forward + backward)")
    p.add_argument("--rss-grids", default="", help="model, CPU: grids whose peak resident memory per step is "
                   "measured, each variant in a process of its own")
    p.add_argument("--radius", type=float, default=4, help="model: CLEAR's radius in tokens")
    p.add_argument("--down-factor", type=int, default=1, help="model: CLEAR's down factor")
    p.add_argument("--shapes", default="4x24:32,4x128:512", help="auto: call shapes HEADSxHEAD_DIM:TEXT")
    p.add_argument("--max-train-tokens", type=int, default=64 * 64, help="auto: largest grid measured with a backward")
    p.add_argument("--flex-grids", default="64,128", help="auto, on CPU: the grids where flex (compiled) is measured")
    p.add_argument("--ship", action="store_true", help="auto: also write clear/backends/measured/<device>.json, "
                   "which backend='auto' reads")
    p.add_argument("--variants", default="full,floor,auto," + ",".join(backends.names()),
                   help="model: full (no CLEAR), floor (attention returns V), auto and CLEAR backends")
    p.add_argument("--out", required=True, help="output path without suffix; writes .json, .md, .png")
    args = p.parse_args(argv)

    device = torch.device("cpu") if args.mode == "comm" else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.mode == "attention":
        records = bench_attention(args, device, dtype)
    elif args.mode == "step":
        records = bench_step(args, device, dtype)
    elif args.mode == "model":
        records = bench_model(args, device, dtype)
    elif args.mode == "auto":
        records = bench_auto(args, device, dtype)
    elif args.mode == "comm":
        records = bench_comm(args, dtype)
    else:
        records = flops_table(args)
    env = environment(device)
    env.update(dtype=str(dtype), tile=list(args.tile), kernel_options=args.kernel_options)
    save(args.mode, records, env, Path(args.out))
    if args.mode == "auto" and args.ship:  # what auto reads (clear.backends.measurements)
        shipped = backends.MEASURED_DIR / f"{device.type}.json"
        write_bytes(shipped, json.dumps(dict(environment=env, records=records), indent=1).encode())
        print(f"auto reads {shipped}")
    print(markdown(args.mode, records, env))
    return records


if __name__ == "__main__":
    main()
