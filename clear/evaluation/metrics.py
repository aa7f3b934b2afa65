"""Evaluation metrics: the networks behind the learned metrics and one job per (model, metric).

Metrics come from torchmetrics (FID, IS, LPIPS, CLIPScore, SSIM, MS-SSIM, PSNR, cosine
similarity) and from transformers models (CLIP, DINO); nothing here re-derives a metric.
Every network is injectable (:class:`FeatureNets`) so the tests use tiny random models.
A metric that cannot run (a package missing, images too small, ...) raises
:class:`Unavailable` with the reason; :mod:`clear.evaluation.protocol` reports it, never
estimates it. :data:`COLUMNS` are the columns of the paper's Table 2.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------
# Networks behind the learned metrics
# ----------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """What to compute and with which models. ``metrics``: a subset of :data:`METRIC_KEYS`."""

    metrics: tuple[str, ...] | None = None  # None = all
    clip_model: str = "openai/clip-vit-large-patch14"
    dino_model: str = "facebook/dino-vits16"
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    lpips_net: str = "alex"
    fid_feature: int = 2048
    is_splits: int = 10
    batch_size: int = 16
    workers: int = 0
    device: str = "auto"
    dim: int = 3072  # FLUX.1 attention width (heads x head_dim), for GFLOPs
    tokens_per_pixel_side: int = 16  # FLUX: VAE x8, then 2x2 patches


@dataclass
class FeatureNets:
    """The networks behind the learned metrics. Anything left None is built on first use:
    torchmetrics' defaults for FID/IS (torch-fidelity's InceptionV3) and LPIPS, the Hub
    models of :class:`EvalConfig` for CLIP, DINO and depth. Built and injected networks are
    kept here, moved to the evaluation device, so one object serves several evaluations.

    * ``fid``: uint8 ``[N, 3, H, W]`` -> features ``[N, F]`` (torchmetrics ``feature=``).
    * ``inception``: uint8 ``[N, 3, H, W]`` -> class logits ``[N, K]`` for the Inception Score.
    * ``lpips``: ``net(img1, img2, normalize=True)`` on float ``[0, 1]`` images -> ``[N, ...]`` distances
      (the signature of torchmetrics' LPIPS network).
    * ``clip``: ``(CLIPModel, CLIPProcessor)``; ``dino``: ``(model, image processor)``, the CLS token of
      ``last_hidden_state`` is the embedding.
    * ``condition``: uint8 ``[N, 3, H, W]`` -> condition maps in ``[0, 1]``, ``[N, 1, H, W]`` (for ControlNet
      RMSE; default: a depth-estimation model).
    """

    fid: nn.Module | None = None
    inception: nn.Module | None = None
    lpips: nn.Module | None = None
    clip: tuple[Any, Any] | None = None
    dino: tuple[Any, Any] | None = None
    condition: Callable[[Tensor], Tensor] | None = None


class Unavailable(Exception):
    """A metric that cannot be computed here; the message says why and what to install."""


_FIDELITY_MISSING = ("needs torch-fidelity and torchvision, not installed here: pip install torch-fidelity torchvision "
                     "(the torchvision build that matches your torch)")


def resolve_net(nets: FeatureNets, name: str, config: EvalConfig, device: torch.device, failures: dict[str, str]):
    """``getattr(nets, name)``, building the default once; raises :class:`Unavailable`."""
    if name in failures:
        raise Unavailable(failures[name])
    net = getattr(nets, name)
    if net is not None:  # injected: put it on the evaluation device
        if isinstance(net, nn.Module):
            net = net.to(device)
        elif isinstance(net, tuple) and isinstance(net[0], nn.Module):
            net = (net[0].to(device), *net[1:])
        if name == "fid":
            net = _with_num_features(net, device)
        setattr(nets, name, net)
        return net
    try:
        net = _DEFAULT_BUILDERS[name](config, device)
    except Unavailable as e:
        failures[name] = str(e)
        raise
    except Exception as e:  # noqa: BLE001 - e.g. no network for the Hub: reported per metric
        failures[name] = f"could not load the {name} network: {type(e).__name__}: {str(e)[:300]}"
        raise Unavailable(failures[name]) from e
    setattr(nets, name, net)
    return net


class _Features(nn.Module):
    """An FID feature network with its ``num_features`` stated, so torchmetrics does not
    probe it with a CPU dummy image (which fails once the network is on a GPU)."""

    def __init__(self, net: nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def _with_num_features(net: nn.Module, device) -> _Features:
    if isinstance(net, _Features):
        return net
    num = getattr(net, "num_features", None)
    if num is None:
        with torch.inference_mode():
            num = net(torch.randint(0, 255, (1, 3, 299, 299), dtype=torch.uint8, device=device)).shape[-1]
    return _Features(net, int(num))


def _build_fid(config: EvalConfig, device):
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: torchmetrics loads after --help

    try:
        return _Features(FrechetInceptionDistance(feature=config.fid_feature).inception, config.fid_feature).to(device)
    except ModuleNotFoundError as e:
        raise Unavailable(f"FID's InceptionV3 {_FIDELITY_MISSING}") from e


def _build_inception(config: EvalConfig, device):
    from torchmetrics.image.inception import InceptionScore  # here: torchmetrics loads after --help

    try:
        with _quiet_is_warning():
            return InceptionScore(feature="logits_unbiased").inception.to(device)
    except ModuleNotFoundError as e:
        raise Unavailable(f"the Inception Score's InceptionV3 {_FIDELITY_MISSING}") from e


def _build_lpips(config: EvalConfig, device):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity  # here: torchmetrics loads after --help

    try:
        return LearnedPerceptualImagePatchSimilarity(net_type=config.lpips_net, normalize=True).net.to(device)
    except ModuleNotFoundError as e:
        raise Unavailable(f"LPIPS ({config.lpips_net}) needs torchvision for its ImageNet backbone, not installed here: "
                           "pip install torchvision (the build that matches your torch)") from e


def _build_clip(config: EvalConfig, device):
    from transformers import CLIPModel, CLIPProcessor  # here: transformers loads after --help (~1.4 s)

    return CLIPModel.from_pretrained(config.clip_model).eval(), CLIPProcessor.from_pretrained(config.clip_model)


def _build_dino(config: EvalConfig, device):
    from transformers import AutoImageProcessor, AutoModel  # here: transformers loads after --help (~1.4 s)

    return AutoModel.from_pretrained(config.dino_model).eval().to(device), AutoImageProcessor.from_pretrained(config.dino_model)


def _build_condition(config: EvalConfig, device):
    # here: transformers loads after --help (~1.4 s)
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(config.depth_model).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(config.depth_model)

    def depth(images: Tensor) -> Tensor:
        """Relative depth, min-max normalised per image to [0, 1], at the images' size."""
        inputs = processor(images=list(images.cpu()), return_tensors="pt")
        pred = model(pixel_values=inputs["pixel_values"].to(device)).predicted_depth[:, None].float()
        pred = torch.nn.functional.interpolate(pred, size=images.shape[-2:], mode="bicubic", align_corners=False)
        lo, hi = pred.amin(dim=(1, 2, 3), keepdim=True), pred.amax(dim=(1, 2, 3), keepdim=True)
        return (pred - lo) / (hi - lo).clamp_min(1e-8)

    return depth


_DEFAULT_BUILDERS = {"fid": _build_fid, "inception": _build_inception, "lpips": _build_lpips,
                     "clip": _build_clip, "dino": _build_dino, "condition": _build_condition}


class _ClipForTorchmetrics(nn.Module):
    """A transformers CLIPModel as torchmetrics' CLIPScore reads it: ``get_*_features``
    returning tensors (transformers >= 5 returns output objects holding the projected
    embedding in ``pooler_output``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


# ----------------------------------------------------------------------------------------
# The metrics, and the columns of the paper's table
# ----------------------------------------------------------------------------------------

# (key, column header, group, higher is better, decimals). Keys are the JSON keys.
COLUMNS = [
    ("fid_original", "FID ↓", "vs. original", False, 2),
    ("lpips_original", "LPIPS ↓", "vs. original", False, 3),
    ("clip_i", "CLIP-I ↑", "vs. original", True, 2),
    ("dino", "DINO ↑", "vs. original", True, 2),
    ("psnr", "PSNR ↑", "vs. original", True, 2),
    ("ssim", "SSIM ↑", "vs. original", True, 3),
    ("ms_ssim", "MS-SSIM ↑", "vs. original", True, 3),
    ("fid_real", "FID (real) ↓", "vs. real", False, 2),
    ("lpips_real", "LPIPS (real) ↓", "vs. real", False, 3),
    ("clip_t", "CLIP-T ↑", "text", True, 2),
    ("inception_score", "IS ↑", "quality", True, 2),
    ("gflops", "GFLOPs ↓", "cost", False, 2),
    ("rmse_condition", "RMSE ↓", "ControlNet", False, 2),
]
METRIC_KEYS = tuple(c[0] for c in COLUMNS)
METRIC_DEFINITIONS = {
    "fid_original": "FID between this model's and the original model's images (torchmetrics, InceptionV3 pool features)",
    "lpips_original": "mean LPIPS to the original model's image of the same prompt and seed (torchmetrics)",
    "clip_i": "mean 100 x cosine similarity of CLIP image embeddings to the original model's image (torchmetrics CLIPScore)",
    "dino": "mean 100 x cosine similarity of DINO CLS embeddings to the original model's image",
    "psnr": "mean per-image PSNR (dB, data range 1) to the original model's image (torchmetrics)",
    "ssim": "mean SSIM (11x11 Gaussian, data range 1) to the original model's image (torchmetrics)",
    "ms_ssim": "mean MS-SSIM (5 scales, data range 1) to the original model's image (torchmetrics)",
    "fid_real": "FID against the real images (resized and center-cropped to the generated size)",
    "lpips_real": "mean LPIPS to the real image of the same caption (resized and center-cropped)",
    "clip_t": "CLIPScore: mean 100 x max(cosine(image, caption), 0) (torchmetrics)",
    "inception_score": "Inception Score (torchmetrics, logits_unbiased), mean over splits; std in inception_score_std",
    "gflops": "attention GFLOPs of one layer at this resolution and variant: clear.attention_flops / 1e9",
    "rmse_condition": "mean per-image RMSE (0-255 scale) between the condition image and the condition re-extracted "
                      "from the generated image",
}


@dataclass
class Job:
    """One metric of one model: ``update(batch)`` per batch of images, ``compute()`` at the end."""

    model: str
    key: str
    update: Callable[[dict], None]
    compute: Callable[[], dict[str, float]]
    failed: str | None = None


def _floats(images: Tensor) -> Tensor:
    return images.float() / 255.0


# Job builders: (model, key, net, ref, device, ...) -> Job; ``ref`` is the role the model's
# images are compared with (another model, "real", "__condition__") or None.


def image_pair_job(model: str, key: str, net, ref: str, device, factory: Callable[[], Any]) -> Job:
    """A torchmetrics image metric ``metric(preds=model's images, target=ref's)`` on [0, 1] floats."""
    metric = factory().to(device)

    def update(batch):
        metric.update(_floats(batch[model]), _floats(batch[ref]))
    return Job(model, key, update, lambda: {key: float(metric.compute())})


def fid_job(model: str, key: str, net, ref: str, device) -> Job:
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: torchmetrics loads after --help

    metric = FrechetInceptionDistance(feature=net).to(device)  # net: a _Features (no dummy forward)

    def update(batch):
        metric.update(batch[ref], real=True)
        metric.update(batch[model], real=False)
    return Job(model, key, update, lambda: {key: float(metric.compute())})


def lpips_job(model: str, key: str, net, ref: str, device) -> Job:
    from torchmetrics import MeanMetric  # here: torchmetrics loads after --help

    mean = MeanMetric().to(device)

    def update(batch):
        mean.update(net(_floats(batch[model]), _floats(batch[ref]), normalize=True).flatten().float())
    return Job(model, key, update, lambda: {key: float(mean.compute())})


def clip_job(model: str, key: str, clip, ref: str | None, device) -> Job:
    from torchmetrics.multimodal.clip_score import CLIPScore  # here: torchmetrics loads after --help

    clip_model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (_ClipForTorchmetrics(clip_model), processor)).to(device)

    def update(batch):
        metric.update(batch[model], batch["__prompts__"] if ref is None else batch[ref])
    return Job(model, key, update, lambda: {key: float(metric.compute())})


def dino_job(model: str, key: str, dino, ref: str, device) -> Job:
    from torchmetrics import CosineSimilarity  # here: torchmetrics loads after --help

    net, processor = dino
    metric = CosineSimilarity(reduction="mean").to(device)

    def embed(images):
        inputs = processor(images=list(images.cpu()), return_tensors="pt")
        return net(pixel_values=inputs["pixel_values"].to(device, next(net.parameters()).dtype)).last_hidden_state[:, 0]

    def update(batch):
        metric.update(embed(batch[model]).float(), embed(batch[ref]).float())
    return Job(model, key, update, lambda: {key: 100.0 * float(metric.compute())})


@contextlib.contextmanager
def _quiet_is_warning():
    """torchmetrics warns that IS keeps every feature in memory: 1008 logits per image is fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        yield


def inception_score_job(model: str, key: str, net, ref, device, splits: int = 10) -> Job:
    from torchmetrics.image.inception import InceptionScore  # here: torchmetrics loads after --help

    with _quiet_is_warning():
        metric = InceptionScore(feature=net, splits=splits).to(device)

    def compute():
        with torch.random.fork_rng(devices=[]):  # IS shuffles before splitting: make it repeatable
            torch.manual_seed(0)
            mean, std = metric.compute()
        return {"inception_score": float(mean), "inception_score_std": float(std)}
    return Job(model, key, lambda batch: metric.update(batch[model]), compute)


def rmse_job(model: str, key: str, extractor, ref: str, device) -> Job:
    # here: torchmetrics loads after --help
    from torchmetrics import MeanMetric
    from torchmetrics.functional import mean_squared_error

    mean = MeanMetric().to(device)

    def update(batch):
        pred = extractor(batch[model]).float().clamp(0, 1)
        cond = _floats(batch[ref]).mean(dim=1, keepdim=True)
        if pred.shape != cond.shape:
            raise ValueError(f"the condition extractor returned {tuple(pred.shape)}, expected {tuple(cond.shape)}")
        per_image = torch.stack([mean_squared_error(p, c, squared=False) for p, c in zip(pred, cond)])
        mean.update(255.0 * per_image)
    return Job(model, key, update, lambda: {key: float(mean.compute())})
