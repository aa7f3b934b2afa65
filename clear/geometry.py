"""Window geometry: the one place that says which key each query sees.

CLEAR's attention pattern, for a token layout of ``text_len`` text tokens and an
``height x width`` grid of image tokens (plus, with ``down_factor > 1``, the
``(height/df) * (width/df)`` pooled tokens appended after everything else as keys):

* a text query sees every text key and every image key (never the pooled keys);
* an image query sees every text key, every pooled key, and the image keys at grid
  offset (dy, dx) with ``dy**2 + dx**2 < radius**2`` (strict).

Everything that depends on that rule lives here: the token layouts of a whole grid and of a
patch-parallel band, the dense boolean masks (the oracle used by the ``dense`` backend and by
every test), and the exact count of allowed (query, key) pairs and the FLOPs it implies. How a
fast backend lays tokens out for its kernel (FlexAttention's tiles and block masks, the tiled
backend's windows) lives with that backend in :mod:`clear.backends`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Window",
    "TokenLayout",
    "BandLayout",
    "grid_from_ids",
    "allowed_mask",
    "band_allowed_mask",
    "count_allowed_pairs",
    "attention_flops",
]

@dataclass(frozen=True)
class Window:
    """The attention window: ``radius`` in grid tokens (``None`` = full attention) and
    the pooling factor of the optional down-sampled key/value tokens."""

    radius: float | None
    down_factor: int = 1

    def __post_init__(self):
        if self.radius is not None and not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius)
                                            and self.radius > 0):
            raise ValueError(f"radius must be a finite positive number of tokens or None (full attention), got "
                             f"{self.radius!r}")
        if not isinstance(self.down_factor, int) or self.down_factor < 1:
            raise ValueError(f"down_factor must be an integer >= 1, got {self.down_factor!r}")
        if self.radius is None and self.down_factor > 1:
            raise ValueError("down_factor > 1 needs a local window: pass a radius, or use down_factor=1 for full attention")

    @property
    def radius_sq_bound(self) -> int:
        """Smallest integer ``b`` with ``d2 < radius**2  <=>  d2 < b`` for integer ``d2``."""
        return math.ceil(self.radius * self.radius)

    def covers(self, height: int, width: int) -> bool:
        """True when every image key is inside every image query's window."""
        return self.radius is None or (height - 1) ** 2 + (width - 1) ** 2 < self.radius**2

    def masks_anything(self, height: int, width: int) -> bool:
        """False only when every query sees every key: the window covers the grid and there
        are no pooled tokens (which text queries never see)."""
        return self.down_factor > 1 or not self.covers(height, width)


@dataclass(frozen=True)
class TokenLayout:
    """Where text and image tokens sit in one attention call's sequence.

    ``text_first=True`` is FLUX (``[text | image]``); ``False`` is SD3 (``[image | text]``).
    Pooled tokens, when present, are always appended after both as keys only.
    """

    text_len: int
    height: int
    width: int
    text_first: bool = True

    def __post_init__(self):
        if self.text_len < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid token layout {self}")

    @property
    def num_image(self) -> int:
        return self.height * self.width

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
        return h * w


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


def _local_mask(height: int, width: int, window: Window, device=None) -> torch.Tensor:
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return d2 < window.radius_sq_bound


def allowed_mask(layout: TokenLayout, window: Window, device=None) -> torch.Tensor:
    """Dense boolean mask ``[queries, keys]`` in the layout's natural token order, keys
    followed by the pooled tokens. ``True`` = the query sees the key."""
    n_pool = layout.num_pooled(window)
    mask = torch.ones(layout.seq_len, layout.seq_len + n_pool, dtype=torch.bool, device=device)
    img, txt = layout.image_slice, layout.text_slice
    if window.radius is not None:
        mask[img, img] = _local_mask(layout.height, layout.width, window, device)
    mask[txt, layout.seq_len :] = False
    return mask


def _local_pairs(height: int, width: int, radius: float) -> int:
    """Exact number of (query, key) image pairs with dy^2 + dx^2 < r^2 inside the grid.

    The sum over queries separates: for a row offset dy, ``height - |dy|`` query rows
    have a partner row, and for each allowed dx, ``width - |dx|`` columns do."""
    bound = Window(radius).radius_sq_bound
    total = 0
    for dy in range(-(height - 1), height):
        rem = bound - 1 - dy * dy  # largest allowed dx^2
        if rem < 0:
            continue
        m = min(math.isqrt(rem), width - 1)
        row_pairs = width + 2 * (m * width - m * (m + 1) // 2)  # sum over |dx| <= m of (width - |dx|)
        total += (height - abs(dy)) * row_pairs
    return total


def count_allowed_pairs(layout: TokenLayout, window: Window) -> int:
    """Number of allowed (query, key) pairs of one attention call, computed in closed form."""
    t, n = layout.text_len, layout.num_image
    if window.radius is None:
        return (t + n) ** 2
    local = _local_pairs(layout.height, layout.width, window.radius)
    return t * (t + n) + n * t + local + n * layout.num_pooled(window)


def attention_flops(height: int, width: int, radius: float | None, text_len: int = 512,
                    down_factor: int = 1, dim: int = 3072) -> int:
    """The paper's per-layer attention cost ``4 * sum(M) * c``: ``sum(M)`` allowed
    (query, key) pairs, ``c`` = ``dim`` channels (heads x head_dim), 2 FLOPs per
    multiply-add in ``QK^T`` and in ``PV``. ``height``/``width`` are in tokens (latent / 2
    for FLUX, i.e. pixels / 16). ``radius=None`` is full attention."""
    layout = TokenLayout(text_len, height, width)
    return 4 * count_allowed_pairs(layout, Window(radius, down_factor)) * dim


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
