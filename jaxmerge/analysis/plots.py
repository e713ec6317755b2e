"""PNG figures of a diagnostics report (matplotlib, no display needed).

One figure per question, shaped like the papers' figures:
``sparsity.png`` (SAR-Merging Fig. 2), ``regions.png`` (Fig. 6–7),
``cosine.png`` (Fig. 3), ``spectral.png`` (ResMerge Fig. 4) and
``head_residual.png`` (ResMerge Fig. 5, 7).
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxmerge.analysis.tables import REGIONS
from jaxmerge.errors import ConfigError

LINE_STYLES = ("-", "--", ":", "-.")
"""Cycled over the lines of one axis, so lines that coincide stay visible."""

REGION_COLORS = {"unchanged": "#d9d9d9", "private": "#4c9be8", "overlap": "#59b36b",
                 "conflict": "#e0573e"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("plots need matplotlib: pip install 'jaxmerge[analyze]' "
                          "(or pass --plots=false)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _expert_labels(n: int) -> list[str]:
    return [f"expert {e + 1}" for e in range(n)]


def _layers(tables: dict) -> tuple[list[int], list[dict]]:
    keys = list(tables["layers"])
    return [int(k) for k in keys], [tables["layers"][k] for k in keys]


def _save(fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def plot_sparsity(tables: dict, n: int, path: pathlib.Path) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    layers, scopes = _layers(tables)
    for e, label in enumerate(_expert_labels(n)):
        left.plot(layers, [100 * s["sparsity"][e] for s in scopes], marker="o", ms=3,
                  ls=LINE_STYLES[e % 4], label=label)
    left.set(xlabel="layer", ylabel="update sparsity (%)", ylim=(0, 102),
             title="Layer-wise update sparsity (|τ| ≤ ε)")
    left.grid(alpha=0.3)
    left.legend()
    families = list(tables["families"])
    width = 0.8 / n
    x = np.arange(len(families))
    for e, label in enumerate(_expert_labels(n)):
        right.bar(x + (e - (n - 1) / 2) * width,
                  [100 * tables["families"][f]["sparsity"][e] for f in families], width,
                  label=label)
    right.set_xticks(x, families)
    right.set(ylabel="update sparsity (%)", ylim=(0, 102), title="By module family")
    right.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _stacked(ax, labels, fractions: list[dict], title: str, xlabel: str) -> None:
    bottom = np.zeros(len(labels))
    x = np.arange(len(labels))
    for region in REGIONS:
        values = np.array([100 * f[region] for f in fractions])
        ax.bar(x, values, 0.85, bottom=bottom, color=REGION_COLORS[region], label=region)
        bottom += values
    step = max(1, len(labels) // 15)
    ax.set_xticks(x[::step], [str(v) for v in labels][::step])
    ax.set(ylabel="% of entries", ylim=(0, 100), title=title, xlabel=xlabel)


def plot_regions(tables: dict, n: int, path: pathlib.Path) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    layers, scopes = _layers(tables)
    _stacked(left, layers, [s["regions"] for s in scopes],
             f"Update regions of all {n} experts, per layer", "layer")
    left.legend(loc="lower right", fontsize=8)
    pairs = list(tables["model"]["pair_regions"])
    if pairs:
        _stacked(right, pairs, [tables["model"]["pair_regions"][p] for p in pairs],
                 "Regions of each pair (whole model)", "expert pair")
    else:
        right.axis("off")
        right.text(0.5, 0.5, "one expert: no pairs", ha="center")
    return _save(fig, path)


def plot_cosine(tables: dict, n: int, path: pathlib.Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    layers, scopes = _layers(tables)
    pairs = list(tables["model"]["cosine"])
    for i, pair in enumerate(pairs):
        ax.plot(layers, [s["cosine"][pair] for s in scopes], marker="o", ms=3,
                ls=LINE_STYLES[i % 4], label=f"experts {pair}")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(xlabel="layer", ylabel="cosine of task vectors",
           title="Layer-wise cosine similarity of task vectors", ylim=(-1.05, 1.05))
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "one expert: no pairs", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def _per_matrix(tensors: list[dict], field) -> list:
    return [field(t) for t in tensors if t["spectral"] is not None]


def plot_spectral(tables: dict, n: int, path: pathlib.Path, tensor_spectra: list) -> str:
    """``tensor_spectra``: per matrix, {"energy_top1": [N], "zero": [N]} for the histogram."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    layers, scopes = _layers(tables)
    with_spectra = [(layer, s) for layer, s in zip(layers, scopes) if s["spectral"]]
    for e, label in enumerate(_expert_labels(n)):
        axes[0].plot([layer for layer, _ in with_spectra],
                     [100 * (s["spectral"]["experts"][e]["energy_top1"] or 0.0)
                      for _, s in with_spectra], marker="o", ms=3, ls=LINE_STYLES[e % 4],
                     label=label)
        shares = [100 * m["energy_top1"][e] for m in tensor_spectra if not m["zero"][e]]
        axes[1].hist(shares, bins=30, alpha=0.5, label=label)
    axes[0].set(xlabel="layer", ylabel="top-1 energy share (%)",
                title="Spectral concentration per layer (mean over matrices)")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    axes[1].set(xlabel="top-1 energy share σ₁²/Σσ² (%)", ylabel="matrices",
                title="Leading-energy concentration")
    axes[1].legend()
    experts = tables["model"]["spectral"]["experts"] if tables["model"]["spectral"] else []
    x = np.arange(n)
    for offset, (key, label, color) in enumerate((
            ("stable_rank_before", "stable rank", "#4c9be8"),
            ("stable_rank_after", "stable rank, head removed", "#1f5fa8"),
            ("effective_rank_before", "effective rank", "#f0a35e"),
            ("effective_rank_after", "effective rank, head removed", "#b5651d"))):
        axes[2].bar(x + (offset - 1.5) * 0.2, [row[key] or 0.0 for row in experts], 0.2,
                    label=label, color=color)
    axes[2].set_xticks(x, _expert_labels(n))
    axes[2].set_yscale("log")
    axes[2].set(ylabel="rank (mean over matrices, log scale)",
                title="Ranks before / after removing the head")
    axes[2].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    axes[2].grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_head_residual(tables: dict, n: int, path: pathlib.Path, tensor_geometry: list,
                       head_rank: int = 1) -> str:
    """``tensor_geometry``: per matrix, {"head_cos": [P], "residual_cos": [P]}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    layers, scopes = _layers(tables)
    with_spectra = [(layer, s["spectral"]["geometry"]) for layer, s in zip(layers, scopes)
                    if s["spectral"]]
    xs = [layer for layer, _ in with_spectra]
    for i, (key, label) in enumerate((("residual_coherence", "residual coherence c_R"),
                                      ("head_agreement", "head agreement S_H"))):
        axes[0].plot(xs, [g[key] or 0.0 for _, g in with_spectra], marker="o", ms=3,
                     ls=LINE_STYLES[i], label=label)
    axes[0].set(xlabel="layer", ylabel="mean over matrices", ylim=(-0.02, 1.02),
                title="Fusion reliability: c_R vs S_H")
    for i, (key, label) in enumerate((("head_retention", "head retention"),
                                      ("residual_retention", "residual retention"))):
        axes[1].plot(xs, [g[key] or 0.0 for _, g in with_spectra], marker="o", ms=3,
                     ls=LINE_STYLES[i], label=label)
    axes[1].set(xlabel="layer", ylabel="‖mean X‖ / mean ‖X‖", ylim=(-0.02, 1.02),
                title="Mean retention after averaging")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    heads = [c for m in tensor_geometry for c in m["head_cos"]]
    residuals = [c for m in tensor_geometry for c in m["residual_cos"]]
    if heads:
        axes[2].boxplot([heads, residuals], tick_labels=[f"rank-{head_rank} heads", "residuals"])
        axes[2].axhline(0.0, color="black", lw=0.8)
        axes[2].set(ylabel="pairwise cosine (all matrices, all pairs)",
                    title="Pairwise similarity of components")
        axes[2].grid(alpha=0.3, axis="y")
    else:
        axes[2].axis("off")
        axes[2].text(0.5, 0.5, "one expert: no pairs", ha="center")
    return _save(fig, path)
