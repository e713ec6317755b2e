"""Which regime are these experts in, and which methods do the measurements favour?

A small, explicit rule over three whole-model numbers, with thresholds taken
from the papers' observations (and stated in the output, so a user can
disagree with them):

- **update sparsity** (mean over experts): RL-trained experts leave most
  entries untouched at bf16 (SAR-Merging Table 1: 46–86 % for GRPO/DRPO/GPG
  experts), SFT experts few (2–22 %, one outlier at 60 %). ≥ 50 % reads as
  RL-like sparse, < 25 % as SFT-like dense, in between as intermediate.
- **alignment**: the mean over pairs and layers of the layer-wise cosine of the
  task vectors (SAR-Merging Fig. 3: RL pairs are nearly orthogonal, SFT pairs
  share directions). |cos| < 0.1 reads as near-orthogonal.
- **spectral concentration**: the top-1 energy share of the matrices, relative
  to an i.i.d. noise matrix of the same shape (ResMerge §5.4). ≥ 5× reads as
  concentrated: a few directions carry much of the update.
"""

from __future__ import annotations

import numpy as np

SPARSE_AT = 0.50
DENSE_BELOW = 0.25
ORTHOGONAL_BELOW = 0.10
CONCENTRATED_AT = 5.0


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def headline_numbers(tables: dict) -> dict:
    """The numbers the verdict reads, from :func:`~.tables.build_tables` output."""
    model = tables["model"]
    layer_cosines = [c for layer in tables["layers"].values() for c in layer["cosine"].values()]
    spectral = model["spectral"]
    numbers = {
        "sparsity": _mean(model["sparsity"]),
        "sparsity_per_expert": model["sparsity"],
        "layer_cosine": _mean(layer_cosines) if layer_cosines else _mean(
            model["cosine"].values()),
        "model_cosine": model["cosine"],
        "conflict": model["regions"]["conflict"],
        "overlap": model["regions"]["overlap"],
        "private": model["regions"]["private"],
        "private_share": _mean(model["private_share"]),
        "top1_energy": None,
        "top1_vs_noise": None,
        "stable_rank_before": None,
        "stable_rank_after": None,
        "head_agreement": None,
        "residual_coherence": None,
    }
    if spectral is not None:
        experts = spectral["experts"]
        numbers.update(
            top1_energy=_mean(e.get("energy_top1") for e in experts),
            top1_vs_noise=_mean(e["top1_vs_noise"] for e in experts),
            stable_rank_before=_mean(e["stable_rank_before"] for e in experts),
            stable_rank_after=_mean(e["stable_rank_after"] for e in experts),
            head_agreement=spectral["geometry"]["head_agreement"],
            residual_coherence=spectral["geometry"]["residual_coherence"],
        )
    return numbers


def _available(names, registry) -> list[str]:
    return [name for name in names if registry is None or name in registry]


def verdict(tables: dict, num_experts: int, registry=None) -> dict:
    """{regime, alignment, concentration, recommended, reasons, numbers}.

    ``registry``: the method names that exist (recommendations are filtered to them).
    """
    numbers = headline_numbers(tables)
    sparsity = numbers["sparsity"]
    if sparsity >= SPARSE_AT:
        regime = "RL-like sparse"
    elif sparsity < DENSE_BELOW:
        regime = "SFT-like dense"
    else:
        regime = "intermediate"
    reasons = [f"update sparsity {sparsity:.1%} (mean over experts; RL-like ≥ {SPARSE_AT:.0%}, "
               f"SFT-like < {DENSE_BELOW:.0%})"]
    cosine = numbers["layer_cosine"]
    if num_experts < 2 or cosine is None:
        alignment = "n/a (one expert)"
    else:
        alignment = "near-orthogonal" if abs(cosine) < ORTHOGONAL_BELOW else "aligned"
        reasons.append(f"mean layer-wise cosine of task vectors {cosine:+.3f} "
                       f"({alignment}: near-orthogonal when |cos| < {ORTHOGONAL_BELOW})")
        reasons.append(
            f"entries: {numbers['private']:.2%} private, {numbers['overlap']:.2%} agreeing "
            f"overlap, {numbers['conflict']:.2%} conflict; {numbers['private_share']:.0%} of "
            "an expert's updates are its own")
    ratio = numbers["top1_vs_noise"]
    if ratio is None:
        concentration = "n/a (no matrices measured)"
    else:
        concentration = "concentrated" if ratio >= CONCENTRATED_AT else "flat"
        reasons.append(
            f"top-1 singular direction holds {numbers['top1_energy']:.1%} of a matrix's update "
            f"energy, {ratio:.1f}× an i.i.d. noise matrix ({concentration}; concentrated at "
            f"≥ {CONCENTRATED_AT:.0f}×); stable rank {numbers['stable_rank_before']:.1f} → "
            f"{numbers['stable_rank_after']:.1f} without the head")
        if num_experts >= 2 and numbers["head_agreement"] is not None:
            reasons.append(
                f"head agreement S_H {numbers['head_agreement']:.3f}, residual coherence c_R "
                f"{numbers['residual_coherence']:.3f} (ResMerge builds on the residual and gates "
                "the head by S_H)")

    if num_experts < 2:
        recommended = []
        reasons.append("one expert: nothing to merge; the numbers describe its update only")
    elif regime == "RL-like sparse":
        recommended = _available(["resmerge", "sar", "ram_plus", "ram"], registry)
        reasons.append("sparse updates: plain averaging divides each private update by N and "
                       "sign election drops minority entries; prefer methods built for sparse "
                       "RL experts")
    elif alignment == "near-orthogonal":
        recommended = _available(["resmerge", "tsv", "iso_cts", "task_arithmetic"], registry)
        reasons.append("dense but near-orthogonal updates: averaging shrinks each by about "
                       "1/√N; prefer merges that keep each expert's directions at full scale")
    elif regime == "SFT-like dense":
        recommended = _available(["task_arithmetic", "ties", "tsv", "iso_cts", "resmerge"],
                                 registry)
        reasons.append("dense, shared directions: the classic and spectral merges apply")
    else:
        recommended = _available(["resmerge", "ties", "ram_plus", "tsv"], registry)
        reasons.append("mixed signals: compare a spectral and a sparse-aware merge")
    return {"regime": regime, "alignment": alignment, "concentration": concentration,
            "recommended": recommended, "reasons": reasons, "numbers": numbers,
            "thresholds": {"sparse_at": SPARSE_AT, "dense_below": DENSE_BELOW,
                           "orthogonal_below": ORTHOGONAL_BELOW,
                           "concentrated_at": CONCENTRATED_AT}}
