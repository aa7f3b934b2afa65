"""Draws docs/parallel_bands.png: bands, halos and one query's window in patch-parallel CLEAR.

    python docs/parallel_bands.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, Patch, Rectangle  # noqa: E402

from clear.geometry import Window  # noqa: E402
from clear.parallel import plan_bands  # noqa: E402

HEIGHT, WIDTH, RANKS, RADIUS, DF = 22, 28, 3, 3.5, 2
COLORS = ["#9ecae1", "#a1d99b", "#fdae6b"]


def main(out=Path(__file__).with_name("parallel_bands.png")):
    window = Window(RADIUS, DF)
    plans = [plan_bands(HEIGHT, WIDTH, RANKS, r, window) for r in range(RANKS)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw=dict(width_ratios=[1.35, 1]))

    # left: the token grid, bands, halos of rank 1, one query's window
    for r, plan in enumerate(plans):
        b = plan.band
        ax.add_patch(Rectangle((0, b.start), WIDTH, b.rows, color=COLORS[r], alpha=0.55, lw=0))
        ax.text(WIDTH + 0.4, b.start + b.rows / 2, f"rank {r}\n{b.rows} rows", va="center", fontsize=10)
    mid = plans[1]
    for start, n, label in ((mid.band.start - mid.above, mid.above, "halo from rank 0"),
                            (mid.band.stop, mid.below, "halo from rank 2")):
        ax.add_patch(Rectangle((0, start), WIDTH, n, fill=False, hatch="///", ec="#444", lw=1.2))
        ax.text(WIDTH * 0.72, start + n / 2, label, ha="center", va="center", fontsize=9,
                bbox=dict(fc="white", ec="none", alpha=0.8))
    for y in range(0, HEIGHT + 1, DF):  # pooling cells never straddle bands
        ax.plot([0, WIDTH], [y, y], color="#888", lw=0.4)
    for x in range(0, WIDTH + 1, DF):
        ax.plot([x, x], [0, HEIGHT], color="#888", lw=0.4)
    qy, qx = mid.band.start, 8  # a query in the first row of rank 1
    bound = window.radius_sq_bound
    for y in range(HEIGHT):
        for x in range(WIDTH):
            if (y - qy) ** 2 + (x - qx) ** 2 < bound:
                ax.add_patch(Rectangle((x + 0.3, y + 0.3), 0.4, 0.4, color="#c00", lw=0))
    ax.add_patch(Rectangle((qx, qy), 1, 1, fill=False, ec="#c00", lw=2))
    ax.add_patch(Circle((qx + 0.5, qy + 0.5), RADIUS, fill=False, ec="#c00", lw=1.2, ls="--"))
    ax.set_xlim(-0.5, WIDTH + 7)
    ax.set_ylim(HEIGHT + 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks(range(0, HEIGHT + 1, 2))
    ax.set_ylabel("token row")
    ax.set_title(f"{HEIGHT}x{WIDTH} tokens over {RANKS} ranks, r={RADIUS:g} (halo {mid.halo} rows), "
                 f"{DF}x{DF} pooling cells", fontsize=10)
    ax.legend(handles=[Patch(fc="white", ec="#444", hatch="///", label="K/V halo received by rank 1"),
                       Patch(color="#c00", label="image keys of the outlined query (+ all text and pooled keys)")],
              loc="lower left", bbox_to_anchor=(0, -0.13), ncol=2, fontsize=9, frameon=False)

    # right: what one layer does on every rank
    bx.axis("off")
    steps = [
        ("each rank", "projections, norms, RoPE (own band rows,\nreplicated text), as in the stock model"),
        ("halo", f"send first/last {mid.halo} rows of K,V to the\nneighbours, receive theirs (P2P)"),
        ("pooled", "pool own band's K,V in df x df cells,\nall-gather: every rank has all pooled tokens"),
        ("image queries", "own rows vs [text | halo+band+halo | pooled],\nCLEAR mask; no merge needed"),
        ("text, exact", "partial softmax over own image keys (+ text\nkeys on rank 0 only), all-reduce max and\n"
                        "sum of exp-weighted outputs: exact"),
        ("text, average", "each rank: text + own image keys;\nall-reduce mean (paper Eq. 7)"),
        ("after the model", "all-gather the output rows: every rank holds\nthe full latents; rank 0 decodes"),
    ]
    for i, (head, body) in enumerate(steps):
        y = 0.95 - i * 0.137
        bx.text(0.0, y, head, fontsize=10, weight="bold", va="top")
        bx.text(0.33, y, body, fontsize=9, va="top")
    bx.set_title("per attention layer (clear.parallel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
