"""The 3-D (video) window: the dense oracle against a brute-force statement of the rule in exact rational
arithmetic, exact pair counts and FLOPs, the per-frame pooled tokens, validation."""

from fractions import Fraction

import pytest
import torch

import clear
from clear.geometry import TokenLayout, Window, allowed_mask, count_allowed_pairs, video_flops


def sees(q, k, radius, temporal_radius):
    """(t, y, x) query sees (t', y', x') key: ((t-t')/rt)^2 + ((y-y')/r)^2 + ((x-x')/r)^2 < 1, exactly;
    rt None: every frame, with the circle dy^2 + dx^2 < r^2."""
    (t, y, x), (t2, y2, x2) = q, k
    space = Fraction((y - y2) ** 2 + (x - x2) ** 2) / Fraction(radius) ** 2
    time = 0 if temporal_radius is None else Fraction((t - t2) ** 2) / Fraction(temporal_radius) ** 2
    return time + space < 1


def brute_force_video_mask(text_len, frames, height, width, radius, temporal_radius, df=1):
    """``[text | video]`` queries against ``[text | video | pooled]`` keys, one pair at a time; pooled keys are
    ``df x df`` cells of each frame, seen by every video query and no text query."""
    n = frames * height * width
    pooled = frames * (height // df) * (width // df) if df > 1 else 0
    seq = text_len + n
    pos = [None] * text_len + [(i // (height * width), (i // width) % height, i % width) for i in range(n)]
    mask = torch.zeros(seq, seq + pooled, dtype=torch.bool)
    for q in range(seq):
        for k in range(seq + pooled):
            if k >= seq:
                mask[q, k] = pos[q] is not None
            elif pos[q] is None or pos[k] is None or radius is None:
                mask[q, k] = True
            else:
                mask[q, k] = sees(pos[q], pos[k], radius, temporal_radius)
    return mask


CASES = [  # text, frames, height, width, r, rt, df
    (0, 5, 7, 9, 3, 2, 1),  # the odd grid
    (0, 5, 7, 9, 3, None, 1),  # every frame: the circle per pair of frames
    (0, 4, 5, 6, 2.5, 0.9, 1),  # rt below one frame step: each frame alone
    (0, 3, 4, 5, 100, 100, 1),  # beyond the grid: everything
    (2, 3, 4, 6, 3, 1.5, 2),  # text tokens and per-frame pooled keys
    (0, 6, 3, 3, 1.7, 3.3, 1),  # non-integer radii
    (0, 1, 5, 5, 2, 1, 1),  # a single frame is the 2-D window
]


@pytest.mark.parametrize("text_len,frames,height,width,radius,rt,df", CASES)
def test_video_mask_and_counts_equal_brute_force(text_len, frames, height, width, radius, rt, df):
    layout, window = TokenLayout(text_len, height, width, frames=frames), Window(radius, df, rt)
    expected = brute_force_video_mask(text_len, frames, height, width, radius, rt, df)
    assert torch.equal(allowed_mask(layout, window), expected)
    assert count_allowed_pairs(layout, window) == int(expected.sum())
    assert layout.num_pooled(window) == (frames * (height // df) * (width // df) if df > 1 else 0)


def test_frame_bounds_are_the_exact_ellipsoid():
    w = Window(16, 1, 4)
    # d2 < 256 * (1 - dt^2 / 16): 256, 240, 192, 112, then nothing
    assert w.frame_bounds(7) == (256, 240, 192, 112, 0, 0, 0)
    assert w.temporal_reach(7) == 3 and w.temporal_reach(3) == 2
    assert Window(3, 1, 0.5).frame_bounds(3) == (9, 0, 0)  # each frame alone
    assert Window(3).frame_bounds(4) == (9, 9, 9, 9)  # every frame
    assert Window(2.5, 1, 1.5).frame_bounds(3) == (7, 4, 0)  # 6.25 * (1 - 1/2.25) = 3.47.. -> d2 <= 3


def test_covers_and_single_frame_equal_2d():
    assert Window(100, 1, 100).covers(4, 5, frames=3) and not Window(100, 1, 2).covers(4, 5, frames=3)
    assert not Window(100, 1, 2).masks_anything(4, 5, frames=2)
    # a single-frame layout ignores the temporal radius: the 2-D mask
    a = allowed_mask(TokenLayout(3, 6, 7), Window(2.5))
    assert torch.equal(a, allowed_mask(TokenLayout(3, 6, 7, frames=1), Window(2.5, 1, 0.3)))


@pytest.mark.parametrize("frames,height,width,r,rt", [(21, 30, 52, 8, 3), (16, 32, 32, 5.5, None), (9, 17, 11, 4, 2.5)])
def test_closed_form_video_pair_count_at_larger_sizes(frames, height, width, r, rt):
    # the rule in float64, one frame offset at a time (no pair sits on the boundary for these radii)
    pos = torch.arange(height * width)
    rows, cols = (pos // width).double(), (pos % width).double()
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    total = 0
    for dt in range(frames):
        time = 0.0 if rt is None else dt * dt / rt**2
        pairs = int((time + d2 / r**2 < 1).sum())
        total += (frames - dt) * pairs * (1 if dt == 0 else 2)
    assert count_allowed_pairs(TokenLayout(0, height, width, frames=frames), Window(r, 1, rt)) == total


def test_video_flops_hand_count():
    # full attention of Wan2.1-14B's 720p, 81-frame clip: 21 x 45 x 80 tokens, dim 5120
    n = 21 * 45 * 80
    assert video_flops(21, 45, 80, None, dim=5120) == 4 * n * n * 5120
    assert clear.attention_flops(45, 80, None, text_len=0, dim=5120, frames=21) == 4 * n * n * 5120
    # one frame alone (rt < 1) is frames x the 2-D count
    assert video_flops(21, 45, 80, 8, 0.5, dim=10) == 21 * clear.attention_flops(45, 80, 8, text_len=0, dim=10)


def test_window_validation_video():
    for bad in (0, -1, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="temporal_radius must be a positive, finite number"):
            Window(8, 1, bad)
    with pytest.raises(ValueError, match="radius must be a finite positive"):
        Window(float("nan"))
    with pytest.raises(ValueError, match="temporal_radius needs a spatial window"):
        Window(None, 1, 2)
    with pytest.raises(ValueError, match="invalid token layout"):
        TokenLayout(0, 4, 4, frames=0)
    with pytest.raises(ValueError, match="not divisible by down_factor=2"):
        TokenLayout(0, 5, 4, frames=3).pooled_grid(Window(4, 2, 1))
