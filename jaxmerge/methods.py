"""Named merge methods, each defined as a composition of the algebra's pieces.

Every factory returns a :class:`~jaxmerge.algebra.Merge` whose result is the
merged task vector Δ (θ = θ₀ + Δ). Formulas and defaults: ``METHODS.md`` §1, §2,
§3, §4, §5, §6, §7. ``REGISTRY`` maps CLI method names to factories and to the command-line flags
that set their hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jaxmerge import ops, sensitivity, spectral
from jaxmerge.algebra import Merge, chain, matrix, route, scale
from jaxmerge.errors import ConfigError


def _aggregate(aggregation: str) -> Merge:
    if aggregation == "mean":
        return ops.disjoint_mean()
    if aggregation == "sum":
        return ops.sum_experts()
    raise ConfigError(f"aggregation must be 'mean' or 'sum', got {aggregation!r}")


def linear(weights: Sequence[float] | None = None) -> Merge:
    """Model soup: Δ = Σ_t w_t τ_t / Σ_t w_t (Wortsman et al. 2022); weights default to 1."""
    return ops.weighted_mean(weights)


def task_arithmetic(scale_factor: float = 1.0, weights: Sequence[float] | None = None) -> Merge:
    """Task arithmetic (Ilharco et al. 2023): Δ = λ Σ_t w_t τ_t, λ = 1.0, weights 1."""
    pieces = [] if weights is None else [ops.weight_experts(weights)]
    return chain(*pieces, ops.sum_experts(), scale(scale_factor))


def ties(density: float = 0.2, scale_factor: float = 1.0, scope: str = "per_tensor",
         aggregation: str = "mean") -> Merge:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale.

    Args:
      density: fraction of each task vector kept by magnitude, k = 0.2.
      scale_factor: λ = 1.0.
      scope: trim threshold and zero-sign majority over each tensor (``per_tensor``,
        house default) or over the whole model per task (``global``, two extra passes).
      aggregation: ``mean`` (disjoint mean, the paper) or ``sum``.
    """
    return chain(ops.trim(density, scope), ops.elect_sign(scope), _aggregate(aggregation),
                 scale(scale_factor))


def dare_linear(drop_rate: float = 0.8, scale_factor: float = 1.0) -> Merge:
    """DARE + task arithmetic (Yu et al. 2024): Δ = λ Σ_t m_t ⊙ τ_t / (1 − p), p = 0.8."""
    return chain(ops.dare(drop_rate), ops.sum_experts(), scale(scale_factor))


def dare_ties(drop_rate: float = 0.8, scale_factor: float = 1.0,
              trim_density: float | None = None, aggregation: str = "mean") -> Merge:
    """DARE + TIES: drop-and-rescale, optionally trim, elect sign, disjoint mean, scale.

    Args:
      drop_rate: p = 0.8.
      scale_factor: λ = 1.0.
      trim_density: if set, a per-tensor TIES trim with this density after DARE.
      aggregation: ``mean`` (default) or ``sum`` (mergekit's dare_ties).
    """
    trim = [] if trim_density is None else [ops.trim(trim_density)]
    return chain(ops.dare(drop_rate), *trim, ops.elect_sign(), _aggregate(aggregation),
                 scale(scale_factor))


def breadcrumbs(density: float = 0.2, gamma: float = 0.01, scale_factor: float = 1.0) -> Merge:
    """Model Breadcrumbs + task arithmetic: drop the top γ and the smallest, keep ``density``."""
    return chain(ops.breadcrumbs_mask(density, gamma), ops.sum_experts(), scale(scale_factor))


def breadcrumbs_ties(density: float = 0.2, gamma: float = 0.01, scale_factor: float = 1.0,
                     aggregation: str = "mean") -> Merge:
    """Model Breadcrumbs masks followed by TIES sign election and disjoint mean."""
    return chain(ops.breadcrumbs_mask(density, gamma), ops.elect_sign(),
                 _aggregate(aggregation), scale(scale_factor))


def della(density: float = 0.2, epsilon: float = 0.15, scale_factor: float = 1.0,
          aggregation: str = "mean") -> Merge:
    """DELLA (Deep et al. 2024): MagPrune with 1/p_i rescale, then TIES election and mean."""
    return chain(ops.della_mask(density, epsilon), ops.elect_sign(), _aggregate(aggregation),
                 scale(scale_factor))


def slerp(t: float = 0.5) -> Merge:
    """SLERP between the base and one expert, or between two experts; t = 0.5."""
    return ops.slerp_reduce(t)


def model_stock() -> Merge:
    """Model Stock (Jang et al. 2024): Δ = τ·mean_t τ_t from the mean pairwise cosine."""
    return ops.model_stock_reduce()


def ram(epsilon: float = 1e-5) -> Merge:
    """RAM (Yuan et al. 2026): unique deltas kept, shared ones averaged over active experts.

    Δ_i = Σ_t m_t,i τ_t,i / max(c_i, 1) with m = |τ| > ε (ε = 1e-5, strict).
    """
    return chain(ops.active(epsilon), ops.disjoint_mean())


def ram_plus(epsilon: float = 1e-5, r: float = 0.1, alpha: float = 2.0,
             scope: str = "global") -> Merge:
    """RAM+ : RAM with unique entries of expert t scaled by λ_t = 1 + r·clip(S_t/U_t, 0, α).

    House defaults r = 0.1, α = 2.0 (paper); the official code is r = 0.2, α = 1.0.
    ``scope='per_tensor'`` counts S_t, U_t per tensor (mergekit's ``ramplus_tl``).
    """
    return chain(ops.active(epsilon), ops.boost_unique(r, alpha, scope), ops.disjoint_mean())


def resmerge(head_rank: int = 1, beta_min: float = 0.7, beta_max: float = 1.0,
             rho_max: float = 0.2, attention_score_scale: float = 1.0,
             ffn_score_scale: float = 0.25, other_score_scale: float = 0.0,
             score_map: str = "affine", gate: str = "positive_mean", svd: str = "auto") -> Merge:
    """ResMerge (METHODS.md §4): residual backbone by SRC-A plus a gated leading-head correction.

    Matrix leaves: τ_t = H_t + R_t (top-``head_rank`` SVD head), Δ = A + C with A =
    SRC-A of the residuals and C = LHC of the heads; other leaves: Δ = mean τ_t.
    Defaults are the paper's (k = 1, β ∈ [0.7, 1.0], ρ_max = 0.2, φ = 1.0 / 0.25 / 0.0
    for attention / ffn / other). ``ffn_score_scale=1.0`` is the released code's
    HEAD, ``score_map='ramp'`` its v1; ``gate='none'`` the ungated ablation.
    ``svd``: top-k SVD mode (``auto``: randomised with exact fallback).
    """
    backbone = spectral.src_a(beta_min, beta_max, attention_score_scale, ffn_score_scale,
                              other_score_scale, score_map)
    leaf = chain(spectral.spectral_split(head_rank, svd), spectral.lhc(backbone, rho_max, gate))
    return route({matrix: leaf}, default=ops.mean())


def _spectral_baseline(reduction: Merge, scale_factor: float) -> Merge:
    """Matrix leaves by ``reduction``, others by the mean; then × α (METHODS.md §3)."""
    return chain(route({matrix: reduction}, default=ops.mean()), scale(scale_factor))


def tsv(scale_factor: float = 1.0, svd: str = "auto") -> Merge:
    """TSV-Merge (Gargiulo et al. 2025): per-task top-⌊r/N⌋ singular triplets, decorrelated
    by the polar factors of their concatenations; α = 1.0 (METHODS.md §3)."""
    return _spectral_baseline(spectral.tsv(svd), scale_factor)


def iso_c(scale_factor: float = 1.0) -> Merge:
    """ISO-C (Marczak et al. 2025): the spectrum of Σ_t τ_t flattened to its mean; α = 1.0."""
    return _spectral_baseline(spectral.iso_c(), scale_factor)


def iso_cts(scale_factor: float = 1.0, common_fraction: float = 0.8, svd: str = "auto") -> Merge:
    """ISO-CTS (Marczak et al. 2025): ISO-C on a common subspace (f = 0.8 of the rank) plus
    task-specific directions; α = 1.0 (METHODS.md §3)."""
    return _spectral_baseline(spectral.iso_cts(common_fraction, svd), scale_factor)


def star(eta: float = 40.0) -> Merge:
    """STAR (Lee et al. 2025): per-task spectral truncation to η = 40 % of the nuclear norm,
    rescaled, then averaged; non-matrix leaves by the mean (METHODS.md §3)."""
    return route({matrix: spectral.star(eta)}, default=ops.mean())


def sar(arbitration: str = "hard", drop_rate: float = 0.2, scale_factor: float = 1.0,
        epsilon: float = 1e-5) -> Merge:
    """SAR-Merging (METHODS.md §6): Fisher-arbitrated resolve, private-region sparsify, × λ.

    Needs each expert's diagonal Fisher as the extra input ``"fisher"`` (CLI
    ``--fisher=DIR,DIR``). N = 2 is the paper's rule
    (eq. 12–16), other N the house generalisation (see :mod:`jaxmerge.sensitivity`).

    Args:
      arbitration: ``hard`` (paper) or ``fisher_weighted``.
      drop_rate: p = 0.2 for the small private entries.
      scale_factor: λ = 1.0.
      epsilon: |τ| > ε counts as updated (1e-5).
    """
    return chain(sensitivity.sar_resolve(arbitration, epsilon),
                 sensitivity.private_sparsify(drop_rate, epsilon), scale(scale_factor))


def fisher(floor: float = 1e-6) -> Merge:
    """Fisher merging (Matena & Raffel 2022, METHODS.md §7): Δ = Σ F̃_t τ_t / Σ F̃_t,
    F̃ = F + 1e-6, with each expert's diagonal Fisher as the extra input ``"fisher"``."""
    return sensitivity.fisher_weighted_mean(floor)


CALIBRATIONS = ("none", "svc")
"""Post-hoc calibrations the CLI can wrap around any method (``--calibrate``)."""


def calibrate(merge: Merge, calibration: str = "none", svc_floor: float = 0.1) -> Merge:
    """Wraps ``merge`` in a post-hoc calibration: ``none`` or ``svc`` (METHODS.md §3)."""
    if calibration == "none":
        return merge
    if calibration == "svc":
        return spectral.svc(merge, svc_floor)
    raise ConfigError(f"calibrate must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A named method for the command line.

    Attributes:
      factory: builds the Merge from keyword hyperparameters.
      flags: command-line flag name -> the factory's keyword argument.
      summary: one line for ``--help``.
      uses_weights: whether ``--weights`` applies.
    """

    factory: Callable[..., Merge]
    flags: dict[str, str]
    summary: str
    uses_weights: bool = False


REGISTRY: dict[str, MethodSpec] = {
    "linear": MethodSpec(linear, {}, "weighted average of the experts (model soup)", True),
    "task_arithmetic": MethodSpec(task_arithmetic, {"scale": "scale_factor"},
                                  "base + λ·Σ task vectors", True),
    "ties": MethodSpec(ties, {"density": "density", "scale": "scale_factor",
                              "ties_scope": "scope", "aggregation": "aggregation"},
                       "TIES: trim, elect sign, disjoint mean"),
    "dare_linear": MethodSpec(dare_linear, {"drop_rate": "drop_rate", "scale": "scale_factor"},
                              "DARE drop-and-rescale + task arithmetic"),
    "dare_ties": MethodSpec(dare_ties, {"drop_rate": "drop_rate", "scale": "scale_factor",
                                        "dare_trim_density": "trim_density",
                                        "aggregation": "aggregation"},
                            "DARE drop-and-rescale + TIES election"),
    "breadcrumbs": MethodSpec(breadcrumbs, {"density": "density", "gamma": "gamma",
                                            "scale": "scale_factor"},
                              "Model Breadcrumbs + task arithmetic"),
    "breadcrumbs_ties": MethodSpec(breadcrumbs_ties, {"density": "density", "gamma": "gamma",
                                                      "scale": "scale_factor",
                                                      "aggregation": "aggregation"},
                                   "Model Breadcrumbs + TIES election"),
    "della": MethodSpec(della, {"density": "density", "della_epsilon": "epsilon",
                                "scale": "scale_factor", "aggregation": "aggregation"},
                        "DELLA magnitude-ranked drop + TIES election"),
    "slerp": MethodSpec(slerp, {"t": "t"}, "spherical interpolation of 2 models"),
    "model_stock": MethodSpec(model_stock, {}, "Model Stock interpolation toward the base"),
    "ram": MethodSpec(ram, {"ram_epsilon": "epsilon"},
                      "RAM: keep unique deltas, average shared ones"),
    "ram_plus": MethodSpec(ram_plus, {"ram_epsilon": "epsilon", "ram_r": "r",
                                      "ram_alpha": "alpha", "ram_scope": "scope"},
                           "RAM+: RAM with overlap-aware rescaling of unique deltas"),
    "resmerge": MethodSpec(resmerge, {"head_rank": "head_rank", "beta_min": "beta_min",
                                      "beta_max": "beta_max", "rho_max": "rho_max",
                                      "attention_score_scale": "attention_score_scale",
                                      "ffn_score_scale": "ffn_score_scale",
                                      "other_score_scale": "other_score_scale",
                                      "score_map": "score_map", "head_gate": "gate",
                                      "svd": "svd"},
                           "ResMerge: SRC-A residual backbone + gated leading-head correction"),
    "tsv": MethodSpec(tsv, {"scale": "scale_factor", "svd": "svd"},
                      "TSV-Merge: decorrelated per-task singular vectors"),
    "iso_c": MethodSpec(iso_c, {"scale": "scale_factor"},
                        "ISO-C: flat spectrum on the common subspace of Σ τ"),
    "iso_cts": MethodSpec(iso_cts, {"scale": "scale_factor", "common_fraction": "common_fraction",
                                    "svd": "svd"},
                          "ISO-CTS: ISO-C on common + task-specific subspaces"),
    "star": MethodSpec(star, {"star_eta": "eta"},
                       "STAR: per-task spectral truncation and rescale, then mean"),
    "sar": MethodSpec(sar, {"arbitration": "arbitration", "sar_drop_rate": "drop_rate",
                            "scale": "scale_factor", "sar_epsilon": "epsilon"},
                      "SAR-Merging: Fisher-arbitrated conflicts, sparse private region "
                      "(needs --validation_data or --fisher)"),
    "fisher": MethodSpec(fisher, {"fisher_floor": "floor"},
                         "Fisher merging: Fisher-weighted average (needs --validation_data or "
                         "--fisher)"),
}
"""CLI method name -> MethodSpec."""


def build(method: str, hyperparameters: dict, weights: Sequence[float] | None = None) -> Merge:
    """Builds a registered method from flag-named hyperparameters (unused ones ignored)."""
    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(REGISTRY)}")
    spec = REGISTRY[method]
    kwargs = {spec.flags[flag]: value for flag, value in hyperparameters.items()
              if flag in spec.flags}
    if weights is not None:
        if not spec.uses_weights:
            raise ConfigError(f"--weights applies to linear and task_arithmetic, not {method}")
        kwargs["weights"] = list(weights)
    return spec.factory(**kwargs)
