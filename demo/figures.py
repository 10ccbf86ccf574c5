"""The demo's two plots: why the views were chosen (score versus t) and how well each phrase matches a region.

matplotlib's Figure, not pyplot: no global figure registry, so concurrent requests never share a figure.
"""
from __future__ import annotations

from matplotlib.figure import Figure

from dynrefer_core.views import ViewPlan
from dynrefer_core.views.drawing import SELECTED as CHOSEN  # one colour for chosen views everywhere


def score_plot(view_plan: ViewPlan) -> Figure:
    """score(t) = Hamming(h_0, h_t) / t^alpha of the ten candidates; the chosen ones highlighted."""
    fig = Figure(figsize=(6.4, 3.8), dpi=110)
    ax = fig.subplots()
    cands = view_plan.candidates
    ax.plot([c.t for c in cands], [c.score for c in cands], "-o", color="#777777", lw=1.5, ms=5, label="candidate")
    chosen = [c for c in cands if c.selected]
    ax.scatter([c.t for c in chosen], [c.score for c in chosen], s=140, color=[v / 255 for v in CHOSEN], zorder=3,
               label="chosen")
    for c in cands:
        ax.annotate(f"H={c.hamming}", (c.t, c.score), textcoords="offset points", xytext=(0, 8), ha="center",
                    fontsize=8)
    ax.set_xticks([c.t for c in cands])
    ax.set_xlabel("t   (0 = the box, 1 = the whole image)")
    ax.set_ylabel("score")
    ax.set_title(f"score = Hamming(h_0, h_t) / t^{view_plan.alpha:g}   ·   strategy {view_plan.strategy}, "
                 f"hash {view_plan.hash_name}", fontsize=9)
    ax.margins(y=0.2)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def similarity_plot(similarity: list[dict]) -> Figure:
    """The match probability of each phrase with the region as a ranked bar chart (best match on top)."""
    ranked = sorted(similarity, key=lambda s: s["score"], reverse=True)
    fig = Figure(figsize=(5, 0.45 * len(ranked) + 0.9), dpi=110)
    ax = fig.subplots()
    ax.barh(range(len(ranked)), [s["score"] for s in ranked], color=["#1f77b4"] + ["#9ecae1"] * (len(ranked) - 1))
    ax.set_yticks(range(len(ranked)), [s["phrase"] for s in ranked], fontsize=9)
    ax.invert_yaxis()
    for k, item in enumerate(ranked):  # the value beside each bar: tiny probabilities stay readable
        ax.text(item["score"] + 0.02, k, f"{item['score']:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("match probability σ(s·e^τ + b) from D_rtc", fontsize=9)
    fig.tight_layout()
    return fig
