#!/usr/bin/env python
"""The options and steps of scripts/generate.py and scripts/generate_highres.py (the scripts own
the parser: :func:`add_arguments` fills it; then :func:`resolve_args` checks everything that needs
no weights, :func:`build_pipeline` loads the pipeline, :func:`run` generates, compares and upscales
as the arguments say, :func:`run_patch_parallel` runs ``--parallel patch`` under torchrun).

Only light imports here, so that --help answers without torch or diffusers: the functions import
:mod:`clear.inference` when they run.
"""

from __future__ import annotations

from pathlib import Path

from .. import defaults


def add_arguments(p) -> None:
    """The command line's options, added to the ``argparse.ArgumentParser`` ``p``."""
    p.add_argument("--model", default=defaults.DEFAULT_MODEL, help="Hub id or local diffusers pipeline directory "
                   f"(default {defaults.DEFAULT_MODEL}; FLUX.1-schnell works zero-shot with the FLUX.1-dev weights; "
                   "SD3 / SD3.5 (StableDiffusion3Pipeline) with your own --checkpoint)")
    p.add_argument("--prompt", default="a small blue plane flying over snowy mountains at sunrise")
    p.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument("--max_pixels", type=int, default=defaults.DEFAULT_MAX_PIXELS,
                   help=f"refuse images larger than this many pixels (default {defaults.DEFAULT_MAX_PIXELS} = 16384²) "
                        "before anything loads; raise it if your hardware holds more")
    g = p.add_argument_group("CLEAR")
    g.add_argument("--variant", help="released variant name, e.g. clear_local_16 or clear_local_16_down_4 "
                   "(instead of --radius/--down_factor)")
    g.add_argument("--radius", type=float, help="window radius in tokens (default 16)")
    g.add_argument("--down_factor", type=int, help="pooled key/value tokens of df x df cells (default 1: none)")
    g.add_argument("--checkpoint", default="released", help="CLEAR weights: 'released' (default; FLUX.1-dev weights "
                   "downloaded into --ckpt_dir on first use; none exist for SD3), a .safetensors path, or 'none' "
                   "(untrained CLEAR)")
    g.add_argument("--ckpt_dir", default="ckpt", help="where released weights are kept (default ckpt/)")
    g.add_argument("--weights_revision", default=None, help="revision (commit sha, tag, branch) of the released "
                   "weights' Hub repo to download (default: clear.weights.HUB_REVISION)")
    g.add_argument("--no_strict_radius", dest="strict_radius", action="store_false",
                   help="load a --checkpoint that does not say which radius it was trained for (e.g. the first "
                   "public release's attn_weights.safetensors) or says another one: you vouch for the window")
    g.add_argument("--backend", default="auto", choices=defaults.BACKEND_CHOICES,
                   help="auto: flex on CUDA, dense elsewhere")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, help="denoising steps (default: the model's, 28 for FLUX.1-dev, 4 for "
                   "schnell, 28 for SD3-Medium and SD3.5-Large, 40 for SD3.5-Medium)")
    s.add_argument("--guidance", type=float, help="guidance scale (default: the model's, 3.5 for FLUX.1-dev, 0 for "
                   "schnell, 7 for SD3-Medium, 4.5 for SD3.5-Medium, 3.5 for SD3.5-Large; SD3.5-Large-Turbo: "
                   "--steps 4 --guidance 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max_sequence_length", type=int, help="T5 tokens (default 512 for FLUX.1-dev, 256 for schnell "
                   "and SD3)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA), float16 or float32 (default on CPU)")
    s.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    h = p.add_argument_group("high resolution (SDEdit)")
    h.add_argument("--upscale", help="upscaling stages after the base image, HEIGHTxWIDTH,..., each larger than "
                   "the one before, e.g. 2048x2048,4096x4096 (any aspect ratio), or factors of the image before, "
                   "e.g. 2x,2x")
    h.add_argument("--base", default="original", choices=("original", "clear"),
                   help="model for the base image when upscaling (default: original)")
    h.add_argument("--strength", type=float, default=defaults.DEFAULT_STRENGTH,
                   help="noise level of each stage (0.7)")
    h.add_argument("--upscale_steps", type=int, help="full schedule length of each stage (default: --steps)")
    h.add_argument("--ntk_factor", type=float, default=None,
                   help="NTK-scaled RoPE in upscaling stages "
                        f"(FLUX: default {defaults.DEFAULT_NTK_FACTOR:g}; 1 = off). "
                        "SD3 has no RoPE: leave it out")
    h.add_argument("--no_proportional_attention", action="store_true",
                   help="keep 1/sqrt(d) in upscaling stages instead of the proportional attention scale")
    h.add_argument("--proportional_formula", default="release", choices=("release", "plain"),
                   help="proportional scale in upscaling stages: release (default; the public release's "
                        "sqrt(log_L0(10N)/d) for down-sampled variants, sqrt(log_L0(N)/d) otherwise) or plain "
                        "(sqrt(log_L0(N)/d) for every variant)")
    h.add_argument("--shift", default=str(defaults.DEFAULT_SHIFT),
                   help="fixed scheduler shift in upscaling stages (default 3), or 'dynamic' for the scheduler's own "
                        "(FLUX: resolution-dependent; SD3: its config's fixed shift)")
    h.add_argument("--lowres_guidance", type=float, default=0.0,
                   help="weight of low-resolution guidance in each upscaling stage: I-Max's projected flow "
                        "(arXiv 2410.07536) keeps the low frequencies of the stage's input image, strongest at the "
                        "first step; 0 (default) = off; e.g. 1 for large upscales (docs/mini.md)")
    h.add_argument("--vae_tiling", default="auto", choices=("auto", "on", "off"),
                   help="diffusers' VAE tiling in upscaling stages (auto: from --vae_tiling_latents latent cells)")
    h.add_argument("--vae_tiling_latents", type=int, default=defaults.VAE_TILING_LATENTS,
                   help=f"--vae_tiling auto turns tiling on from this many latent cells (height/f x width/f, f the "
                        f"VAE's scale factor; default {defaults.VAE_TILING_LATENTS}: FLUX from 2048x2048 pixels)")
    v = p.add_argument_group("video (Wan: WanPipeline, WanImageToVideoPipeline; any of these makes a clip)")
    v.add_argument("--num_frames", type=int, help="frames of the clip, 4k + 1 (default 81 for a Wan model)")
    v.add_argument("--temporal_radius", type=float, help="window radius in latent frames: a query at (t, y, x) sees "
                   "(t', y', x') iff ((t-t')/rt)^2 + ((y-y')/r)^2 + ((x-x')/r)^2 < 1 (default: every frame)")
    v.add_argument("--image", help="first frame of image-to-video (a WanImageToVideoPipeline)")
    v.add_argument("--fps", type=int, default=16, help="frames per second of the written clip (default 16)")
    m = p.add_argument_group("multi-GPU (launch with torchrun --nproc_per_node N; docs/parallel.md)")
    m.add_argument("--parallel", default="none", choices=("none", "patch"),
                   help="patch (FLUX only): each GPU denoises a band of image rows, exchanging K/V halos "
                        "(clear.parallel); rank 0 decodes (VAE tiling per --vae_tiling) and writes --out")
    m.add_argument("--text_mode", default="exact", choices=("exact", "average"),
                   help="text queries under --parallel patch: exact (= one GPU) or average (the paper's Eq. 7)")
    o = p.add_argument_group("output")
    o.add_argument("--compare", action="store_true",
                   help="also run the original model with the same seed; save OUT_original.png and a "
                        "side-by-side OUT_compare.png with timings")
    o.add_argument("--warmup", action="store_true", help="an untimed 1-step run before each timed one "
                   "(compilation of the flex backend, autotuning): use it when timings matter")
    o.add_argument("--out", default="outputs/clear.png", help="output PNG (default outputs/clear.png)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_args(args):
    """Turn the command line into settings and check everything that needs no weights, cheapest
    first: variant and radius, steps, guidance, strength, output path, device, then the library's
    plan (:func:`clear.inference.plan_generation`: the model's path and family from its configs;
    every size once, with SD3's largest size and --max_pixels; the NTK factor), then the checkpoint
    (its variant, family and dtypes; downloaded if 'released'). Fails fast."""
    # here: --help stays torch-free
    from clear import inference as inf
    from clear.geometry import Window
    from clear.weights import Variant

    if args.num_frames is not None or args.temporal_radius is not None or args.image is not None:
        return resolve_video_args(args)
    if args.variant:
        v = Variant.parse(args.variant)
        for name, given, want in (("radius", args.radius, v.radius), ("down_factor", args.down_factor, v.down_factor)):
            if given is not None and float(given) != float(want):
                raise ValueError(f"--{name} {given:g} contradicts --variant {args.variant}; give only one of them")
        args.radius, args.down_factor = v.radius, v.down_factor
    args.radius = 16.0 if args.radius is None else args.radius
    args.down_factor = 1 if args.down_factor is None else args.down_factor
    try:
        Window(args.radius, args.down_factor)
    except ValueError as e:
        raise ValueError(f"--radius {args.radius:g} --down_factor {args.down_factor}: {e}") from None
    args.sizes = inf.parse_sizes(args.upscale, base=(args.height, args.width)) if args.upscale else []
    inf.check_sampling(args.steps, args.guidance, args.strength if args.sizes else None, args.upscale_steps)
    args.shift = None if str(args.shift).lower() == "dynamic" else float(args.shift)
    args.tiling = {"auto": None, "on": True, "off": False}[args.vae_tiling]
    args.proportional = False if args.no_proportional_attention else (
        "plain" if args.proportional_formula == "plain" else True)
    args.out = inf.check_output_path(args.out, ".png")
    args.device = str(inf.check_device(args.device)) if args.device else inf.default_device()
    if args.parallel == "patch" and (args.compare or args.sizes):
        raise ValueError("--parallel patch generates one image: drop --compare and --upscale")

    spec = inf.ClearSpec(args.radius, args.down_factor, None, args.backend)
    plan = inf.plan_generation(  # reads the configs only; fails on unsupported models
        args.model, (args.height, args.width), args.sizes, clear=spec,
        base_model=args.base if args.sizes else "clear", strength=args.strength, steps=args.steps,
        upscale_steps=args.upscale_steps, guidance=args.guidance, ntk_factor=args.ntk_factor,
        proportional=args.proportional, shift=args.shift, tiling=args.tiling,
        max_sequence_length=args.max_sequence_length, max_pixels=args.max_pixels,
        lowres_guidance=args.lowres_guidance, tiling_latents=args.vae_tiling_latents)
    args.family, args.ntk_factor = plan.info.family, plan.ntk_factor
    if args.family.video:  # a Wan model without a video option: a clip with the defaults
        return resolve_video_args(args)
    if args.parallel == "patch" and args.family.name != "flux":
        raise ValueError(f"--parallel patch supports FLUX.1 pipelines only, not {args.family.name}; drop --parallel")
    args.checkpoint_path = inf.resolve_checkpoint(args.checkpoint, args.radius, args.down_factor, args.ckpt_dir,
                                                  family=args.family.name, strict_radius=args.strict_radius,
                                                  revision=args.weights_revision)
    args.clear = inf.ClearSpec(args.radius, args.down_factor, args.checkpoint_path, args.backend, args.strict_radius)
    args.plan = plan.with_clear(args.clear)
    return args


def resolve_video_args(args):
    """:func:`resolve_args` for a clip (a Wan pipeline): the 3-D window, the frames and sizes, the output (MP4,
    GIF or PNG frames), sampling defaults of the released model, one checkpoint per transformer (comma-separated,
    in the order transformer, transformer_2); everything checked before any weights load."""
    # here: --help stays torch-free
    from clear import inference as inf
    from clear.inference import video

    if args.variant:
        raise ValueError("--variant names the released FLUX.1-dev variants; for a video model pass --radius (and "
                         "--temporal_radius)")
    if args.upscale:
        raise ValueError("--upscale (SDEdit stages) is for images; a clip is generated at one size")
    args.radius = 16.0 if args.radius is None else args.radius
    args.down_factor = 1 if args.down_factor is None else args.down_factor
    args.num_frames = 81 if args.num_frames is None else args.num_frames
    try:
        video.VideoClear(args.radius, args.temporal_radius, args.down_factor)
    except ValueError as e:
        raise ValueError(f"--radius {args.radius:g} --temporal_radius {args.temporal_radius} --down_factor "
                         f"{args.down_factor}: {e}") from None
    inf.check_sampling(args.steps, args.guidance)
    args.out = video.check_video_output(inf.check_output_path(args.out, ""))
    args.device = str(inf.check_device(args.device)) if args.device else inf.default_device()
    family = inf.pipeline_family(args.model)
    if not family.video:
        raise ValueError(f"--num_frames, --temporal_radius and --image are for video models, but {args.model} is a "
                         f"{family.name} image model: drop them")
    if args.parallel == "patch":
        video.refuse_patch_parallel(family.name)
    index = inf.check_model(args.model)
    if (index["_class_name"] == "WanImageToVideoPipeline") != (args.image is not None):
        raise ValueError(f"{args.model} is a {index['_class_name']}: "
                         + ("pass --image (the first frame)" if args.image is None else "it takes no --image"))
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} does not exist")
    video.check_video_size(args.model, args.num_frames, args.height, args.width, args.down_factor)
    spec = family.spec(family.transformer_config(args.model))
    args.steps = spec.steps if args.steps is None else args.steps
    args.guidance = spec.guidance if args.guidance is None else args.guidance
    args.max_sequence_length = args.max_sequence_length or spec.max_sequence_length
    ckpt = str(args.checkpoint).lower()
    if ckpt in ("released", "auto", "default"):
        raise ValueError("no released CLEAR weights for Wan models: train your own (docs/families.md) and pass "
                         "--checkpoint PATH (Wan 2.2 A14B: two paths, comma-separated), or --checkpoint none")
    checkpoints = None if ckpt == "none" else tuple(args.checkpoint.split(","))
    args.video_clear = video.VideoClear(args.radius, args.temporal_radius, args.down_factor, checkpoints,
                                        args.backend, args.strict_radius)
    video.check_video_checkpoints(args.video_clear, video.experts(index))
    args.family, args.video, args.plan = family, True, None
    args.checkpoint_path = args.checkpoint if checkpoints else None
    return args


def run_video(args, pipe) -> dict[str, str]:
    """Generate a clip (and, with ``--compare``, the original model's first), write it with its settings."""
    from PIL import Image

    # here: --help stays torch-free
    from clear import inference as inf
    from clear.inference import video

    out, written = args.out, {}
    image = Image.open(args.image).convert("RGB") if args.image else None
    call = dict(prompt=args.prompt, num_frames=args.num_frames, height=args.height, width=args.width,
                steps=args.steps, guidance=args.guidance, seed=args.seed, image=image,
                max_sequence_length=args.max_sequence_length)
    dtype = str(inf.resolve_dtype(args.dtype, args.device)).replace("torch.", "")
    common = dict(model=args.model, device=str(args.device), dtype=dtype)
    if args.compare:
        res = video.generate_video(pipe, **call)
        written["original"] = video.save_video(res.frames, out.with_name(out.stem + "_original" + out.suffix),
                                               {**common, **res.settings}, fps=args.fps)[0]
        print(f"original: {args.num_frames} frames {args.height}x{args.width} in {res.seconds:.2f} s")
    video.apply_to_video_pipeline(pipe, args.video_clear)
    res = video.generate_video(pipe, **call)
    settings = {**common, **res.settings, **args.video_clear.settings()}
    written["video"] = video.save_video(res.frames, out, settings, fps=args.fps)[0]
    print(f"{args.video_clear.label}: {args.num_frames} frames {args.height}x{args.width} in {res.seconds:.2f} s "
          f"-> {written['video']}")
    return written


def build_pipeline(args):
    """Load the pipeline (CLEAR is put on it by :func:`run`, after an optional original run)."""
    from clear import inference as inf  # here: --help stays torch-free

    if getattr(args, "video", False):
        from clear.inference.video import load_video_pipeline

        pipe = load_video_pipeline(args.model, args.device, args.dtype)
        pipe.set_progress_bar_config(disable=args.quiet, leave=False)
        return pipe
    pipe = inf.load_pipeline(args.model, args.device, args.dtype, offload=args.offload, info=args.plan.info)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    return pipe


def _settings(args, result, **extra) -> dict:
    from clear import inference as inf  # here: --help stays torch-free

    dtype = str(inf.resolve_dtype(args.dtype, args.device)).replace("torch.", "")
    return dict(model=args.model, checkpoint=args.checkpoint_path or "none", device=str(args.device), dtype=dtype,
                **result.settings, **extra)


def _stage_path(out: Path, i: int, h: int, w: int, tag: str = "") -> Path:
    return out.with_name(f"{out.stem}{tag}.stage{i}_{h}x{w}.png")


def run(args, pipe) -> dict[str, str]:
    """Generate (and compare, and upscale) as the arguments say; returns the written paths."""
    from clear import inference as inf  # here: --help stays torch-free

    if getattr(args, "video", False):
        return run_video(args, pipe)
    out, written = args.out, {}

    def chain(spec):  # one full run of the plan (base image, then any upscaling stages) with `spec` CLEAR
        return inf.run_plan(pipe, args.prompt, args.plan.with_clear(spec), seed=args.seed, warmup=args.warmup,
                            progress=not args.quiet)

    original = None
    if args.compare:  # the original model first: loading CLEAR weights overwrites the attention projections
        inf.check_weights_fit(pipe, args.clear)  # so the checkpoint's keys and shapes are checked before it runs
        original = chain(None)
        meta = _settings(args, original[-1].result, total_seconds=round(_total(original), 3))
        written["original"] = inf.save_png(original[-1].image, out.with_name(out.stem + "_original.png"), meta)
    stages = chain(args.clear)
    for i, st in enumerate(stages[:-1]):
        written[f"stage{i}"] = inf.save_png(st.image, _stage_path(out, i, st.height, st.width),
                                            _settings(args, st.result, stage=i))
    final = stages[-1]
    meta = _settings(args, final.result, total_seconds=round(_total(stages), 3), stages=len(stages))
    written["image"] = inf.save_png(final.image, out, meta)
    print(f"{args.clear.label}: {final.height}x{final.width} in {_total(stages):.2f} s -> {out}")
    if original is not None:
        orig_res = inf.Result(original[-1].image, _total(original))
        clear_res = inf.Result(final.image, _total(stages))
        labels = [inf.timing_label(orig_res, "original"), inf.timing_label(clear_res, args.clear.label, orig_res)]
        grid = inf.image_grid([orig_res.image, clear_res.image], labels)
        written["compare"] = inf.save_png(grid, out.with_name(out.stem + "_compare.png"),
                                          dict(model=args.model, prompt=args.prompt, labels=labels,
                                               original_seconds=round(orig_res.seconds, 3),
                                               clear_seconds=round(clear_res.seconds, 3)))
        print(f"original: {orig_res.seconds:.2f} s; {labels[1]} -> {written['compare']}")
    return written


def run_patch_parallel(args) -> dict[str, str]:
    """``--parallel patch``, one process per GPU under torchrun: every rank denoises its band
    of image rows (:func:`clear.inference.generate_patch_parallel`); rank 0 writes the PNG (other
    ranks return ``{}``)."""
    import torch  # here: --help stays torch-free

    # here: --help stays torch-free
    from clear import inference as inf
    from clear import parallel

    args.device = parallel.init_distributed(args.device)
    try:
        pipe = build_pipeline(args)
        res = inf.generate_patch_parallel(pipe, args.prompt, args.plan, seed=args.seed, warmup=args.warmup,
                                          text_mode=args.text_mode)
        if res is None:
            return {}
        path = inf.save_png(res.image, args.out, _settings(args, res))
        print(f"{res.settings['attention']}: {args.height}x{args.width} in {res.seconds:.2f} s -> {path}")
        return {"image": path}
    finally:
        torch.distributed.destroy_process_group()


def _total(stages) -> float:
    return sum(st.seconds for st in stages)
