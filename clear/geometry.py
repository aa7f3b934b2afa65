"""Window geometry: the one place that says which key each query sees.

CLEAR's attention pattern, for a token layout of ``text_len`` text tokens and an
``height x width`` grid of image tokens (plus, with ``down_factor > 1``, the
``(height/df) * (width/df)`` pooled tokens appended after everything else as keys):

* a text query sees every text key and every image key (never the pooled keys);
* an image query sees every text key, every pooled key, and the image keys at grid
  offset (dy, dx) with ``dy**2 + dx**2 < radius**2`` (strict).

Video (:class:`TokenLayout` with ``frames > 1``): the image tokens are a ``frames x height x width``
grid in frame-major, then row-major order (Wan's patch order), and an image query at (t, y, x) sees
the image key at (t', y', x') iff ``((t-t')/rt)**2 + ((y-y')/r)**2 + ((x-x')/r)**2 < 1`` (strict),
``rt`` = ``Window.temporal_radius``; ``rt=None`` means every frame, where each pair of frames gets the
2-D circle ``dy**2 + dx**2 < r**2``. Exactly: the key is seen iff ``dy**2 + dx**2 < bound(|dt|)`` with the
integer bounds of :meth:`Window.frame_bounds` (0: no key of that frame offset), the one table every
backend reads. Pooled tokens of a video are pooled per frame (``df x df`` cells of each frame,
``frames * (height/df) * (width/df)`` of them, frame-major), and every image query sees all of them:
the image design's global coarse context, one frame at a time.

Everything that depends on that rule lives here: the token layouts of a whole grid and of a
patch-parallel band, the dense boolean masks (the oracle used by the ``dense`` backend and by
every test), and the exact count of allowed (query, key) pairs and the FLOPs it implies. How a
fast backend lays tokens out for its kernel (FlexAttention's tiles and block masks, the tiled
backend's windows) lives with that backend in :mod:`clear.backends`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

__all__ = [
    "Window",
    "TokenLayout",
    "video_flops",
    "BandLayout",
    "grid_from_ids",
    "allowed_mask",
    "band_allowed_mask",
    "count_allowed_pairs",
    "attention_flops",
]

@dataclass(frozen=True)
class Window:
    """The attention window: ``radius`` in grid tokens (``None`` = full attention), the pooling
    factor of the optional down-sampled key/value tokens, and for video the ``temporal_radius`` in
    latent frames (``None`` = every frame; ignored by single-frame layouts)."""

    radius: float | None
    down_factor: int = 1
    temporal_radius: float | None = None

    def __post_init__(self):
        if self.radius is not None and not (_is_number(self.radius) and math.isfinite(self.radius)
                                            and self.radius > 0):
            raise ValueError(f"radius must be a finite positive number of tokens or None (full attention), got "
                             f"{self.radius!r}")
        if not isinstance(self.down_factor, int) or self.down_factor < 1:
            raise ValueError(f"down_factor must be an integer >= 1, got {self.down_factor!r}")
        if self.radius is None and self.down_factor > 1:
            raise ValueError("down_factor > 1 needs a local window: pass a radius, or use down_factor=1 for full attention")
        rt = self.temporal_radius
        if rt is not None:
            if not (_is_number(rt) and math.isfinite(rt) and rt > 0):
                raise ValueError(f"temporal_radius must be a positive, finite number of latent frames or None (every "
                                 f"frame), got {rt!r}")
            if self.radius is None:
                raise ValueError("temporal_radius needs a spatial window: pass a radius too (temporal_radius=None and "
                                 "radius=None is full attention)")

    @property
    def radius_sq_bound(self) -> int:
        """Smallest integer ``b`` with ``d2 < radius**2  <=>  d2 < b`` for integer ``d2``."""
        return math.ceil(self.radius * self.radius)

    def frame_bounds(self, frames: int) -> tuple[int, ...]:
        """For each frame offset ``|dt|`` in ``0 .. frames-1``, the smallest integer ``b`` with
        ``(dt/rt)**2 + d2/r**2 < 1  <=>  d2 < b`` for integer ``d2 = dy**2 + dx**2`` (0: no key of that
        offset is seen). Exact (rational arithmetic on the floats given); ``rt=None``: every offset gets
        :attr:`radius_sq_bound`, as does ``dt = 0`` always. Full attention (radius ``None``) has no bounds."""
        if self.radius is None:
            raise ValueError("full attention (radius=None) has no window bounds")
        if self.temporal_radius is None:
            return (self.radius_sq_bound,) * frames
        r2, rt2 = Fraction(self.radius) ** 2, Fraction(self.temporal_radius) ** 2
        bounds = [self.radius_sq_bound]
        for dt in range(1, frames):
            rest = r2 * (1 - Fraction(dt * dt) / rt2)  # d2 < rest
            bounds.append(max(0, math.ceil(rest)))
        return tuple(bounds)

    def temporal_reach(self, frames: int) -> int:
        """The largest frame offset whose keys a query can see (``frames - 1`` at most)."""
        return max(dt for dt, b in enumerate(self.frame_bounds(frames)) if b > 0)

    def covers(self, height: int, width: int, frames: int = 1) -> bool:
        """True when every image key is inside every image query's window."""
        if self.radius is None:
            return True
        return self.frame_bounds(frames)[-1] > (height - 1) ** 2 + (width - 1) ** 2

    def masks_anything(self, height: int, width: int, frames: int = 1) -> bool:
        """False only when every query sees every key: the window covers the grid and there
        are no pooled tokens (which text queries never see)."""
        return self.down_factor > 1 or not self.covers(height, width, frames)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


@dataclass(frozen=True)
class TokenLayout:
    """Where text and image tokens sit in one attention call's sequence.

    ``text_first=True`` is FLUX (``[text | image]``); ``False`` is SD3 (``[image | text]``).
    Pooled tokens, when present, are always appended after both as keys only. ``frames > 1``: a
    video, ``frames x height x width`` image tokens, frame-major then row-major (Wan).
    """

    text_len: int
    height: int
    width: int
    text_first: bool = True
    frames: int = 1

    def __post_init__(self):
        if self.text_len < 0 or self.height < 1 or self.width < 1 or self.frames < 1:
            raise ValueError(f"invalid token layout {self}")

    @property
    def num_image(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.text_len + self.num_image

    @property
    def text_slice(self) -> slice:
        return slice(0, self.text_len) if self.text_first else slice(self.num_image, self.seq_len)

    @property
    def image_slice(self) -> slice:
        return slice(self.text_len, self.seq_len) if self.text_first else slice(0, self.num_image)

    def pooled_grid(self, window: Window) -> tuple[int, int]:
        """The pooled grid of one frame, ``(height/df, width/df)`` (``(0, 0)`` without pooling)."""
        df = window.down_factor
        if df == 1:
            return 0, 0
        if self.height % df or self.width % df:
            raise ValueError(
                f"the token grid {self.height}x{self.width} is not divisible by down_factor={df}; "
                f"choose an image size whose latent grid (pixels / 16 for FLUX) is a multiple of {df} on both sides"
            )
        return self.height // df, self.width // df

    def num_pooled(self, window: Window) -> int:
        h, w = self.pooled_grid(window)
        return self.frames * h * w


def grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """The (height, width) of the image grid described by FLUX ``img_ids`` (columns 1, 2 =
    row, column), which must enumerate a full rectangle in row-major order (any offset)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] < 3:
        raise ValueError(f"img_ids must have shape [num_tokens, 3], got {tuple(img_ids.shape)}")
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    n = ids.shape[0]
    ar = torch.arange(n, device=ids.device)
    if height * width != n or not (
        torch.equal(rows - r0, ar // width) and torch.equal(cols - c0, ar % width)
    ):
        raise ValueError(
            "CLEAR needs the image tokens to form one rectangular grid in row-major order, but img_ids "
            f"({n} tokens spanning {height}x{width} positions) do not; reference-image tokens (e.g. FLUX Kontext) "
            "are not supported"
        )
    return height, width


# ----------------------------------------------------------------------------------------
# Dense oracle and exact counts
# ----------------------------------------------------------------------------------------


def _local_mask(height: int, width: int, window: Window, device=None, frames: int = 1) -> torch.Tensor:
    """``[n, n]`` image-to-image part of the mask, ``n = frames * height * width`` (frame-major)."""
    hw = height * width
    pos = torch.arange(frames * hw, device=device)
    t, rows, cols = pos // hw, (pos % hw) // width, pos % width
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    if frames == 1:
        return d2 < window.radius_sq_bound
    bounds = torch.tensor(window.frame_bounds(frames), device=device)
    return d2 < bounds[(t[:, None] - t[None, :]).abs()]


def allowed_mask(layout: TokenLayout, window: Window, device=None) -> torch.Tensor:
    """Dense boolean mask ``[queries, keys]`` in the layout's natural token order, keys
    followed by the pooled tokens. ``True`` = the query sees the key."""
    n_pool = layout.num_pooled(window)
    mask = torch.ones(layout.seq_len, layout.seq_len + n_pool, dtype=torch.bool, device=device)
    img, txt = layout.image_slice, layout.text_slice
    if window.radius is not None:
        mask[img, img] = _local_mask(layout.height, layout.width, window, device, layout.frames)
    mask[txt, layout.seq_len :] = False
    return mask


def _circle_pairs(height: int, width: int, bound: int) -> int:
    """Exact number of (query, key) pairs of one ``height x width`` grid with ``dy^2 + dx^2 < bound``.

    The sum over queries separates: for a row offset dy, ``height - |dy|`` query rows
    have a partner row, and for each allowed dx, ``width - |dx|`` columns do."""
    total = 0
    for dy in range(-(height - 1), height):
        rem = bound - 1 - dy * dy  # largest allowed dx^2
        if rem < 0:
            continue
        m = min(math.isqrt(rem), width - 1)
        row_pairs = width + 2 * (m * width - m * (m + 1) // 2)  # sum over |dx| <= m of (width - |dx|)
        total += (height - abs(dy)) * row_pairs
    return total


def _local_pairs(height: int, width: int, radius: float) -> int:
    """Exact number of (query, key) image pairs with dy^2 + dx^2 < r^2 inside the grid."""
    return _circle_pairs(height, width, Window(radius).radius_sq_bound)


def _video_pairs(frames: int, height: int, width: int, window: Window) -> int:
    """Exact number of (query, key) image pairs of a video: for a frame offset dt, ``frames - |dt|`` query
    frames have a partner frame, each pair with :func:`_circle_pairs` of that offset's bound."""
    bounds = window.frame_bounds(frames)
    per_bound = {b: _circle_pairs(height, width, b) for b in set(bounds) if b > 0}
    return sum((frames - dt) * per_bound[b] * (1 if dt == 0 else 2) for dt, b in enumerate(bounds) if b > 0)


def count_allowed_pairs(layout: TokenLayout, window: Window) -> int:
    """Number of allowed (query, key) pairs of one attention call, computed in closed form."""
    t, n = layout.text_len, layout.num_image
    if window.radius is None:
        return (t + n) ** 2
    local = _video_pairs(layout.frames, layout.height, layout.width, window)
    return t * (t + n) + n * t + local + n * layout.num_pooled(window)


def attention_flops(height: int, width: int, radius: float | None, text_len: int = 512,
                    down_factor: int = 1, dim: int = 3072, frames: int = 1,
                    temporal_radius: float | None = None) -> int:
    """The paper's per-layer attention cost ``4 * sum(M) * c``: ``sum(M)`` allowed
    (query, key) pairs, ``c`` = ``dim`` channels (heads x head_dim), 2 FLOPs per
    multiply-add in ``QK^T`` and in ``PV``. ``height``/``width`` are in tokens (latent / 2
    for FLUX, i.e. pixels / 16). ``radius=None`` is full attention. Video: ``frames`` latent frames
    and the window's ``temporal_radius`` (``None``: every frame)."""
    layout = TokenLayout(text_len, height, width, frames=frames)
    return 4 * count_allowed_pairs(layout, Window(radius, down_factor, temporal_radius)) * dim


def video_flops(frames: int, height: int, width: int, radius: float | None, temporal_radius: float | None = None,
                down_factor: int = 1, dim: int = 5120) -> int:
    """FLOPs of one video self-attention call (no text in the sequence, as Wan's ``attn1``): ``4 * pairs * dim``
    over a ``frames x height x width`` token grid."""
    return attention_flops(height, width, radius, 0, down_factor, dim, frames, temporal_radius)


# ----------------------------------------------------------------------------------------
# A band of rows (patch parallelism): its image queries against the band plus halo rows
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandLayout:
    """One patch-parallel attention call for the image queries of a band of ``rows x width``
    tokens: its keys are ``[text | extended band | pooled]``, the extended band being ``above``
    halo rows, the band, and ``below`` halo rows (row-major), ``n_pooled`` pooled tokens last."""

    text_len: int
    rows: int
    width: int
    above: int = 0
    below: int = 0
    n_pooled: int = 0

    def __post_init__(self):
        if min(self.text_len, self.above, self.below, self.n_pooled) < 0 or self.rows < 1 or self.width < 1:
            raise ValueError(f"invalid band layout {self}")

    @property
    def ext_rows(self) -> int:
        return self.above + self.rows + self.below

    @property
    def num_queries(self) -> int:
        return self.rows * self.width

    @property
    def num_keys(self) -> int:
        return self.text_len + self.ext_rows * self.width + self.n_pooled



def band_allowed_mask(rows: int, width: int, row_offset: int, ext_rows: int, window: Window, text_len: int = 0,
                      n_pooled: int = 0, device=None) -> torch.Tensor:
    """Dense mask of a band's ``rows x width`` image queries (row-major) against
    ``[text | extended band (ext_rows x width, row-major) | pooled]`` keys; query row ``i``
    is row ``i + row_offset`` of the extended band. Image queries see all text and pooled keys."""
    q_rows = torch.arange(rows, device=device).repeat_interleave(width) + row_offset
    q_cols = torch.arange(width, device=device).repeat(rows)
    k_rows = torch.arange(ext_rows, device=device).repeat_interleave(width)
    k_cols = torch.arange(width, device=device).repeat(ext_rows)
    mask = torch.ones(rows * width, text_len + ext_rows * width + n_pooled, dtype=torch.bool, device=device)
    mask[:, text_len : text_len + ext_rows * width] = (
        (q_rows[:, None] - k_rows) ** 2 + (q_cols[:, None] - k_cols) ** 2 < window.radius_sq_bound)
    return mask
