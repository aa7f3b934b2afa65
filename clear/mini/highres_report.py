"""The high-resolution cascade's outputs (:mod:`clear.mini.highres`): ``metrics.json``, ``report.md``,
``grid_<size>.png`` (per prompt: teacher | zero-shot | distilled | df = 2 at the top size) and ``speed.png``
(seconds per transformer forward against image tokens, log-log). Tables shaped like the paper's Table 3
(SDEdit upscaling: similarity to the original model's image per stage) and Table 7 (time per image by
resolution, with the speed-up over the original model)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from clear.files import atomic_path, save_image, write_text

from .report import _fmt, _shown_path, grid_image
from .scenes import controls_text


SPEED_BAR = 8.0  # the teacher's seconds per image at the top size / the distilled student's
MS_SSIM_BAR = 0.90  # MS-SSIM of the distilled student's top-size image to the teacher's
KIND_GAP_BAR = 0.05  # the distilled student's kind accuracy at most this far below the teacher's, at the top size
KEEPS_SHAPES_BAR = 0.8  # the teacher's kind accuracy at the top size / at the base size


def _ratio(a, b):
    return a / b if a is not None and b else None


def bars(tables: dict, top: str) -> dict:
    """The issue's bars on the cascade, each ``{"value", "bar", "above", "text", "pass"}`` (``above``: the value
    must be at least the bar; else at most)."""
    t = tables["teacher"]["stages"]
    d = tables["distilled"]["stages"][top]
    z = tables["zero_shot"]["stages"][top]
    base = str(min(int(k) for k in t))
    out = {
        "speed": {"value": _ratio(t[top]["seconds"], d["seconds"]), "bar": SPEED_BAR, "above": True,
                  "text": f"{top} px: distilled CLEAR faster per image than the teacher (x)"},
        "ms_ssim": {"value": d["ms_ssim"], "zero_shot": z["ms_ssim"], "bar": MS_SSIM_BAR, "above": True,
                    "text": f"{top} px: MS-SSIM of distilled to the teacher's image, and above zero-shot's"},
        "kind_accuracy": {"value": t[top]["kind_accuracy"] - d["kind_accuracy"]
                          if None not in (t[top]["kind_accuracy"], d["kind_accuracy"]) else None,
                          "bar": KIND_GAP_BAR, "above": False,
                          "text": f"{top} px: kind accuracy of distilled below the teacher's by"},
        "teacher_keeps_shapes": {"value": _ratio(t[top]["kind_accuracy"], t[base]["kind_accuracy"]),
                                 "bar": KEEPS_SHAPES_BAR, "above": True,
                                 "text": f"the teacher's kind accuracy at {top} px / at {base} px"},
    }
    for key, b in out.items():
        v = b["value"]
        b["pass"] = v is not None and (v >= b["bar"] if b["above"] else v <= b["bar"]) and (
            key != "ms_ssim" or (z["ms_ssim"] or 0) < v)
    return out


def collect(s, variants, tables: dict, speed: dict, step_seconds: dict, *, controls: dict, command: str,
            machine: dict, wall_seconds: float, pixels_per_token: int, scenes: list) -> dict:
    """metrics.json's dict. ``controls``: :func:`clear.mini.scenes.controls` by size (str)."""
    from .scenes import caption

    top = str(s.sizes[-1])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or ("python scripts/mini.py highres" + (" --quick" if s.quick else "")),
        "machine": machine,
        "wall_seconds": round(wall_seconds, 1),
        "step_seconds": {k: round(v, 1) for k, v in step_seconds.items()},
        "settings": s.as_dict(),
        "pixels_per_token": pixels_per_token,
        "captions": [caption(sc) for sc in scenes],
        "variants": tables,
        "speed": {name: {str(k): v for k, v in row.items()} for name, row in speed.items()},
        "bars": bars(tables, top),
        "score_controls": controls,
    }


def table3(metrics: dict) -> list[str]:
    """Per stage: MS-SSIM / PSNR / SSIM to the teacher's image at that stage, kind accuracy, placement."""
    s = metrics["settings"]
    sizes = [str(x) for x in s["sizes"]]
    base = str(min(int(k) for k in metrics["variants"]["teacher"]["stages"]))
    head = (f"| variant | {base} px kind ↑ | place ↑ | " + " | ".join(
        f"{x} px MS-SSIM ↑ | PSNR ↑ | SSIM ↑ | kind ↑ | place ↑" for x in sizes) + " |")
    lines = [head, "|---|" + "---:|" * (2 + 5 * len(sizes))]
    for v in metrics["variants"].values():
        cells = [_fmt(v["stages"][base]["kind_accuracy"], 3), _fmt(v["stages"][base]["placement"], 3)]
        for x in sizes:
            st = v["stages"][x]
            ms = _fmt(st.get("ms_ssim"), 3) if st.get("psnr") is None or st.get("ms_ssim") is not None else "n/a"
            cells += [ms, _fmt(st.get("psnr"), 2), _fmt(st.get("ssim"), 3), _fmt(st["kind_accuracy"], 3),
                      _fmt(st["placement"], 3)]
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    return lines


def table7(metrics: dict) -> list[str]:
    """Per stage: seconds per image (and the speed-up over the teacher), seconds per forward, forwards,
    attention GFLOPs per forward, peak resident memory."""
    s = metrics["settings"]
    sizes = [str(x) for x in s["sizes"]]
    t = metrics["variants"]["teacher"]["stages"]
    lines = ["| variant | " + " | ".join(f"{x} px s/image (×) | s/forward | attn. GFLOPs | peak RSS MB"
                                         for x in sizes) + " |",
             "|---|" + "---:|" * (4 * len(sizes))]
    for v in metrics["variants"].values():
        cells = []
        for x in sizes:
            st = v["stages"][x]
            cells += [f"{_fmt(st['seconds'], 2)} ({t[x]['seconds'] / st['seconds']:.1f}×)",
                      _fmt(st["forward_seconds"], 3), _fmt(st["attention_gflops"], 2), f"{st['peak_rss_mb']:.0f}"]
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    return lines


def time_split_table(metrics: dict) -> list[str]:
    """Per stage: one image's seconds in the text encoders, in denoising (the transformer's forwards and the
    scheduler: the rest of the call), in the VAE's encode and decode, and whether the VAE was tiled."""
    sizes = [str(x) for x in metrics["settings"]["sizes"]]
    lines = ["| variant | " + " | ".join(f"{x} px text s | denoise s | VAE encode s | VAE decode s (tiled)"
                                         for x in sizes) + " |",
             "|---|" + "---:|" * (4 * len(sizes))]
    for v in metrics["variants"].values():
        cells = []
        for x in sizes:
            st = v["stages"][x]
            tiled = {True: " (tiled)", False: ""}.get(st.get("vae_tiling"), "")
            cells += [_fmt(st.get("text_seconds"), 3), _fmt(st.get("denoise_seconds"), 2),
                      _fmt(st.get("vae_encode_seconds"), 3), _fmt(st.get("vae_decode_seconds"), 3) + tiled]
        lines.append(f"| {v['label']} | " + " | ".join(cells) + " |")
    return lines


def speed_table(metrics: dict) -> list[str]:
    sp = metrics["speed"]
    sizes = list(sp["teacher"])
    ppt = metrics["pixels_per_token"]
    lines = ["| seconds per forward | " + " | ".join(f"{x} px ({int(x) // ppt}²)" for x in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    names = {"teacher": "teacher (SDPA)", "clear": f"CLEAR r={metrics['settings']['radius']} "
             f"({metrics['settings']['backend']})", "floor": "no attention (floor)"}
    for key, row in sp.items():
        label = names.get(key, f"CLEAR r={metrics['settings']['radius']} df={metrics['settings']['down_factor']} "
                               f"({metrics['settings']['backend']})")
        lines.append(f"| {label} | " + " | ".join(_fmt(row[x], 3) for x in sizes) + " |")
    return lines


def markdown(metrics: dict) -> str:
    s, m = metrics["settings"], metrics["machine"]
    top = s["sizes"][-1]
    stages = ", ".join(f"{x} px: strength {st}, {int(k * st)} of {k} steps"
                       for x, st, k in zip(s["sizes"], s["strength"], s["upscale_steps"]))
    lines = [
        "# Mini CLEAR at high resolution: the SDEdit cascade", "",
        f"`{metrics['command']}` on {metrics['date']}: {m['cpu_count']} CPU cores ({m['processor']}, "
        f"{m['torch_threads']} torch threads), torch {m['torch']}; wall time {metrics['wall_seconds'] / 60:.1f} min.",
        "",
        f"Teacher `{_shown_path(s['model'])}`; {s['prompts']} held-out prompts, the teacher's {s['base_steps']}-step "
        f"64 px image each, then {stages}; proportional attention {s['proportional']}, NTK factor "
        f"{s['ntk_factor']}, shift {s['shift'] or 'the scheduler’s (dynamic)'}, low-resolution guidance "
        f"{s['lowres_guidance']}; every variant runs the same "
        f"settings from the same 64 px image and seeds. CLEAR backend: `{s['backend']}`.", "",
        "## Bars", "",
    ]
    for b in metrics["bars"].values():
        extra = f" (zero-shot {_fmt(b['zero_shot'], 3)})" if "zero_shot" in b else ""
        lines.append(f"- {'PASS' if b['pass'] else 'FAIL'}: {b['text']}: {_fmt(b['value'], 3)}{extra} "
                     f"(bar {'≥' if b['above'] else '≤'} {b['bar']:g})")
    lines += ["", "## SDEdit upscaling, similarity to the teacher's image at each stage (as the paper's Table 3)", "",
              *table3(metrics), "",
              "MS-SSIM: 5 scales with an 11-pixel window, defined above 160 px a side (n/a below). Kind "
              "accuracy (kind) and placement (place): `clear.mini.scenes.score_parts`, pooled over the named "
              "shapes (images above 64 px are box-downsampled to 64 px to be scored).", "",
              *[line for c in metrics.get("score_controls", {}).values() for line in (controls_text(c), "")],
              "## Time per image and per forward (as the paper's Table 7)", "", *table7(metrics), "",
              "(×): the teacher's seconds per image / this variant's. Peak RSS: the process's resident memory "
              "during the stage.", "",
              "## Where one image's time goes", "", *time_split_table(metrics), "",
              "Text: the text encoders; VAE: diffusers' `AutoencoderKL.encode` (the stage's input) and `decode`, "
              f"tiled (`vae.enable_tiling()`) from {s.get('vae_tiling_latents', '?')} latent cells; denoise: the "
              "rest of the pipeline call (the transformer's forwards, the scheduler).", "",
              "## Seconds per transformer forward (batch 1)", "", *speed_table(metrics), "",
              f"![speed](speed.png)  ![grid](grid_{top}.png)", "",
              "## Step times (seconds)", "", "```", json.dumps(metrics["step_seconds"], indent=1), "```", ""]
    return "\n".join(lines)


def speed_plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppt = metrics["pixels_per_token"]
    s = metrics["settings"]
    styles = {"teacher": ("teacher (full attention, SDPA)", "o-"),
              "clear": (f"CLEAR r={s['radius']} ({s['backend']})", "s-"),
              f"clear_df{s['down_factor']}": (f"CLEAR r={s['radius']} df={s['down_factor']} ({s['backend']})", "^-"),
              "floor": ("no attention (floor)", "k--")}
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    for key, row in metrics["speed"].items():
        label, style = styles[key]
        tokens = [(int(x) // ppt) ** 2 for x in row]
        ax.plot(tokens, list(row.values()), style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image tokens")
    ax.set_ylabel("seconds per transformer forward")
    ax.set_title(f"mini FLUX on this CPU, {metrics['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_all(s, metrics: dict, variants, results: dict, scenes: list) -> None:
    from .scenes import caption

    out = s.dir
    write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=str))
    write_text(out / "report.md", markdown(metrics))
    top = s.sizes[-1]
    rows = [(caption(sc), [results[v.key]["images"][top][f"h{j:04d}"] for v in variants])
            for j, sc in enumerate(scenes)]
    save_image(grid_image(rows, [v.label for v in variants], panel=top), out / f"grid_{top}.png")
    speed_plot(metrics, out / "speed.png")
