"""Patch-parallel CLEAR inference: each rank owns a band of image rows.

Because a CLEAR image query only sees image keys closer than ``radius``, the image can
be cut into horizontal bands, one per rank; per attention layer a rank only needs the
``halo`` rows of keys/values next to its band from each neighbour (plus, for
``down_factor > 1``, every rank's pooled tokens). Everything else in the
transformer (norms, MLPs, modulation) is per token, so each rank runs the stock
diffusers transformer on its own band of image tokens and a replicated copy of the
text tokens. Text queries see every image key; two ways to handle them:

* ``text_mode="exact"``: each rank attends its text queries to its own image keys (rank
  0 also to the text keys) and returns the partial output with its log-sum-exp; the
  partials are merged exactly, so the parallel model equals single-process CLEAR.
* ``text_mode="average"``: the paper's Eq. 7, each rank attends its text queries to the
  text keys and its own image keys, and the outputs are averaged over ranks.

:func:`parallelize` transforms a model that :func:`clear.apply_clear` already made CLEAR
(the way gpt-fast's ``tp.py`` rewrites a plain model): it swaps every processor's
``ClearAttention`` for a :class:`PatchParallelAttention` and adds two forward hooks, one
that cuts each rank's band out of the full inputs, one that gathers the full output::

    device = clear.parallel.init_distributed()      # under torchrun --nproc_per_node N
    clear.apply_clear(pipe.transformer, radius=16)
    clear.parallelize(pipe.transformer, text_mode="exact")
    images = clear.patch_parallel_pipeline_call(pipe, prompt=..., generator=same_seed_on_every_rank)

Every rank calls the model with the same full-size inputs and gets the same full-size
output; inference only. See docs/parallel.md for the design and its communication;
``python scripts/benchmark.py comm`` measures the bytes of one layer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import backends
from .apply import forward_plan, forward_signature, model_family
from .attention import ClearAttention, pool_tokens
from .defaults import VAE_TILING_LATENTS
from .geometry import BandLayout, TokenLayout, Window, grid_from_ids
from .processors import FORWARD_KWARG

__all__ = [
    "TEXT_MODES",
    "Band",
    "BandPlan",
    "PatchParallelAttention",
    "parallelize",
    "unparallelize",
    "patch_parallel_pipeline_call",
    "init_distributed",
    "plan_bands",
    "split_rows",
    "halo_rows",
    "expected_comm_bytes",
]

TEXT_MODES = ("exact", "average")


# ----------------------------------------------------------------------------------------
# Bands and halos: pure geometry, the same on every rank
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """Rows ``[start, start + rows)`` of the token grid."""

    start: int
    rows: int

    @property
    def stop(self) -> int:
        return self.start + self.rows


def halo_rows(window: Window) -> int:
    """Rows of keys a band needs from each neighbour: the largest ``|dy|`` with
    ``dy**2 < radius**2`` (``ceil(radius) - 1`` for a whole radius)."""
    if window.radius is None:
        raise ValueError("patch parallelism needs a local window: apply CLEAR with a radius, not radius=None")
    return math.isqrt(window.radius_sq_bound - 1)


def split_rows(height: int, world_size: int, down_factor: int = 1) -> tuple[Band, ...]:
    """Cut ``height`` rows into ``world_size`` contiguous bands as evenly as possible, in
    whole pooling cells of ``down_factor`` rows (so no cell straddles two bands); the
    first ranks get the extra cells."""
    if height % down_factor:
        raise ValueError(f"the token grid has {height} rows, not divisible by down_factor={down_factor}; choose an "
                         f"image size whose latent grid (pixels / 16 for FLUX) is a multiple of {down_factor}")
    cells = height // down_factor
    if cells < world_size:
        raise ValueError(
            f"the token grid has {height} rows ({cells} rows of {down_factor}x{down_factor} pooling cells), too few "
            f"for {world_size} ranks: use at most {cells} ranks or a taller image"
        )
    base, extra = divmod(cells, world_size)
    bands, start = [], 0
    for r in range(world_size):
        rows = (base + (r < extra)) * down_factor
        bands.append(Band(start, rows))
        start += rows
    return tuple(bands)


def _check_halo(bands: tuple[Band, ...], window: Window, height: int) -> int:
    halo = halo_rows(window)
    thin = [(r, b.rows) for r, b in enumerate(bands) if b.rows < halo]
    if len(bands) > 1 and thin:
        cells, cell_halo = height // window.down_factor, -(-halo // window.down_factor)
        most = max(1, cells // cell_halo)
        rank, rows = thin[0]
        raise ValueError(
            f"band of rank {rank} has {rows} rows but radius {window.radius} needs a halo of {halo} rows from each "
            f"neighbour, so every band must be at least {halo} rows tall (its neighbours' halos must come from it "
            f"alone): use at most {most} ranks for this {height}-row token grid, a taller image, or a smaller radius"
        )
    return halo


@dataclass(frozen=True)
class BandPlan:
    """One forward's split: every rank's band, the grid width, and this rank's place."""

    bands: tuple[Band, ...]
    width: int
    rank: int
    halo: int

    @property
    def height(self) -> int:
        return self.bands[-1].stop

    @property
    def band(self) -> Band:
        return self.bands[self.rank]

    @property
    def above(self) -> int:
        """Halo rows received from the rank above (0 for the first band)."""
        return self.halo if self.rank > 0 else 0

    @property
    def below(self) -> int:
        return self.halo if self.rank < len(self.bands) - 1 else 0


def plan_bands(height: int, width: int, world_size: int, rank: int, window: Window) -> BandPlan:
    """The split of a ``height x width`` token grid over ``world_size`` ranks, checked:
    whole pooling cells per band, and every band at least as tall as the halo."""
    bands = split_rows(height, world_size, window.down_factor)
    return BandPlan(bands, width, rank, _check_halo(bands, window, height))


# ----------------------------------------------------------------------------------------
# The attention of one band
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One message of a rank: ``what`` (``halo``, ``pooled``, ``text``, ``output``), the
    ``op`` (``send``, ``all_gather``, ``all_reduce``) and the bytes this rank hands to it
    (for collectives: its own input; what travels on the wire depends on the algorithm)."""

    what: str
    op: str
    nbytes: int


class PatchParallelAttention:
    """Takes the place of a model's :class:`ClearAttention` in every processor (same call),
    for the band of image rows this rank owns. Holds the process group, the text mode,
    the wrapped single-process core (window, backend, scale, and the plan cache its band plans
    share), the current forward's :class:`BandPlan` (set by the input hook of :func:`parallelize`)
    and, when ``comm_log`` is a list, a :class:`Sent` record of every message. Image and text
    attention run through the backend registry (:mod:`clear.backends`)."""

    def __init__(self, inner: ClearAttention, group=None, text_mode: str = "exact"):
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        halo_rows(inner.window)  # a local window is required
        self.inner = inner
        self.group = group
        self.text_mode = text_mode
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the process group given to parallelize")
        self.plan: BandPlan | None = None
        self.comm_log: list[Sent] | None = None

    def __repr__(self):
        return (f"PatchParallelAttention({self.inner!r}, rank={self.rank}/{self.world_size}, "
                f"text_mode={self.text_mode!r})")

    @property
    def window(self) -> Window:
        return self.inner.window

    # -- communication -----------------------------------------------------------------

    def _log(self, what, op, tensor):
        if self.comm_log is not None:
            self.comm_log.append(Sent(what, op, tensor.numel() * tensor.element_size()))

    def _peer(self, group_rank):
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _exchange_halos(self, k_img, v_img, plan: BandPlan):
        """Send the K/V of this band's first/last ``halo`` rows to the ranks above/below and
        receive theirs: ``(above, below)``, each ``[2 (K, V), B, halo*W, H, D]`` or None."""
        w, halo, n = plan.width, plan.halo, k_img.shape[1]
        ops, recv = [], [None, None]
        for i, (rows, peer) in enumerate(((slice(0, halo * w), plan.rank - 1), (slice(n - halo * w, n), plan.rank + 1))):
            if (plan.above, plan.below)[i] == 0:
                continue
            send = torch.stack([k_img[:, rows], v_img[:, rows]])
            recv[i] = torch.empty_like(send)
            self._log("halo", "send", send)
            ops += [dist.P2POp(dist.isend, send, self._peer(peer), self.group),
                    dist.P2POp(dist.irecv, recv[i], self._peer(peer), self.group)]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return recv[0], recv[1]

    def _all_gather_dim(self, x, counts, what, dim):
        most = max(counts)
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        buf = torch.cat([x, x.new_zeros(pad)], dim).contiguous() if pad[dim] else x.contiguous()
        self._log(what, "all_gather", buf)
        chunks = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(chunks, buf, group=self.group)
        return torch.cat([c.narrow(dim, 0, n) for c, n in zip(chunks, counts)], dim)

    def _gather_pooled(self, k_img, v_img, plan: BandPlan, spatial_weight):
        df = self.window.down_factor
        h, w = plan.band.rows, plan.width
        pooled = torch.stack([pool_tokens(k_img, h, w, spatial_weight), pool_tokens(v_img, h, w, spatial_weight)])
        counts = [(b.rows // df) * (w // df) for b in plan.bands]
        return self._all_gather_dim(pooled, counts, "pooled", 2)  # [2, B, P, H, D]

    def _text_attention(self, q_txt, k_txt, v_txt, k_img, v_img, scale, backend: backends.Backend):
        """Text queries against all text keys and all image keys of all ranks (float32 merge)."""
        opts = self.inner.options(q_txt.device)
        if self.text_mode == "average":
            out, _ = backend.attend(q_txt, torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1), scale,
                                    return_lse=True, options=opts)
            self._log("text", "all_reduce", out)
            dist.all_reduce(out, group=self.group)
            return out / self.world_size
        if self.rank == 0:  # text keys are counted once, on rank 0
            k_img, v_img = torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1)
        out, lse = backend.attend(q_txt, k_img, v_img, scale, return_lse=True, options=opts)
        top = lse.clone()
        self._log("text", "all_reduce", top)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        weight = (lse - top).exp()[..., None]  # [B, T, H, 1]
        acc = torch.cat([out * weight, weight], -1)
        self._log("text", "all_reduce", acc)
        dist.all_reduce(acc, group=self.group)
        return acc[..., :-1] / acc[..., -1:]

    # -- the call (same as ClearAttention's) -------------------------------------------

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                 spatial_weight: torch.Tensor | None = None, plan=None) -> torch.Tensor:
        # ``plan`` (a whole-grid plan) is never handed in: the shard hook plans no whole grid
        plan = self.plan
        if plan is None:
            raise RuntimeError("PatchParallelAttention was called outside a forward of the parallelized model; "
                               "call the transformer itself (clear.parallelize installs the hook that sets the band)")
        if (layout.height, layout.width) != (plan.band.rows, plan.width):
            raise ValueError(f"attention got a {layout.height}x{layout.width} grid but this rank's band is "
                             f"{plan.band.rows}x{plan.width}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise RuntimeError("patch-parallel CLEAR is inference-only: run the model under torch.no_grad() "
                               "or torch.inference_mode()")
        win = self.window
        if (spatial_weight is None) != (win.down_factor == 1):
            raise ValueError("spatial_weight must be given exactly when down_factor > 1")
        full = TokenLayout(layout.text_len, plan.height, plan.width, layout.text_first)
        scale = self.inner.scale(full, query.shape[-1])  # proportional attention counts all tokens

        img, txt = layout.image_slice, layout.text_slice
        q_img, k_img, v_img = query[:, img], key[:, img], value[:, img]
        k_txt, v_txt = key[:, txt], value[:, txt]
        kv_above, kv_below = self._exchange_halos(k_img, v_img, plan)
        kv_pooled = self._gather_pooled(k_img, v_img, plan, spatial_weight) if win.down_factor > 1 else None
        n_pooled = kv_pooled.shape[2] if kv_pooled is not None else 0
        band = BandLayout(layout.text_len, plan.band.rows, plan.width, plan.above, plan.below, n_pooled)
        # keys and values in the band plan's order: [text | rows above | band | rows below | pooled]
        parts = [kv for kv in ((k_txt, v_txt), kv_above, (k_img, v_img), kv_below, kv_pooled) if kv is not None]
        k, v = (torch.cat([p[i] for p in parts], 1) for i in (0, 1))
        band_plan = self.inner.plan(band, query.device, False, query.shape[2], query.shape[3])
        out_img = band_plan.attend(q_img, k, v, scale)
        if layout.text_len == 0:
            return out_img.to(query.dtype)
        out_txt = self._text_attention(query[:, txt], k_txt, v_txt, k_img, v_img, scale,
                                       backends.get(band_plan.backend)).to(query.dtype)
        parts = (out_txt, out_img.to(query.dtype)) if layout.text_first else (out_img.to(query.dtype), out_txt)
        return torch.cat(parts, 1)


# ----------------------------------------------------------------------------------------
# Transforming a model
# ----------------------------------------------------------------------------------------


@dataclass
class ParallelState:
    """What :func:`parallelize` attaches to a model (as ``model.clear_parallel``)."""

    attention: PatchParallelAttention
    processors: list
    hooks: list = field(default_factory=list)


def _shard_hook(module, args, kwargs):
    """Before the forward: cut this rank's band out of the full image inputs."""
    par: ParallelState = module.clear_parallel
    attn = par.attention
    state = getattr(module, "clear_state", None)
    if state is None or state.core is not attn.inner:
        raise RuntimeError("CLEAR was removed or re-applied after clear.parallelize(); call "
                           "clear.unparallelize(transformer) first, then apply_clear, then parallelize again")
    bound = forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    a = dict(bound.arguments)
    a.pop("self")
    if a.get("controlnet_block_samples") is not None or a.get("controlnet_single_block_samples") is not None:
        raise NotImplementedError("patch-parallel CLEAR does not support ControlNet residuals yet")
    img_ids, hidden = a.get("img_ids"), a.get("hidden_states")
    if img_ids is None:
        raise ValueError("patch-parallel CLEAR needs img_ids in the FLUX forward to know the image grid")
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    height, width = grid_from_ids(img_ids)
    if hidden.shape[1] != height * width:
        raise ValueError(f"hidden_states has {hidden.shape[1]} tokens but img_ids describe a {height}x{width} grid; "
                         "every rank must pass the full-size inputs")
    plan = plan_bands(height, width, attn.world_size, attn.rank, attn.window)
    own = slice(plan.band.start * width, plan.band.stop * width)
    a["hidden_states"], a["img_ids"] = hidden[:, own], img_ids[own]
    # the forward's layouts are the band's; its attention plans each band in the call (no whole-grid plan)
    band = forward_plan(module, forward_signature(type(module)).bind_partial(module, **a), plans=False)
    a["joint_attention_kwargs"] = {**(a.get("joint_attention_kwargs") or {}), FORWARD_KWARG: band}
    attn.plan = plan
    return (), a


def _gather_hook(module, args, kwargs, output):
    """After the forward: every rank's band of the output, concatenated, on every rank."""
    attn = module.clear_parallel.attention
    plan = attn.plan
    sample = output[0] if isinstance(output, tuple) else output.sample
    counts = [b.rows * plan.width for b in plan.bands]
    full = attn._all_gather_dim(sample, counts, "output", 1)
    attn.plan = None
    if isinstance(output, tuple):
        return (full, *output[1:])
    output.sample = full
    return output


def parallelize(transformer: torch.nn.Module, group=None, text_mode: str = "exact") -> PatchParallelAttention:
    """Make a CLEAR FLUX transformer patch-parallel over ``group`` (default: the world),
    in place. Call :func:`clear.apply_clear` (and load weights) first, on every rank.

    Afterwards every rank must call the model with the same full-size inputs (same
    latents, prompt embeddings, timestep); each rank computes the band of image rows
    it owns and every rank returns the same full output. ``text_mode``: ``"exact"``
    (equals single-process CLEAR up to float error) or ``"average"`` (the paper's
    Eq. 7). Inference only. Returns the :class:`PatchParallelAttention` shared by all
    layers (its ``comm_log`` records messages when set to a list)."""
    if model_family(transformer) != "flux" or type(transformer).__name__ != "FluxTransformer2DModel":
        raise TypeError(f"patch parallelism supports FluxTransformer2DModel, not {type(transformer).__name__} (model "
                        f"family {model_family(transformer)}): its bands cut FLUX.1's 3-axis img_ids, which other "
                        "families do not have; run this model in one process")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPU) first")
    state = getattr(transformer, "clear_state", None)
    if state is None:
        raise ValueError("CLEAR is not applied to this model: call clear.apply_clear(transformer, radius=...) "
                         "before clear.parallelize")
    if getattr(transformer, "clear_parallel", None) is not None:
        unparallelize(transformer)
    attn = PatchParallelAttention(state.core, group, text_mode)
    procs = [m.processor for m in transformer.modules() if getattr(getattr(m, "processor", None), "core", None)
             is state.core]
    for p in procs:
        p.core = attn
    par = ParallelState(attn, procs)
    par.hooks.append(transformer.register_forward_pre_hook(_shard_hook, with_kwargs=True, prepend=True))
    par.hooks.append(transformer.register_forward_hook(_gather_hook, with_kwargs=True))
    transformer.clear_parallel = par
    return attn


def unparallelize(transformer: torch.nn.Module) -> None:
    """Undo :func:`parallelize`: the model is single-process CLEAR again."""
    par = getattr(transformer, "clear_parallel", None)
    if par is None:
        raise ValueError("this model is not patch-parallel")
    for hook in par.hooks:
        hook.remove()
    for p in par.processors:
        p.core = par.attention.inner
    transformer.clear_parallel = None


def init_distributed(device: str | None = None) -> str:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL with GPU ``LOCAL_RANK`` when CUDA is
    available and ``device`` is not ``"cpu"``, gloo on CPU otherwise. Returns this
    process's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("patch parallelism runs one process per GPU: launch with "
                           "`torchrun --nproc_per_node N ...` (RANK/WORLD_SIZE are not set)")
    cuda = torch.cuda.is_available() and not str(device or "cuda").startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device if cuda else "cpu"


def patch_parallel_pipeline_call(pipe, vae_tiling: bool | None = None, **kwargs):
    """Run a ``FluxPipeline`` whose transformer was :func:`parallelize`-d. Every rank of the
    group must call this with the same arguments (prompt, size, steps, and a generator
    seeded identically). The denoising runs on all ranks, each on its band; only rank 0
    decodes (with VAE tiling when ``vae_tiling`` is True, or None and the latents have at least
    :data:`clear.defaults.VAE_TILING_LATENTS` cells) and returns the pipeline's output; the other
    ranks return ``None``."""
    par = getattr(pipe.transformer, "clear_parallel", None)
    if par is None:
        raise ValueError("the pipeline's transformer is not patch-parallel: call clear.parallelize(pipe.transformer)")
    if par.attention.rank != 0:
        kwargs["output_type"] = "latent"
        pipe(**kwargs)
        return None
    height = kwargs.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kwargs.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    f = pipe.vae_scale_factor
    if vae_tiling or (vae_tiling is None and (height // f) * (width // f) >= VAE_TILING_LATENTS):
        pipe.vae.enable_tiling()
    return pipe(**kwargs)


# ----------------------------------------------------------------------------------------
# The design's communication volume
# ----------------------------------------------------------------------------------------


def expected_comm_bytes(height: int, width: int, world_size: int, rank: int, radius: float, down_factor: int = 1,
                        text_len: int = 512, heads: int = 24, head_dim: int = 128, batch: int = 1,
                        elem_bytes: int = 2, text_mode: str = "exact") -> dict[str, int]:
    """Bytes ``rank`` hands to each kind of message in ONE attention layer (what
    ``PatchParallelAttention.comm_log`` records): ``halo`` = K and V of ``halo`` rows x
    ``width`` sent to each neighbour; ``pooled`` = this rank's (padded) pooled K and V
    given to the all-gather; ``text`` = the text merge's all-reduce buffers (float32).
    Grid sizes in tokens."""
    plan = plan_bands(height, width, world_size, rank, Window(radius, down_factor))
    bands, halo = plan.bands, plan.halo
    c = heads * head_dim
    neighbours = (plan.above > 0) + (plan.below > 0)
    out = {"halo": neighbours * 2 * batch * halo * width * c * elem_bytes}
    if down_factor > 1:
        most = max(b.rows for b in bands) // down_factor * (width // down_factor)
        out["pooled"] = 2 * batch * most * c * elem_bytes
    if text_len:
        merge = batch * text_len * heads * (head_dim if text_mode == "average" else head_dim + 2) * 4
        out["text"] = merge
    return out
