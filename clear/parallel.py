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
``python -m clear.parallel`` measures the bytes of one layer.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .apply import _forward_signature, model_family
from .attention import ClearAttention, _flex, pool_tokens
from .geometry import TileOrder, TokenLayout, Window, band_allowed_mask, band_block_mask, grid_from_ids

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


def _attend_lse(q, k, v, scale, backend, max_logits=2**26):
    """Softmax attention and its log-sum-exp (float32), no mask. ``q [B, Tq, H, D]``,
    ``k/v [B, K, H, D]`` -> ``out [B, Tq, H, D]``, ``lse [B, Tq, H]``. ``"flex"``: one
    FlexAttention call (compiled on CUDA); ``"dense"``: explicit float32, heads in chunks."""
    if backend == "flex":
        out, lse = _flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, scale, return_lse=True)
        return out.transpose(1, 2).float(), lse.transpose(1, 2).float()
    b, tq, heads, d = q.shape
    step = max(1, max_logits // max(1, b * tq * k.shape[1]))
    outs, lses = [], []
    for h in range(0, heads, step):
        qh, kh, vh = (t[:, :, h : h + step].transpose(1, 2).float() for t in (q, k, v))
        logits = (qh @ kh.transpose(-1, -2)) * scale  # [B, h, Tq, K]
        lse = logits.logsumexp(-1)
        outs.append((logits - lse[..., None]).exp() @ vh)
        lses.append(lse)
    return torch.cat(outs, 1).transpose(1, 2), torch.cat(lses, 1).transpose(1, 2)


@dataclass
class _BandAttnPlan:
    mask: torch.Tensor | None = None  # dense: [h*W, T + ext*W + P] bool, None when nothing is masked
    q_to_flex: torch.Tensor | None = None  # flex: band token of each tile-order query position
    q_from_flex: torch.Tensor | None = None  # flex: tile-order position of each band token
    kv_to_flex: torch.Tensor | None = None  # flex: index into [above | band | below | text | pooled] per key
    block_mask: object = None


class PatchParallelAttention:
    """Takes the place of a model's :class:`ClearAttention` in every processor (same call),
    for the band of image rows this rank owns. Holds the process group, the text mode,
    the wrapped single-process core (window, backend, scale), the current forward's
    :class:`BandPlan` (set by the input hook of :func:`parallelize`) and, when
    ``comm_log`` is a list, a :class:`Sent` record of every message."""

    def __init__(self, inner: ClearAttention, group=None, text_mode: str = "exact", cache_size: int = 8):
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
        self.cache_size = cache_size
        self._plans: OrderedDict = OrderedDict()

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

    def _text_attention(self, q_txt, k_txt, v_txt, k_img, v_img, scale, backend):
        """Text queries against all text keys and all image keys of all ranks."""
        if self.text_mode == "average":
            out, _ = _attend_lse(q_txt, torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1), scale, backend)
            self._log("text", "all_reduce", out)
            dist.all_reduce(out, group=self.group)
            return out / self.world_size
        if self.rank == 0:  # text keys are counted once, on rank 0
            k_img, v_img = torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1)
        out, lse = _attend_lse(q_txt, k_img, v_img, scale, backend)
        top = lse.clone()
        self._log("text", "all_reduce", top)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        weight = (lse - top).exp()[..., None]  # [B, T, H, 1]
        acc = torch.cat([out * weight, weight], -1)
        self._log("text", "all_reduce", acc)
        dist.all_reduce(acc, group=self.group)
        return acc[..., :-1] / acc[..., -1:]

    # -- image queries -----------------------------------------------------------------

    def _band_plan(self, text_len, plan: BandPlan, n_pooled, backend, device) -> _BandAttnPlan:
        h, w, above, below = plan.band.rows, plan.width, plan.above, plan.below
        key = (text_len, h, w, above, below, n_pooled, backend, str(device))
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            return cached
        win, ext = Window(self.window.radius), above + h + below
        if backend == "dense":
            if win.covers(ext, w):
                bp = _BandAttnPlan()
            else:
                bp = _BandAttnPlan(mask=band_allowed_mask(h, w, above, ext, win, text_len, n_pooled, device))
        else:
            q_order = TileOrder(TokenLayout(0, h, w), win, *self.inner.tile)
            kv_order = TileOrder(TokenLayout(0, ext, w), win, *self.inner.tile)
            q_to, q_from = q_order.gather_indices(device)
            kv_img, _ = kv_order.gather_indices(device)
            kv_rest = ext * w + torch.arange(text_len + n_pooled, device=device)
            bp = _BandAttnPlan(q_to_flex=q_to, q_from_flex=q_from, kv_to_flex=torch.cat([kv_img, kv_rest]),
                               block_mask=band_block_mask(q_order, kv_order, above, text_len + n_pooled, device))
        self._plans[key] = bp
        while len(self._plans) > self.cache_size:
            self._plans.popitem(last=False)
        return bp

    @staticmethod
    def _image_attention(bp: _BandAttnPlan, q_img, ext: list, rest: list, scale, backend):
        """Band image queries against ``[text | extended band | pooled]`` keys. ``ext``: (K, V)
        of the rows above, the band, the rows below (top to bottom); ``rest``: (K, V) of the
        text and, if any, of the pooled tokens. Each K/V is ``[B, n, H, D]``."""
        if backend == "dense":
            parts = [rest[0], *ext, *rest[1:]]
            k, v = (torch.cat([p[i] for p in parts], 1).transpose(1, 2) for i in (0, 1))
            out = F.scaled_dot_product_attention(q_img.transpose(1, 2), k, v, attn_mask=bp.mask, scale=scale)
            return out.transpose(1, 2)
        # flex: [extended band in tile order | text | pooled], one gather each (see TileOrder.gather_indices)
        parts = [*ext, *rest]
        k, v = (torch.cat([p[i] for p in parts], 1).index_select(1, bp.kv_to_flex) for i in (0, 1))
        q = q_img.index_select(1, bp.q_to_flex)
        out = _flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bp.block_mask, scale)
        return out.transpose(1, 2).index_select(1, bp.q_from_flex)

    # -- the call (same as ClearAttention's) -------------------------------------------

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                 spatial_weight: torch.Tensor | None = None, plan=None) -> torch.Tensor:
        # ``plan`` (a whole-grid plan) is never handed in: apply_clear's hook builds none while parallel
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
        backend = self.inner.resolve_backend(query.device)

        img, txt = layout.image_slice, layout.text_slice
        q_img, k_img, v_img = query[:, img], key[:, img], value[:, img]
        k_txt, v_txt = key[:, txt], value[:, txt]
        kv_above, kv_below = self._exchange_halos(k_img, v_img, plan)
        kv_pooled = self._gather_pooled(k_img, v_img, plan, spatial_weight) if win.down_factor > 1 else None
        n_pooled = kv_pooled.shape[2] if kv_pooled is not None else 0
        bp = self._band_plan(layout.text_len, plan, n_pooled, backend, query.device)
        ext = [kv for kv in (kv_above, (k_img, v_img), kv_below) if kv is not None]
        rest = [(k_txt, v_txt)] + ([kv_pooled] if kv_pooled is not None else [])
        out_img = self._image_attention(bp, q_img, ext, rest, scale, backend)
        if layout.text_len == 0:
            return out_img.to(query.dtype)
        out_txt = self._text_attention(query[:, txt], k_txt, v_txt, k_img, v_img, scale, backend).to(query.dtype)
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
    bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs)
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
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPU) first")
    state = getattr(transformer, "clear_state", None)
    if state is None:
        raise ValueError("CLEAR is not applied to this model: call clear.apply_clear(transformer, radius=...) "
                         "before clear.parallelize")
    if model_family(transformer) != "flux" or type(transformer).__name__ != "FluxTransformer2DModel":
        raise TypeError(f"patch parallelism supports FluxTransformer2DModel, not {type(transformer).__name__}")
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
    decodes (with VAE tiling when ``vae_tiling`` is True, or None and the image is larger
    than 2048x2048) and returns the pipeline's output; the other ranks return ``None``."""
    par = getattr(pipe.transformer, "clear_parallel", None)
    if par is None:
        raise ValueError("the pipeline's transformer is not patch-parallel: call clear.parallelize(pipe.transformer)")
    if par.attention.rank != 0:
        kwargs["output_type"] = "latent"
        pipe(**kwargs)
        return None
    height = kwargs.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kwargs.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    if vae_tiling or (vae_tiling is None and height * width > 2048 * 2048):
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


# ----------------------------------------------------------------------------------------
# Measuring it: python -m clear.parallel (CPU, gloo; one attention call per rank)
# ----------------------------------------------------------------------------------------


def _measure_worker(rank, world, init_file, a, results):
    torch.manual_seed(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    window = Window(a.radius, a.down_factor)
    attn = PatchParallelAttention(ClearAttention(a.radius, a.down_factor, "dense"), None, a.text_mode)
    attn.plan = plan_bands(a.height, a.width, world, rank, window)
    dtype = getattr(torch, a.dtype)
    n = a.text_len + attn.plan.band.rows * a.width
    q, k, v = (torch.randn(1, n, a.heads, a.head_dim, dtype=dtype) for _ in range(3))
    sw = torch.rand(1, 1, 1, a.down_factor, 1, a.down_factor, 1, dtype=dtype) if a.down_factor > 1 else None
    attn.comm_log = []
    with torch.no_grad():
        attn(q, k, v, TokenLayout(a.text_len, attn.plan.band.rows, a.width), sw)
    measured = {}
    for s in attn.comm_log:
        measured[s.what] = measured.get(s.what, 0) + s.nbytes
    results[rank] = measured
    dist.destroy_process_group()


def _measure(argv=None):
    import argparse
    import tempfile

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description="Bytes each rank hands to torch.distributed in one patch-parallel CLEAR "
                                "attention layer (random q/k/v, FLUX.1-dev head dims by default), next to "
                                "expected_comm_bytes. Sizes in tokens (pixels / 16).")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--radius", type=float, default=16)
    p.add_argument("--down_factor", type=int, default=1)
    p.add_argument("--text_mode", default="exact", choices=TEXT_MODES)
    p.add_argument("--text_len", type=int, default=512)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    plan_bands(a.height, a.width, a.ranks, 0, Window(a.radius, a.down_factor))  # fail before spawning
    results = mp.Manager().dict()
    mp.spawn(_measure_worker, args=(a.ranks, tempfile.mktemp(), a, results), nprocs=a.ranks)
    elem = torch.empty(0, dtype=getattr(torch, a.dtype)).element_size()
    print(f"| rank | kind | measured bytes | expected_comm_bytes |  ({a.height}x{a.width} tokens, r={a.radius:g}, "
          f"df={a.down_factor}, {a.ranks} ranks, {a.text_mode}, {a.heads}x{a.head_dim} {a.dtype}, "
          f"{a.text_len} text)")
    print("|---|---|---|---|")
    for rank in range(a.ranks):
        exp = expected_comm_bytes(a.height, a.width, a.ranks, rank, a.radius, a.down_factor, a.text_len, a.heads,
                                  a.head_dim, 1, elem, a.text_mode)
        for kind in sorted(set(exp) | set(results[rank])):
            print(f"| {rank} | {kind} | {results[rank].get(kind, 0)} | {exp.get(kind, 0)} |")


if __name__ == "__main__":
    _measure()
