"""Video generation with CLEAR on Wan pipelines: text-to-video (``WanPipeline``), image-to-video
(``WanImageToVideoPipeline``), and Wan 2.2 A14B's two experts (``transformer`` for high noise,
``transformer_2`` for low noise), each with its own CLEAR weights.

* :class:`VideoClear`: the window (``radius``, ``temporal_radius`` in latent frames, ``down_factor``), the
  checkpoints (one per transformer of the pipeline, in the order ``transformer``, ``transformer_2``) and the
  backend; checked before anything loads (:func:`check_video_checkpoints`).
* :func:`load_video_pipeline` (the class its ``model_index.json`` names), :func:`apply_to_video_pipeline`,
  :func:`check_video_size`, :func:`generate_video` (frames ``[T, H, W, 3]`` in ``[0, 1]``, NaN / inf refused),
  :func:`save_video`: MP4 where diffusers' ``export_to_video`` has an encoder (``imageio`` with
  ``imageio-ffmpeg``), else GIF, or one PNG per frame; the settings go into a JSON file beside the clip
  (``<out>.json``) and, for PNG frames, into each frame's text chunks.

Patch parallelism is not built for video (:func:`clear.parallel` splits one image's rows; a video would need
bands of frames or rows with K/V halos in time as well): :func:`refuse_patch_parallel` says so.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..apply import apply_clear
from ..families import get_family
from ..files import save_image, write_json
from ..geometry import Window
from ..weights import load_clear_weights, read_header, STRICT_RADIUS_OFF
from .checks import check_checkpoint, check_model, pipeline_family
from .outputs import png_metadata
from .pipeline import NonFiniteImageError

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
EXPERTS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class VideoClear:
    """What CLEAR to put on a video pipeline: the 3-D window, one checkpoint per transformer (``None``: untrained
    CLEAR on every one), the backend; ``strict_radius=False`` loads checkpoints that say another window."""

    radius: float
    temporal_radius: float | None = None
    down_factor: int = 1
    checkpoints: tuple[str, ...] | None = None
    backend: str = "auto"
    strict_radius: bool = True

    def __post_init__(self):
        Window(self.radius, self.down_factor, self.temporal_radius)  # fails before anything loads

    @property
    def label(self) -> str:
        rt = "all frames" if self.temporal_radius is None else f"rt={self.temporal_radius:g}"
        return f"CLEAR r={self.radius:g} {rt}" + (f" df={self.down_factor}" if self.down_factor > 1 else "")

    def settings(self) -> dict:
        return dict(radius=self.radius, temporal_radius=self.temporal_radius, down_factor=self.down_factor,
                    backend=self.backend, checkpoints=list(self.checkpoints or ()) or "none")


def experts(pipe_or_index) -> list[str]:
    """The transformers of a Wan pipeline, or of its ``model_index.json`` dict: ``["transformer"]``, or
    ``["transformer", "transformer_2"]`` for Wan 2.2 A14B."""
    if isinstance(pipe_or_index, dict):
        return [n for n in EXPERTS if (pipe_or_index.get(n) or [None, None])[1] is not None]
    return [n for n in EXPERTS if getattr(pipe_or_index, n, None) is not None]


def check_video_checkpoints(clear: VideoClear, names: list[str]) -> None:
    """One checkpoint per transformer (``names``), each a Wan CLEAR file of this window (header only)."""
    if not clear.checkpoints:
        return
    if len(clear.checkpoints) != len(names):
        raise ValueError(f"this pipeline has {len(names)} transformer(s) ({', '.join(names)}) but "
                         f"{len(clear.checkpoints)} CLEAR checkpoint(s) were given: pass one per transformer, in that "
                         "order (Wan 2.2 A14B: --checkpoint HIGH_NOISE.safetensors,LOW_NOISE.safetensors), or none")
    for path in clear.checkpoints:
        check_checkpoint(path, clear.radius, clear.down_factor, "wan", clear.strict_radius)
        if not clear.strict_radius:
            continue
        metadata, _ = read_header(path)
        written = metadata.get("clear.temporal_radius")
        file_rt = None if written in (None, "None") else float(written)
        if written is None or file_rt != clear.temporal_radius:
            said = "does not say its temporal radius" if written is None else f"is for temporal_radius={written}"
            raise ValueError(f"{path} {said}, but the chosen window has temporal_radius={clear.temporal_radius}; pass "
                             f"the matching --temporal_radius or a checkpoint trained for it (or {STRICT_RADIUS_OFF})")


def check_video_size(model_or_pipe, num_frames: int, height: int, width: int, down_factor: int = 1) -> tuple:
    """The latent token grid ``(frames, rows, cols)`` of a clip, after checking that the pipeline takes it:
    ``num_frames = 4k + 1`` (the VAE's temporal factor), sides multiples of VAE factor x patch, the grid divisible
    by ``down_factor``. Reads configs only."""
    from diffusers import AutoencoderKLWan

    family = get_family("wan")
    if hasattr(model_or_pipe, "vae"):
        vae, config = model_or_pipe.vae.config, model_or_pipe.transformer.config
    else:
        vae = AutoencoderKLWan.load_config(model_or_pipe, subfolder="vae")
        config = family.transformer_config(model_or_pipe)
    temporal, spatial = int(vae.get("scale_factor_temporal") or 4), int(vae.get("scale_factor_spatial") or 8)
    pt, ph, pw = config["patch_size"] if isinstance(config, dict) else config.patch_size
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"--num_frames {num_frames}: Wan's VAE takes 4k + 1 frames ({temporal}k + 1), e.g. 81")
    for name, side, patch in (("height", height, ph), ("width", width, pw)):
        if side % (spatial * patch):
            raise ValueError(f"--{name} {side} is not a multiple of {spatial * patch} pixels (VAE factor {spatial} x "
                             f"patch {patch}), which this Wan model needs")
    grid = ((num_frames - 1) // temporal + 1) // pt, height // (spatial * ph), width // (spatial * pw)
    if down_factor > 1 and (grid[1] % down_factor or grid[2] % down_factor):
        raise ValueError(f"{height}x{width} pixels is a {grid[1]}x{grid[2]} token grid per frame, not divisible by "
                         f"down_factor={down_factor}; choose sizes whose grid is")
    return grid


def load_video_pipeline(model: str, device: str, dtype=None):
    """The pipeline class ``model_index.json`` names (``WanPipeline`` or ``WanImageToVideoPipeline``), on
    ``device`` in ``dtype``."""
    import diffusers

    from ..devices import resolve_device, resolve_dtype

    index = check_model(model)
    name = index["_class_name"]
    family = pipeline_family(model)
    if not family.video or name not in family.pipelines:
        raise ValueError(f"{model} is a {name}, not a Wan video pipeline ({', '.join(get_family('wan').pipelines)})")
    device = str(resolve_device(device))
    return getattr(diffusers, name).from_pretrained(model, dtype=resolve_dtype(dtype, device)).to(device)


def apply_to_video_pipeline(pipe, clear: VideoClear) -> list:
    """:func:`clear.apply_clear` on every transformer of the pipeline, each loading its own checkpoint (checked
    first). Returns the :class:`clear.ClearAttention` of each."""
    names = experts(pipe)
    check_video_checkpoints(clear, names)
    cores = []
    for i, name in enumerate(names):
        model = getattr(pipe, name)
        cores.append(apply_clear(model, clear.radius, clear.down_factor, backend=clear.backend,
                                 temporal_radius=clear.temporal_radius))
        if clear.checkpoints:
            load_clear_weights(model, clear.checkpoints[i], strict_radius=clear.strict_radius)
    return cores


@dataclass
class VideoResult:
    """One generated clip: ``frames`` ``[T, H, W, 3]`` float in ``[0, 1]``, the seconds of the pipeline call, the
    settings that made it."""

    frames: np.ndarray
    seconds: float
    settings: dict = field(default_factory=dict)


def generate_video(pipe, prompt: str, num_frames: int, height: int, width: int, steps: int, guidance: float,
                   seed: int = 0, image=None, max_sequence_length: int = 512, **pipe_kwargs) -> VideoResult:
    """Text-to-video (image-to-video with ``image``, a PIL image, on a ``WanImageToVideoPipeline``) with the
    pipeline as it is (original or CLEAR); seeded on the CPU. NaN or inf in the clip raise
    :class:`clear.inference.NonFiniteImageError`."""
    if (image is not None) != ("ImageToVideo" in type(pipe).__name__):
        raise ValueError(f"a {type(pipe).__name__} " + ("takes no --image" if image is not None else
                                                          "needs --image (the first frame)"))
    kwargs = dict(prompt=prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, max_sequence_length=max_sequence_length, output_type="np", **pipe_kwargs)
    if image is not None:
        kwargs["image"] = image
    start = time.perf_counter()
    frames = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).frames[0]
    seconds = time.perf_counter() - start
    frames = np.asarray(frames)
    if not np.isfinite(frames).all():
        raise NonFiniteImageError(f"the decoded clip holds {int((~np.isfinite(frames)).sum())} NaN/inf values: no "
                                  "clip is returned (diverged CLEAR weights, or float16 overflow: try bfloat16)")
    state = getattr(pipe.transformer, "clear_state", None)
    attention = "original" if state is None else VideoClear(state.radius, state.temporal_radius,
                                                            state.down_factor).label
    return VideoResult(frames, seconds, dict(prompt=prompt, num_frames=num_frames, height=height, width=width,
                                             steps=steps, guidance=guidance, seed=seed, attention=attention,
                                             seconds=round(seconds, 3), image_to_video=image is not None))


def mp4_encoder() -> bool:
    """Whether diffusers' ``export_to_video`` can write MP4 here (``imageio`` with ``imageio-ffmpeg``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg"))


def check_video_output(path: str | os.PathLike) -> Path:
    """``--out`` of a clip: ``.mp4`` (refused where no encoder is installed, naming the fix), ``.gif`` or ``.png``
    (one PNG per frame, ``<stem>_0000.png`` ...)."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out {path}: a clip is written as .mp4, .gif or .png frames; choose one of those")
    if path.suffix.lower() == ".mp4" and not mp4_encoder():
        raise ValueError(f"--out {path}: no MP4 encoder is installed (pip install imageio imageio-ffmpeg); or write "
                         f"{path.with_suffix('.gif')} or PNG frames ({path.with_suffix('.png')})")
    return path


def save_video(frames: np.ndarray, path: str | os.PathLike, settings: dict, fps: int = 16) -> list[str]:
    """Write a clip (``[T, H, W, 3]`` in ``[0, 1]``) by the suffix of ``path`` (:func:`check_video_output`) and its
    settings as ``<path>.json``; returns the written files."""
    from PIL import Image

    path = check_video_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        from diffusers.utils import export_to_video

        written = [export_to_video(list(frames), str(path), fps=fps)]
    elif suffix == ".gif":
        save_image(images[0], path, "GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        written = [str(path)]
    else:
        written = [str(save_image(im, path.with_name(f"{path.stem}_{i:04d}.png"), "PNG",
                                  pnginfo=png_metadata({**settings, "frame": i})))
                   for i, im in enumerate(images)]
    written.append(str(write_json(str(path) + ".json", {**settings, "fps": fps, "files": written}, indent=1,
                                  default=str)))
    return written


def refuse_patch_parallel(family_name: str) -> None:
    """Patch parallelism for video is not built: say why and what to do instead."""
    raise NotImplementedError(
        f"--parallel patch is not built for {family_name} video models: clear.parallel splits the rows of one image "
        "with K/V halos in space; a clip would need bands of frames (halos of temporal_radius frames) or of rows in "
        "every frame, and neither is implemented or tested. Generate on one GPU (CLEAR's window already makes "
        "attention linear in the number of frames)")
