"""Window geometry: the dense oracle against a brute-force statement of the rule, exact counts, FLOPs, layouts."""

import pytest
import torch

import clear
from clear.geometry import TokenLayout, Window, allowed_mask, count_allowed_pairs, grid_from_ids
from tiny_models import image_ids


def brute_force_mask(text_len, height, width, radius, df=1, text_first=True):
    """Independent statement of the CLEAR rule, one (query, key) pair at a time."""
    n = height * width
    pooled = (height // df) * (width // df) if df > 1 else 0
    seq = text_len + n

    def kind(i):
        if text_first:
            return ("text", None) if i < text_len else ("image", divmod(i - text_len, width))
        return ("image", divmod(i, width)) if i < n else ("text", None)

    mask = torch.zeros(seq, seq + pooled, dtype=torch.bool)
    for q in range(seq):
        qk, qpos = kind(q)
        for k in range(seq + pooled):
            if k >= seq:
                mask[q, k] = qk == "image"
                continue
            kk, kpos = kind(k)
            if qk == "text" or kk == "text" or radius is None:
                mask[q, k] = True
            else:
                mask[q, k] = (qpos[0] - kpos[0]) ** 2 + (qpos[1] - kpos[1]) ** 2 < radius**2
    return mask


@pytest.mark.parametrize("text_len,height,width,radius,df,text_first", [
    (5, 6, 10, 3, 1, True), (3, 9, 5, 1, 1, True), (0, 7, 7, 2.5, 1, True), (4, 8, 6, 2, 2, True),
    (2, 4, 4, 100, 1, True), (6, 6, 9, 4, 3, False), (3, 5, 8, None, 1, True), (1, 1, 1, 1, 1, True),
])
def test_dense_mask_and_counts_equal_brute_force(text_len, height, width, radius, df, text_first):
    layout, window = TokenLayout(text_len, height, width, text_first), Window(radius, df)
    expected = brute_force_mask(text_len, height, width, radius, df, text_first)
    mask = allowed_mask(layout, window)
    assert torch.equal(mask, expected)
    assert count_allowed_pairs(layout, window) == int(expected.sum())


@pytest.mark.parametrize("height,width,radius", [(64, 64, 16), (37, 91, 8), (20, 3, 32), (128, 64, 5.5)])
def test_closed_form_pair_count_at_larger_sizes(height, width, radius):
    layout, window = TokenLayout(11, height, width), Window(radius)
    assert count_allowed_pairs(layout, window) == int(allowed_mask(layout, window).sum())


@pytest.mark.parametrize("height,width,radius,text_len,df,dim", [
    (16, 16, 4, 8, 1, 96), (12, 20, 3, 5, 4, 64), (10, 6, None, 3, 1, 32), (8, 8, 1, 0, 2, 16)])
def test_attention_flops_is_four_times_allowed_pairs_times_dim(height, width, radius, text_len, df, dim):
    pairs = int(brute_force_mask(text_len, height, width, radius, df).sum())
    assert clear.attention_flops(height, width, radius, text_len=text_len, down_factor=df, dim=dim) == 4 * pairs * dim


def test_attention_flops_paper_defaults():
    # full attention at 1024^2: (4096 + 512)^2 pairs x 4 x 3072
    assert clear.attention_flops(64, 64, None) == 4 * (4096 + 512) ** 2 * 3072
    # CLEAR is far cheaper at 8K and the saving grows with resolution
    full, local = clear.attention_flops(512, 512, None), clear.attention_flops(512, 512, 16)
    assert local / full < 0.01


def test_grid_from_ids():
    assert grid_from_ids(image_ids(6, 10)) == (6, 10)
    assert grid_from_ids(image_ids(3, 4, row0=5)) == (3, 4)  # an offset band (patch parallel)
    assert grid_from_ids(image_ids(3, 4)[None]) == (3, 4)  # deprecated 3-D ids
    with pytest.raises(ValueError, match="rectangular grid"):
        grid_from_ids(torch.cat([image_ids(3, 4), image_ids(3, 4)]))  # reference-image tokens
    with pytest.raises(ValueError, match="rectangular grid"):
        grid_from_ids(image_ids(3, 4).flip(0))


def test_window_validation():
    with pytest.raises(ValueError, match="radius"):
        Window(0)
    with pytest.raises(ValueError, match="down_factor"):
        Window(4, 0)
    with pytest.raises(ValueError, match="local window"):
        Window(None, 4)
    with pytest.raises(ValueError, match="not divisible by down_factor=4"):
        TokenLayout(3, 6, 8).pooled_grid(Window(4, 4))


@pytest.mark.parametrize("height,width,start,rows,halo,radius,df", [(12, 7, 4, 5, 2, 3, 1), (8, 6, 0, 4, 3, 2.5, 2),
                                                                     (9, 5, 6, 3, 2, 2, 1)])
def test_band_mask_is_the_full_grid_mask_restricted(height, width, start, rows, halo, radius, df):
    """A band's image queries against [text | band + halos | pooled] see exactly what they see in the whole grid
    (whenever the halos hold every key within the radius)."""
    from clear.geometry import band_allowed_mask

    text = 3
    layout, window = TokenLayout(text, height, width), Window(radius, df)
    full = allowed_mask(layout, window)
    lo, hi = max(0, start - halo), min(height, start + rows + halo)
    q = text + torch.arange(start * width, (start + rows) * width)
    k = torch.cat([torch.arange(text), text + torch.arange(lo * width, hi * width),
                   layout.seq_len + torch.arange(layout.num_pooled(window))])
    band = band_allowed_mask(rows, width, start - lo, hi - lo, window, text, layout.num_pooled(window))
    assert torch.equal(band, full[q][:, k])
