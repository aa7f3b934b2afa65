"""The mini recipe's outputs: ``metrics.json``, ``report.md``, ``grid_<size>.png`` and ``loss.png``.

:func:`collect` puts every measurement into one JSON-ready dict (one table per size: the training
size, 2x direct, 2x by SDEdit; one row per variant) and checks the issue's bars; :func:`write_all`
writes the files atomically; :func:`markdown` is the report, :func:`summary` what the command prints.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path

from clear.evaluation import json_safe
from clear.files import atomic_path, save_image, write_text

from .scenes import CONTROLS, KIND_IOU, controls_text

COLUMNS = [  # (row key, header, decimals)
    ("velocity_mse", "velocity MSE ↓", 4),
    ("velocity_vs_zero_shot", "÷ zero-shot ↓", 2),
    ("image_mse", "image MSE ↓", 4),
    ("psnr", "PSNR ↑", 2),
    ("ssim", "SSIM ↑", 3),
    ("ms_ssim", "MS-SSIM ↑", 3),
    ("kind_accuracy", "kind accuracy ↑", 3),
    ("placement", "placement ↑", 3),
    ("attention_mflops", "attn. MFLOPs/layer", 2),
    ("seconds_per_image", "s/image", 2),
]



def _shown_path(path) -> str:
    """A path as a reader of the report can use it: relative to the current folder when inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

def _tables(s, variants, velocity, evaluations, following, mse, seconds, pixels_per_token) -> dict:
    sizes = {}
    for size_key, prompts in ((str(s.size), s.eval_prompts), (str(s.large), s.eval_prompts_large),
                              (f"{s.large}_sdedit", s.eval_prompts_large)):
        pixels = int(size_key.split("_")[0])
        ev = evaluations[size_key]
        vel = velocity.get(size_key, {})
        zero = vel.get("zero_shot", {}).get("mse")
        rows = {}
        for v in variants:
            m = ev["models"][v.label]
            row = {"label": v.label, "radius": v.radius, "down_factor": v.down_factor, "trained": v.trained,
                   "velocity_mse": vel.get(v.key, {}).get("mse") if v.radius else None,
                   "velocity_relative": vel.get(v.key, {}).get("relative") if v.radius else None,
                   "velocity_per_sigma": vel.get(v.key, {}).get("per_sigma") if v.radius else None,
                   "image_mse": mse.get((size_key, v.key), {}).get("mse"),
                   "psnr": m["metrics"]["psnr"], "ssim": m["metrics"]["ssim"], "ms_ssim": m["metrics"]["ms_ssim"],
                   "kind_accuracy": following[(size_key, v.key)]["kind_accuracy"],
                   "placement": following[(size_key, v.key)]["placement"],
                   "background": following[(size_key, v.key)]["background"],
                   "attention_mflops": None if m["metrics"]["gflops"] is None else m["metrics"]["gflops"] * 1e3,
                   "seconds_per_image": seconds.get((size_key, v.key), {}).get("seconds"),
                   "backend": seconds.get((size_key, v.key), {}).get("backend"),
                   "notes": {k: n for k, n in m["notes"].items() if not n.startswith(("not applicable", "not requested"))}}
            row["velocity_vs_zero_shot"] = (row["velocity_mse"] / zero if zero and row["velocity_mse"] is not None
                                            else None)
            rows[v.key] = row
        sizes[size_key] = {"pixels": pixels, "tokens": [pixels // pixels_per_token] * 2,
                           "path": "SDEdit from the teacher's training-size image" if "sdedit" in size_key else "direct",
                           "prompts": prompts, "rows": rows}
    return sizes


VELOCITY_BAR = 0.2  # distilled / zero-shot held-out velocity error at the training size
PSNR_GAIN_BAR = 8.0  # dB of same-seed PSNR to the teacher gained over zero-shot at the training size
KIND_GAP_BAR = 0.05  # the distilled student's kind accuracy at most this far below the teacher's


def _bars(s, sizes: dict, controls: dict) -> dict:
    rows = sizes[str(s.size)]["rows"]
    d, z, t = rows["distilled"], rows["zero_shot"], rows["teacher"]
    ratio = d["velocity_vs_zero_shot"]
    kind_gap = (t["kind_accuracy"] - d["kind_accuracy"] if None not in (t["kind_accuracy"], d["kind_accuracy"])
                else None)
    gain = d["psnr"] - z["psnr"] if d["psnr"] is not None and z["psnr"] is not None else None
    c = controls[str(s.size)]
    return {
        "velocity": {"ratio": ratio, "bar": VELOCITY_BAR, "pass": ratio is not None and ratio <= VELOCITY_BAR,
                     "text": f"held-out velocity error of CLEAR distilled <= {VELOCITY_BAR:g}x CLEAR zero-shot's at the "
                             "training size"},
        "psnr": {"distilled": d["psnr"], "zero_shot": z["psnr"], "gain": gain, "bar": PSNR_GAIN_BAR,
                 "pass": gain is not None and gain >= PSNR_GAIN_BAR,
                 "text": f"distilled images closer to the teacher's than zero-shot's by >= {PSNR_GAIN_BAR:g} dB (PSNR)"},
        "ssim": {"distilled": d["ssim"], "zero_shot": z["ssim"], "pass": d["ssim"] > z["ssim"],
                 "text": "distilled images closer to the teacher's than zero-shot's (SSIM)"},
        "kind_accuracy": {"distilled": d["kind_accuracy"], "teacher": t["kind_accuracy"],
                          "zero_shot": z["kind_accuracy"], "chance": c["chance"]["kind_accuracy"], "gap": kind_gap,
                          "bar": KIND_GAP_BAR, "pass": kind_gap is not None and kind_gap <= KIND_GAP_BAR,
                          "text": f"kind accuracy of CLEAR distilled within {KIND_GAP_BAR:g} of the teacher's"},
        "controls": {"failed": [name for name in CONTROLS if not c[name]["pass"]],
                     "pass": all(c[name]["pass"] for name in CONTROLS),
                     "text": f"every control of the score holds its bar at {s.size} px ({c['n']} held-out scenes)"},
    }


def collect(s, variants, *, counts, velocity, evaluations, following, mse, seconds, controls, backend_times, commands,
            step_seconds, teacher, pixels_per_token, machine, wall_seconds) -> dict:
    sizes = _tables(s, variants, velocity, evaluations, following, mse, seconds, pixels_per_token)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/mini.py" + (" --quick" if s.quick else ""),
        "machine": machine,
        "wall_seconds": round(wall_seconds, 1),
        "step_seconds": step_seconds,
        "settings": s.as_dict(),
        "data": counts,
        "teacher": {"model": _shown_path(s.model), "parameters": sum(p.numel() for p in teacher.parameters()),
                    "transformer_sha256": _sha256(Path(s.model, "transformer", "diffusion_pytorch_model.safetensors")),
                    "attention_dim": teacher.config.num_attention_heads * teacher.config.attention_head_dim},
        "variants": {v.key: v.label for v in variants},
        "sizes": sizes,
        "chance_kind_accuracy": {size: c["chance"]["kind_accuracy"] for size, c in controls.items()},
        "score_controls": controls,
        "bars": _bars(s, sizes, controls),
        "backend_seconds_per_forward": backend_times,
        "velocity_error_definition": (
            "mean over held-out (prompt, sigma) pairs of the MSE between the student's and the teacher's transformer "
            f"output; x0 = the teacher's held-out image (VAE posterior sample), fresh noise, sigma = (j + 0.5) / "
            f"{s.sigmas} for j < {s.sigmas}; 2x uses the teacher's direct 2x images"),
        "commands": commands,
    }


def _sha256(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _fmt(value, decimals: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{decimals}f}"


def _table(table: dict) -> list[str]:
    lines = ["| variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in table["rows"].values():
        cells = []
        for key, _, dec in COLUMNS:
            cell = _fmt(row.get(key), dec)
            if key == "seconds_per_image" and row.get("seconds_per_image") is not None:
                cell += f" ({row['backend']})"
            if key == "ms_ssim" and row.get("ms_ssim") is None and "ms_ssim" in row["notes"]:
                cell = "n/a"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def markdown(metrics: dict) -> str:
    s, bars = metrics["settings"], metrics["bars"]
    m = metrics["machine"]
    lines = [
        "# Mini CLEAR: the paper's recipe on a small FLUX, on CPU", "",
        f"`{metrics['command']}` on {metrics['date']}: {m['cpu_count']} CPU cores ({m['processor']}, "
        f"{m['torch_threads']} torch threads), torch {m['torch']}; wall time {metrics['wall_seconds'] / 60:.1f} min "
        f"(load average at the end: {', '.join(f'{x:.1f}' for x in m['load_average_at_end'] or [])}).", "",
        f"Teacher: `{metrics['teacher']['model']}` ({metrics['teacher']['parameters'] / 1e6:.2f}M-parameter "
        f"`FluxTransformer2DModel`, weights sha256 {(metrics['teacher']['transformer_sha256'] or '?')[:12]}), {s['size']} px = {metrics['sizes'][str(s['size'])]['tokens'][0]}² tokens. "
        f"Distillation data: {metrics['data']['train']} images the teacher generated from training captions "
        f"({metrics['data']['distinct_train_captions']} distinct; {metrics['data']['train_captions_left_out']} "
        f"draws equal to a held-out caption left out). Students: CLEAR r = {s['radius']} (and df = "
        f"{s['down_factor']}), {s['distill_steps']} (df: {s['distill_steps_df']}) steps of batch "
        f"{s['distill_batch']}, AdamW lr {s['learning_rate']:g}, cosine schedule, loss L_fm + "
        f"{s['distill_loss_weight']:g}·L_distill + {s['attn_loss_weight']:g}·L_attn. Held-out prompts and seeds "
        f"(never in the distillation data): {s['eval_prompts']} at {s['size']} px, {s['eval_prompts_large']} at "
        f"2x; {s['steps']} sampling steps.", "",
        "## Bars", "",
    ]
    b = bars
    lines += [
        f"- {'PASS' if b['velocity']['pass'] else 'FAIL'}: {b['velocity']['text']}: "
        f"{_fmt(b['velocity']['ratio'], 3)} (bar ≤ {b['velocity']['bar']:g})",
        f"- {'PASS' if b['psnr']['pass'] else 'FAIL'}: {b['psnr']['text']}: {_fmt(b['psnr']['distilled'], 2)} dB vs "
        f"{_fmt(b['psnr']['zero_shot'], 2)} dB (+{_fmt(b['psnr']['gain'], 2)} dB)",
        f"- {'PASS' if b['ssim']['pass'] else 'FAIL'}: {b['ssim']['text']}: {_fmt(b['ssim']['distilled'], 3)} vs "
        f"{_fmt(b['ssim']['zero_shot'], 3)}",
        f"- {'PASS' if b['kind_accuracy']['pass'] else 'FAIL'}: {b['kind_accuracy']['text']}: "
        f"{_fmt(b['kind_accuracy']['distilled'], 3)} vs {_fmt(b['kind_accuracy']['teacher'], 3)} "
        f"(gap {_fmt(b['kind_accuracy']['gap'], 3)}; zero-shot {_fmt(b['kind_accuracy']['zero_shot'], 3)}, "
        f"chance {_fmt(b['kind_accuracy']['chance'], 3)})",
        f"- {'PASS' if b['controls']['pass'] else 'FAIL'}: {b['controls']['text']}"
        + (f" (failed: {', '.join(b['controls']['failed'])})" if b['controls']['failed'] else ""), "",
    ]
    for size_key, table in metrics["sizes"].items():
        tok = table["tokens"]
        lines += [f"## {table['pixels']} px ({tok[0]}×{tok[1]} tokens), {table['path']}, {table['prompts']} held-out "
                  "prompts", ""]
        lines += _table(table)
        c = metrics["score_controls"].get(str(table["pixels"]))
        if c:
            lines += ["", controls_text(c), ""]
        if "sdedit" in size_key:
            lines += ["Velocity error is a property of the function at a size, not of the sampling path: see the "
                      "direct table. Each variant upscales the teacher's training-size image (strength "
                      f"{s['sdedit_strength']}, the model's own scheduler shift and RoPE).", ""]
    notes = [f"- {table['pixels']} px {row['label']}, {k}: {n}" for table in metrics["sizes"].values()
             for row in table["rows"].values() for k, n in row["notes"].items()]
    lines += ["## Columns", "",
              f"- velocity MSE: {metrics['velocity_error_definition']}.",
              "- image MSE (pixels in [0, 1]), PSNR, SSIM, MS-SSIM: against the teacher's image for the same prompt "
              "and seed (`scripts/evaluate.py`, torchmetrics).",
              "- kind accuracy, placement: `clear.mini.scenes.score_parts`, pooled over the named shapes of the "
              "held-out images: the pixels of the named colour near the place the caption names are fitted by a "
              "circle, a square and a triangle (small shift and scale search); kind accuracy: the named kind fits "
              f"best and fits well (IoU ≥ {KIND_IOU:g}); placement: the IoU of the best outline of any kind. The "
              "background is not part of either.",
              "- attn. MFLOPs/layer: `clear.attention_flops` of one attention layer at that size "
              "(text tokens included).",
              "- s/image: one image's pipeline call on this CPU, after an untimed warm-up, with the fastest CLEAR "
              "backend measured here (per-forward times below); the teacher uses diffusers' SDPA.", ""]
    if notes:
        lines += ["Unavailable (`n/a`):", *notes, ""]
    lines += ["## Backend choice (seconds per transformer forward, batch 1)", "", "```",
              json.dumps(metrics["backend_seconds_per_forward"], indent=1), "```", "",
              "## Step times (seconds)", "", "```", json.dumps(metrics["step_seconds"], indent=1), "```", "",
              "## Commands run", "", "```", *metrics["commands"], "```", ""]
    return "\n".join(lines)


def summary(metrics: dict) -> str:
    """What ``python scripts/mini.py`` prints at the end: the tables and the bars."""
    out = []
    for table in metrics["sizes"].values():
        out += [f"\n{table['pixels']} px, {table['path']}:"] + _table(table)
    out.append("")
    for b in metrics["bars"].values():
        out.append(f"{'PASS' if b['pass'] else 'FAIL'}: {b['text']}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------

def grid_image(rows: list[tuple[str, list]], labels: list[str], panel: int = 192):
    """One block per prompt: the prompt, then its images side by side under ``labels``
    (``clear.inference.image_grid``), each scaled up (nearest) to about ``panel`` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    import clear.inference as inf

    blocks = []
    for prompt, images in rows:
        factor = max(1, round(panel / images[0].width))
        scaled = [im.resize((im.width * factor, im.height * factor), Image.NEAREST) for im in images]
        block = inf.image_grid(scaled, labels, columns=len(scaled))
        try:
            font = ImageFont.load_default(size=13)
        except TypeError:
            font = ImageFont.load_default()
        title = Image.new("RGB", (block.width, 20), "white")
        ImageDraw.Draw(title).text((6, 3), prompt, fill="black", font=font)
        blocks += [title, block]
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    return out


def loss_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars ``scripts/distill.py`` logged to TensorBoard under ``run_dir/logs``: ``{tag: [(step, value)]}``
    (on resumed runs, the last value logged for each step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not one INFO line per event file
    out: dict[str, dict[int, float]] = {}
    for events in sorted({p.parent for p in Path(run_dir, "logs").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    if not out:
        raise FileNotFoundError(f"no TensorBoard logs under {run_dir}/logs: the distillation wrote none")
    return {tag: sorted(v.items()) for tag, v in out.items()}


def loss_plot(runs: dict[str, dict], path: Path) -> None:
    """``loss.png``: L_distill (solid) and the total loss (dashed) per distillation run, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (label, hist) in enumerate(runs.items()):
        color = f"C{i}"
        for tag, style, name in (("loss_distill", "-", "L_distill"), ("loss", "--", "total")):
            if tag in hist:
                steps, values = zip(*hist[tag])
                ax.plot(steps, values, style, color=color, label=f"{label}: {name}", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (training batches)")
    ax.set_title("scripts/distill.py on the mini teacher (TensorBoard logs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_all(s, metrics: dict, folders: dict) -> None:
    """metrics.json, report.md, grid_<size>.png (teacher | zero-shot | distilled per prompt), loss.png."""
    from PIL import Image

    out = Path(s.out)
    for size_key, table in metrics["sizes"].items():
        keys = ["teacher", "zero_shot", "distilled"]
        prompts = [json.loads(line) for line in (s.work / "prompts" / (
            "eval.jsonl" if size_key == str(s.size) else "eval_large.jsonl")).read_text().splitlines() if line]
        rows = []
        for p in prompts[: s.grid_prompts]:
            images = []
            for k in keys:
                with Image.open(folders[(size_key, k)] / f"{p['key']}.png") as im:
                    images.append(im.convert("RGB"))
            rows.append((p["prompt"], images))
        grid = grid_image(rows, [table["rows"][k]["label"] for k in keys])
        save_image(grid, out / f"grid_{size_key}.png")
    runs = {metrics["variants"][k]: loss_history(s.work / "distill" / k) for k in metrics["variants"]
            if (s.work / "distill" / k).is_dir()}
    for label, hist in runs.items():
        metrics.setdefault("loss_history", {})[label] = {tag: [v for _, v in h] for tag, h in hist.items()
                                                         if tag in ("loss", "loss_distill")}
    loss_plot(runs, out / "loss.png")
    write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=1, default=str, allow_nan=False) + "\n")
    write_text(out / "report.md", markdown(metrics))
