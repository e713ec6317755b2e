"""Spectral merge pieces: ResMerge's split, SRC-A and LHC; TSV, ISO-C, ISO-CTS, STAR; SVC.

Each function returns a :class:`~jaxmerge.algebra.Merge` piece that acts on one
*matrix* leaf (METHODS.md §0); named methods route other leaves to their
non-matrix rule (``jaxmerge.methods``). Formulas and defaults: METHODS.md §3, §4.

ResMerge (``papers/resmerge-paper.txt``) is three pieces::

    chain(spectral_split(rank=1),            # τ_t -> Split(head H_t, residual R_t)
          lhc(src_a(), rho_max=0.2))         # Δ = A(R) + C(H, A)

and the paper's structural ablations are other compositions of the same pieces:

=========================  ==========================================================
head-only mean             ``chain(spectral_split(), head(), mean())``
residual-only mean         ``chain(spectral_split(), residual(), mean())``
SRC-A w/o head             ``chain(spectral_split(), residual(), src_a())``
SRC-A w/ ungated head      ``chain(spectral_split(), lhc(src_a(), gate="none"))``
=========================  ==========================================================

The array-level functions (:func:`src_a_backbone`, :func:`lhc_gate`,
:func:`head_correction`, ...) are pure and usable outside a merge, e.g. for
diagnostics.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmerge import hashing, linalg
from jaxmerge.algebra import LeafContext, Merge
from jaxmerge.errors import ConfigError
from jaxmerge.ops import _salt, expert_sum

Array = jax.Array

SRC_EPS = 1e-8
"""SRC-A's eps (METHODS.md §4 step 2)."""

HEAD_EPS = 1e-8
"""LHC keeps heads with ‖H_t‖ > 1e-8; C ≠ 0 needs ‖A‖, ‖H̄‖ > 1e-8 (§4 step 3)."""

ZERO_TASK_EPS = 1e-8
"""TSV / ISO-CTS: a task (block) with ‖·‖ ≤ 1e-8 leaves its slots zero (§3)."""

SVC_DENOMINATOR_FLOOR = 1e-12
"""SVC: max(‖u_jᵀτ_t‖², 1e-12) (§3)."""

SCORE_MAPS = ("affine", "ramp")
GATES = ("positive_mean", "mean", "none")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_svd(svd: str) -> None:
    _check(svd in linalg.SVD_MODES, f"svd must be one of {', '.join(linalg.SVD_MODES)}, "
                                    f"got {svd!r}")


def _norms(x: Array) -> Array:
    """‖x_t‖_F of each stacked tensor, ``f32[N]``."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def _clamp01(x: Array) -> Array:
    return jnp.clip(x, 0.0, 1.0)


def _expert_keys(ctx: LeafContext, label: str) -> Array:
    salt = _salt(label)
    return jax.vmap(lambda key: hashing.fold_in(key, salt))(ctx.keys)


def _require_matrix(x, piece: str) -> None:
    if isinstance(x, Split) or x.ndim != 3:
        got = "a Split" if isinstance(x, Split) else f"shape {tuple(x.shape)}"
        raise ConfigError(f"{piece} takes stacked task matrices f32[N, m, n], got {got}; "
                          "route it to matrix leaves and select head() or residual() "
                          "after spectral_split()")


# ---------------------------------------------------------------------------
# ResMerge step 1: the head / residual split


class Split(NamedTuple):
    """Task matrices split as τ_t = H_t + R_t (METHODS.md §4 step 1).

    Attributes:
      head: the heads in factored form, a stacked :class:`~jaxmerge.linalg.TopK`
        (``u: f32[N, m, k]``, ``s: f32[N, k]``, ``vt: f32[N, k, n]``), so their
        Gram matrix and mean cost no pass over ``m × n`` entries.
      residual: R_t = τ_t − H_t, ``f32[N, m, n]``.
    """

    head: linalg.TopK
    residual: Array

    def heads(self) -> Array:
        """The heads H_t as dense matrices, ``f32[N, m, n]``."""
        return jax.vmap(linalg.TopK.reconstruct)(self.head)


def split_task_matrices(taus: Array, rank: int, keys: Array, svd: str = "auto",
                        tolerance: float = 1e-4) -> Split:
    """H_t = the top-``rank`` SVD part of τ_t, R_t = τ_t − H_t (METHODS.md §4 step 1).

    ``rank`` above min(m, n) is clamped to it. ‖τ_t‖ = 0 gives H_t = R_t = 0.
    ``keys``: one PRNG key per task for the randomised top-k SVD.
    """
    rank = min(rank, *taus.shape[-2:])
    top = jax.vmap(lambda tau, key: linalg.topk_svd(tau, rank, key, svd=svd,
                                                    tolerance=tolerance))(taus, keys)
    nonzero = jnp.any(taus != 0, axis=(1, 2))
    top = top._replace(s=jnp.where(nonzero[:, None], top.s, 0.0))
    return Split(top, taus - jax.vmap(linalg.TopK.reconstruct)(top))


def spectral_split(rank: int = 1, svd: str = "auto", tolerance: float = 1e-4) -> Merge:
    """Transform: stacked task matrices -> :class:`Split` (ResMerge step 1, METHODS.md §4).

    Args:
      rank: head rank k (1). Only the top-k triplets are computed (``linalg.topk_svd``).
      svd: ``auto`` (randomised subspace iteration with exact fallback where it
        pays, else exact), ``randomized`` or ``exact``.
      tolerance: subspace-angle tolerance of the randomised path (1e-4).
    """
    _check(isinstance(rank, int) and rank >= 1, f"head_rank must be an integer >= 1, got {rank}")
    _check_svd(svd)
    _check(tolerance > 0, f"svd tolerance must be > 0, got {tolerance}")

    def apply(x, ctx):
        _require_matrix(x, "spectral_split")
        return split_task_matrices(x, rank, _expert_keys(ctx, "spectral_split"), svd, tolerance)

    return Merge(apply)


def head() -> Merge:
    """Selects the stacked heads H_t of a :class:`Split` (e.g. for the head-only mean)."""
    return Merge(lambda split, ctx: split.heads())


def residual() -> Merge:
    """Selects the stacked residuals R_t of a :class:`Split`."""
    return Merge(lambda split, ctx: split.residual)


def head_gram(top: linalg.TopK) -> Array:
    """⟨H_s, H_t⟩ of factored heads H_t = U_t diag(s_t) V_tᵀ, ``f32[N, N]``, from the factors."""
    left = jnp.einsum("smi,tmj->stij", top.u, top.u, precision=lax.Precision.HIGHEST)
    right = jnp.einsum("sin,tjn->stij", top.vt, top.vt, precision=lax.Precision.HIGHEST)
    return jnp.einsum("si,tj,stij->st", top.s, top.s, left * right,
                      precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------
# ResMerge step 2: SRC-A


def family_scale(family: str, attention: float = 1.0, ffn: float = 0.25,
                 other: float = 0.0) -> float:
    """φ_family of the SRC-A score: attention 1.0, ffn 0.25, any other family 0.0 (§4)."""
    return {"attention": attention, "ffn": ffn}.get(family, other)


def _pair_mean(values: Array, include: Array | None = None) -> Array:
    """Mean of ``values[s, t]`` over the pairs s < t (with ``include[s] & include[t]``)."""
    n = values.shape[0]
    pairs = jnp.triu(jnp.ones((n, n), bool), k=1)
    if include is not None:
        pairs = pairs & include[:, None] & include[None, :]
    return jnp.sum(jnp.where(pairs, values, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)


def _quadratic_norm(gram: Array, weights: Array) -> Array:
    """‖Σ_t w_t x_t‖ from the Gram matrix of the x_t."""
    return jnp.sqrt(jnp.maximum(weights @ gram @ weights, 0.0))


class SphericalConsensus(NamedTuple):
    """The residuals' consensus on the Frobenius sphere (SRC-A, METHODS.md §4 step 2).

    Attributes:
      scale: 1/(n_t + eps), so q_t = scale_t · R_t.
      pair_cos: s_R, the mean pairwise cos(q_t, q_u) (1 if N = 1).
      sum_norm: ‖Q‖ with Q = Σ_t q_t.
      coherence: c_R = clamp₀¹(mean_t cos(q_t, q_src)), q_src = Q/(‖Q‖ + eps).
    """

    scale: Array
    pair_cos: Array
    sum_norm: Array
    coherence: Array


def spherical_consensus(gram: Array, eps: float = SRC_EPS) -> SphericalConsensus:
    """s_R, ‖Q‖ and c_R of SRC-A from the residual Gram matrix G = ⟨R_s, R_t⟩."""
    n = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    scale = 1.0 / (norms + eps)
    q_gram = gram * scale[:, None] * scale[None, :]
    q_norms = norms * scale
    pair_cos = (_pair_mean(q_gram / (q_norms[:, None] * q_norms[None, :] + eps)) if n > 1
                else jnp.float32(1.0))
    sum_norm = _quadratic_norm(q_gram, jnp.ones((n,), jnp.float32))
    to_src = jnp.sum(q_gram, axis=1) / (sum_norm + eps)  # ⟨q_t, q_src⟩
    src_norm = sum_norm / (sum_norm + eps)
    coherence = _clamp01(jnp.mean(to_src / (q_norms * src_norm + eps)))
    return SphericalConsensus(scale, pair_cos, sum_norm, coherence)


def src_a_weights(gram: Array, phi: float, beta_min: float = 0.7, beta_max: float = 1.0,
                  score_map: str = "affine", pair_threshold: float = 0.03,
                  pair_ref: float = 0.05, coherence_ref: float = 0.60,
                  eps: float = SRC_EPS) -> Array:
    """SRC-A as weights: A = Σ_t w_t R_t, from the residual Gram matrix G = ⟨R_s, R_t⟩.

    Every quantity of SRC-A (METHODS.md §4 step 2) is a function of G: n_t = √G_tt,
    ⟨q_s, q_t⟩ = G_st/((n_s + eps)(n_t + eps)), and the backbone is a combination of
    the residuals. So the merge reads the residuals twice (G, then Σ w_t R_t).

    ``score_map="affine"`` (the paper and the released code's HEAD):
    q_t = R_t/(n_t + eps), s_R = mean pairwise cos(q_t, q_u) (1 if N = 1),
    q_src = Q/(‖Q‖ + eps) with Q = Σ q_t, c_R = clamp₀¹(mean_t cos(q_t, q_src)),
    ρ = clamp₀¹(½(s̄ + c̄)·φ) with s̄, c̄ = clamp₀¹((x + 1)/2),
    β = β_max − (β_max − β_min)ρ, A = c_R^β · mean_t n_t · q_src. A = 0 when every
    n_t ≤ eps; A = mean_t R_t when ‖Q‖ ≤ eps or c_R ≤ 1/√N (which happens exactly
    when the mean pairwise residual cosine is ≤ 0).

    ``score_map="ramp"`` (the code released with the paper, v1): q_t = R_t/max(n_t, eps),
    s_R = mean pairwise ⟨q_t, q_u⟩, c = ‖mean_t q_t‖ (c ≤ eps -> A = 0, no mean
    fallback), pair = clamp₀¹((s_R − τ_p)/(r_p − τ_p)) with τ_p = 0.03, r_p = 0.05,
    coh = clamp₀¹((c − 1/√N)/(max(r_c, 1/√N + eps) − 1/√N)) with r_c = 0.60,
    ρ = clamp₀¹(½(pair + coh)·φ), A = (mean_t q_t / c) · c^β · mean_t n_t.
    """
    n = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    n_bar = jnp.mean(norms)
    inv_sqrt_n = 1.0 / math.sqrt(n)
    mean_weights = jnp.full((n,), 1.0 / n, jnp.float32)

    def beta_of(score):
        return beta_max - (beta_max - beta_min) * score

    if score_map == "affine":
        consensus = spherical_consensus(gram, eps)
        s_r, c_r, q_sum_norm = consensus.pair_cos, consensus.coherence, consensus.sum_norm
        score = _clamp01(0.5 * (_clamp01((s_r + 1) / 2) + _clamp01((c_r + 1) / 2)) * phi)
        src = c_r ** beta_of(score) * n_bar / (q_sum_norm + eps) * consensus.scale
        use_mean = (q_sum_norm <= eps) | (c_r <= inv_sqrt_n)
        weights = jnp.where(use_mean, mean_weights, src)
    elif score_map == "ramp":
        scale = 1.0 / jnp.maximum(norms, eps)
        q_gram = gram * scale[:, None] * scale[None, :]
        s_r = _pair_mean(q_gram) if n > 1 else jnp.float32(1.0)
        c = _quadratic_norm(q_gram, mean_weights)  # ‖mean_t q_t‖
        pair_span = max(pair_ref, pair_threshold + eps) - pair_threshold
        coherence_span = max(coherence_ref, inv_sqrt_n + eps) - inv_sqrt_n
        pair = _clamp01((s_r - pair_threshold) / pair_span)
        coherence = _clamp01((c - inv_sqrt_n) / coherence_span)
        score = _clamp01(0.5 * (pair + coherence) * phi)
        safe_c = jnp.where(c > eps, c, 1.0)
        weights = jnp.where(c > eps, safe_c ** (beta_of(score) - 1) * n_bar * scale / n, 0.0)
    else:
        raise ConfigError(f"score_map must be one of {SCORE_MAPS}, got {score_map!r}")
    return jnp.where(jnp.max(norms) <= eps, 0.0, weights)


def combine(weights: Array, x: Array) -> Array:
    """Σ_t w_t x_t for stacked ``x: f32[N, ...]``.

    Written as N scaled adds: under ``vmap`` with computed weights, XLA:CPU lowers
    ``sum(w[:, None] * x, 0)`` to a batched product about 30× slower (measured).
    """
    return sum(weights[t] * x[t] for t in range(x.shape[0]))


def src_a_backbone(residuals: Array, phi: float, **options) -> Array:
    """The SRC-A backbone A of stacked residuals ``f32[N, ...]``; see :func:`src_a_weights`."""
    return combine(src_a_weights(linalg.gram(residuals), phi, **options), residuals)


def src_a(beta_min: float = 0.7, beta_max: float = 1.0, attention_score_scale: float = 1.0,
          ffn_score_scale: float = 0.25, other_score_scale: float = 0.0,
          score_map: str = "affine", pair_threshold: float = 0.03, pair_ref: float = 0.05,
          coherence_ref: float = 0.60) -> Merge:
    """Reduction: SRC-A, spectral residual consensus aggregation (ResMerge step 2, §4).

    Reduces stacked residuals ``f32[N, ...]`` to the backbone A (see
    :func:`src_a_weights`). The family scale φ comes from the leaf's module family:
    attention 1.0, ffn 0.25, other 0.0 (the paper); ``ffn_score_scale=1.0``
    reproduces the released code's HEAD. ``score_map="ramp"`` is the v1 code's
    thresholded ramps (``pair_threshold``, ``pair_ref``, ``coherence_ref``).
    """
    _check(0.0 <= beta_min <= beta_max, f"need 0 <= beta_min <= beta_max, got {beta_min}, "
                                        f"{beta_max}")
    for label, value in (("attention_score_scale", attention_score_scale),
                         ("ffn_score_scale", ffn_score_scale),
                         ("other_score_scale", other_score_scale)):
        _check(value >= 0 and math.isfinite(value), f"{label} must be >= 0, got {value}")
    _check(score_map in SCORE_MAPS, f"score_map must be one of {SCORE_MAPS}, got {score_map!r}")
    options = dict(beta_min=beta_min, beta_max=beta_max, score_map=score_map,
                   pair_threshold=pair_threshold, pair_ref=pair_ref, coherence_ref=coherence_ref)

    def apply(x, ctx):
        if isinstance(x, Split):
            raise ConfigError("src_a reduces stacked residuals: write "
                              "chain(spectral_split(), residual(), src_a())")
        phi = family_scale(ctx.info.family, attention_score_scale, ffn_score_scale,
                           other_score_scale)
        return src_a_backbone(x, phi, **options)

    return Merge(apply)


# ---------------------------------------------------------------------------
# ResMerge step 3: LHC


def lhc_gate(gram: Array, gate: str = "positive_mean") -> Array:
    """The head agreement S_H of LHC from the head Gram matrix ⟨H_s, H_t⟩ (METHODS.md §4 step 3).

    Heads with ‖H_t‖ > 1e-8 are normalised to ĥ_t. S_H = 0 if none is kept, 1 if
    exactly one is kept (or N = 1), else clamp₀¹ of the mean over kept pairs of
    max(0, cos(ĥ_t, ĥ_u)) (``positive_mean``, the paper) or of
    max(0, mean cos(ĥ_t, ĥ_u)) (``mean``, a v1 option). ``none``: S_H = 1.
    """
    if gate == "none":
        return jnp.float32(1.0)
    if gate not in GATES:
        raise ConfigError(f"gate must be one of {GATES}, got {gate!r}")
    n = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    kept = norms > HEAD_EPS
    safe = jnp.where(kept, norms, 1.0)
    cosines = gram / (safe[:, None] * safe[None, :]) / (1.0 + linalg.COS_EPS)  # ‖ĥ‖ = 1
    if gate == "positive_mean":
        agreement = _pair_mean(jnp.maximum(cosines, 0.0), kept)
    else:
        agreement = jnp.maximum(_pair_mean(cosines, kept), 0.0)
    count = jnp.sum(kept)
    single = (count == 1) | (n == 1)
    return jnp.where(count == 0, 0.0, jnp.where(single, 1.0, _clamp01(agreement)))


def head_correction_weight(head_gram: Array, backbone_norm: Array, rho_max: float = 0.2,
                           gate: str = "positive_mean") -> Array:
    """c with the LHC correction C = c · Σ_t H_t (METHODS.md §4 step 3).

    H̄ = (1/N) Σ_t H_t over all N heads; C = ρ_max · S_H · ‖A‖ · H̄/‖H̄‖ when
    ρ_max·S_H > 0, ‖A‖ > 1e-8 and ‖H̄‖ > 1e-8, else 0. So ‖C‖ ≤ ρ_max‖A‖: the heads
    give the direction, the backbone the size.
    """
    n = head_gram.shape[0]
    budget = rho_max * lhc_gate(head_gram, gate)
    mean_head_norm = _quadratic_norm(head_gram, jnp.full((n,), 1.0 / n, jnp.float32))
    active = (budget > 0) & (backbone_norm > HEAD_EPS) & (mean_head_norm > HEAD_EPS)
    return jnp.where(active, budget * backbone_norm / jnp.where(active, mean_head_norm, 1.0) / n,
                     0.0)


def head_correction(heads: Array, backbone: Array, rho_max: float = 0.2,
                    gate: str = "positive_mean") -> Array:
    """The LHC correction C for dense stacked heads ``f32[N, m, n]`` and backbone A."""
    weight = head_correction_weight(linalg.gram(heads), linalg.frobenius_norm(backbone),
                                    rho_max, gate)
    return weight * expert_sum(heads)


def lhc(backbone: Merge, rho_max: float = 0.2, gate: str = "positive_mean") -> Merge:
    """Reduction on a :class:`Split`: Δ = A + C, leading-head correction (ResMerge step 3).

    Args:
      backbone: a reduction applied to the residuals to give A (``src_a()`` in
        ResMerge; ``mean()`` gives the mean-residual backbone).
      rho_max: head budget ρ_max (0.2): ‖C‖ ≤ ρ_max‖A‖.
      gate: ``positive_mean`` (mean positive head cosine, the paper), ``mean``
        (v1 option) or ``none`` (the ungated ablation).
    """
    _check(rho_max >= 0 and math.isfinite(rho_max), f"rho_max must be >= 0, got {rho_max}")
    _check(gate in GATES, f"gate must be one of {GATES}, got {gate!r}")

    def apply(split, ctx):
        if not isinstance(split, Split):
            raise ConfigError("lhc takes the Split of spectral_split(): write "
                              "chain(spectral_split(), lhc(src_a()))")
        a = backbone.apply(split.residual, ctx)
        weight = head_correction_weight(head_gram(split.head), linalg.frobenius_norm(a),
                                        rho_max, gate)
        top = split.head
        # C = weight · Σ_t U_t diag(s_t) V_tᵀ, one product over the concatenated factors.
        u = jnp.concatenate(list(top.u * (weight * top.s)[:, None, :]), axis=1)
        vt = jnp.concatenate(list(top.vt), axis=0)
        return a + linalg.low_rank_product(u, vt)

    passes = tuple(p._replace(partial=_on_residual(p.partial)) for p in backbone.passes)
    return Merge(apply, passes=passes, extra_inputs=backbone.extra_inputs,
                 choose=backbone.choose, check=backbone.check)


def _on_residual(partial):
    return lambda split, ctx: partial(split.residual, ctx)


# ---------------------------------------------------------------------------
# Spectral baselines (METHODS.md §3)


def _slot_fill(blocks: list[tuple[Array, Array, Array]], m: int, n: int, r: int):
    """Concatenates (u, s, vt) blocks into U (m×r), s (r), Vᵀ (r×n), zero-padded."""
    u = jnp.concatenate([b[0] for b in blocks], axis=1)
    s = jnp.concatenate([b[1] for b in blocks])
    vt = jnp.concatenate([b[2] for b in blocks], axis=0)
    pad = r - s.shape[0]
    if pad:
        u = jnp.pad(u, ((0, 0), (0, pad)))
        s = jnp.pad(s, (0, pad))
        vt = jnp.pad(vt, ((0, pad), (0, 0)))
    return u, s, vt


def _stacked_topk(matrices: Array, k: int, keys: Array, svd: str, keep: Array):
    """Top-k triplets of each stacked matrix; zero where ``keep`` is False."""
    top = jax.vmap(lambda a, key: linalg.topk_svd(a, k, key, svd=svd))(matrices, keys)
    mask = keep.astype(jnp.float32)
    return top.u * mask[:, None, None], top.s * mask[:, None], top.vt * mask[:, None, None]


def tsv_merge(taus: Array, keys: Array, svd: str = "auto") -> Array:
    """TSV-Merge of stacked task matrices ``f32[N, m, n]`` (METHODS.md §3, α = 1).

    k = ⌊r/N⌋ with r = min(m, n); each task's top-k triplets fill its slots of
    U_cat, s_cat, V_cat (tasks with ‖τ_t‖ ≤ 1e-8 leave them zero);
    Δ = polar(U_cat) diag(s_cat) polar(V_cat). k = 0 (N > r) gives Δ = 0.
    """
    n_tasks, m, n = taus.shape
    r = min(m, n)
    k = r // n_tasks
    if k == 0:
        return jnp.zeros((m, n), jnp.float32)
    keep = _norms(taus) > ZERO_TASK_EPS
    u, s, vt = _stacked_topk(taus, k, keys, svd, keep)
    u_cat, s_cat, v_cat = _slot_fill([(u[t], s[t], vt[t]) for t in range(n_tasks)], m, n, r)
    return linalg.matmul(linalg.polar(u_cat) * s_cat, linalg.polar(v_cat))


def iso_c_merge(taus: Array) -> Array:
    """ISO-C (METHODS.md §3, α = 1): M = Σ_t τ_t = U diag(σ) Vᵀ, Δ = mean(σ)·U Vᵀ."""
    u, s, vt = linalg.exact_svd(expert_sum(taus))
    return jnp.mean(s) * linalg.matmul(u, vt)


def round_half_even(value: Fraction) -> int:
    """Nearest integer to an exact fraction, halves to even (Python's ``round``)."""
    return round(Fraction(value))


def iso_cts_ranks(r: int, num_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """(k_c, d): ISO-CTS common rank and per-task rank (METHODS.md §3).

    k₀ = ⌊f·r⌋, s = round_half_even((r − k₀)/N)·N, k_c = r − s, d = s/N.
    """
    k0 = math.floor(common_fraction * r)
    s = round_half_even(Fraction(r - k0, num_tasks)) * num_tasks
    if s > r:
        raise ConfigError(f"iso_cts: {num_tasks} task blocks of rank {s // num_tasks} exceed "
                          f"the matrix rank {r}; raise common_fraction")
    return r - s, s // num_tasks


def iso_cts_merge(taus: Array, keys: Array, common_fraction: float = 0.8,
                  svd: str = "auto") -> Array:
    """ISO-CTS (METHODS.md §3, α = 1) of stacked task matrices ``f32[N, m, n]``.

    Common block: top-k_c of SVD(M), M = Σ_t τ_t. Task t: top-d of
    τ_t − U_c U_cᵀ τ_t (blocks with norm ≤ 1e-8 stay zero). Slots: task blocks,
    then the common block; Δ = σ̄ · polar(U_all) polar(V_all), σ̄ = mean of the r
    assembled singular values. d = 0 is ISO-C.
    """
    n_tasks, m, n = taus.shape
    r = min(m, n)
    k_common, d = iso_cts_ranks(r, n_tasks, common_fraction)
    u, s, vt = linalg.exact_svd(expert_sum(taus))
    u_c = u[:, :k_common]
    blocks = []
    if d > 0:
        projected = taus - linalg.matmul(u_c, linalg.matmul(u_c.T, taus))
        keep = _norms(projected) > ZERO_TASK_EPS
        tu, ts, tvt = _stacked_topk(projected, d, keys, svd, keep)
        blocks += [(tu[t], ts[t], tvt[t]) for t in range(n_tasks)]
    blocks.append((u_c, s[:k_common], vt[:k_common]))
    u_all, s_all, v_all = _slot_fill(blocks, m, n, r)
    return jnp.mean(s_all) * linalg.matmul(linalg.polar(u_all), linalg.polar(v_all))


def star_keep_count(s: Array, eta: float) -> Array:
    """STAR's q: the fewest leading σ whose sum reaches η% of Σσ (at least 1; 0 if Σσ = 0)."""
    total = jnp.sum(s)
    target = eta * total / 100.0
    below = jnp.sum(jnp.cumsum(s) < target)
    return jnp.where(total > 0, jnp.minimum(below + 1, s.shape[0]), 0)


def star_matrix(tau: Array, eta: float = 40.0) -> Array:
    """STAR of one matrix: keep q = :func:`star_keep_count` triplets, rescaled by Σσ/Σσ_kept."""
    u, s, vt = linalg.exact_svd(tau)
    q = star_keep_count(s, eta)
    kept = jnp.where(jnp.arange(s.shape[0]) < q, s, 0.0)
    kept_sum = jnp.sum(kept)
    rescale = jnp.where(kept_sum > 0, jnp.sum(s) / jnp.where(kept_sum > 0, kept_sum, 1.0), 0.0)
    return linalg.matmul(u * (kept * rescale), vt)


def svc_calibrate(merged: Array, taus: Array, floor: float = 0.1) -> Array:
    """SVC (METHODS.md §3): rescale each singular value of the merged Δ_m by its task response.

    Δ_m = U diag(σ) Vᵀ; s_j^t = ⟨u_jᵀΔ_m, u_jᵀτ_t⟩ / max(‖u_jᵀτ_t‖², 1e-12);
    γ_j = N / Σ_t max(α_c, s_j^t); result U diag(γσ) Vᵀ.
    """
    u, s, vt = linalg.exact_svd(merged)
    merged_rows = s[:, None] * vt  # u_jᵀ Δ_m
    task_rows = jax.vmap(lambda tau: linalg.matmul(u.T, tau))(taus)  # [N, r, n]
    response = jnp.sum(task_rows * merged_rows, axis=-1) / jnp.maximum(
        jnp.sum(jnp.square(task_rows), axis=-1), SVC_DENOMINATOR_FLOOR)
    gamma = taus.shape[0] / jnp.sum(jnp.maximum(floor, response), axis=0)
    return linalg.matmul(u * (gamma * s), vt)


def tsv(svd: str = "auto") -> Merge:
    """Reduction: TSV-Merge of task matrices (Gargiulo et al. 2025, METHODS.md §3); see
    :func:`tsv_merge`. Warns once per shape when N > min(m, n) (k = 0, Δ = 0)."""
    _check_svd(svd)

    def apply(x, ctx):
        _require_matrix(x, "tsv")
        if min(x.shape[1:]) // x.shape[0] == 0:
            warnings.warn(f"tsv: {x.shape[0]} experts exceed the rank {min(x.shape[1:])} of "
                          f"{ctx.info.name} (shape {x.shape[1:]}): k = 0, Δ = 0", stacklevel=2)
        return tsv_merge(x, _expert_keys(ctx, "tsv"), svd)

    return Merge(apply)


def iso_c() -> Merge:
    """Reduction: ISO-C, isotropic merging in the common subspace (Marczak et al. 2025, §3)."""

    def apply(x, ctx):
        _require_matrix(x, "iso_c")
        return iso_c_merge(x)

    return Merge(apply)


def iso_cts(common_fraction: float = 0.8, svd: str = "auto") -> Merge:
    """Reduction: ISO-CTS, common + task-specific subspaces (Marczak et al. 2025, §3).

    Args:
      common_fraction: f = 0.8, the share of the rank given to the common subspace.
      svd: top-d SVD mode of the task blocks.
    """
    _check(0.0 <= common_fraction <= 1.0,
           f"common_fraction must be in [0, 1], got {common_fraction}")
    _check_svd(svd)

    def apply(x, ctx):
        _require_matrix(x, "iso_cts")
        return iso_cts_merge(x, _expert_keys(ctx, "iso_cts"), common_fraction, svd)

    return Merge(apply)


def star(eta: float = 40.0) -> Merge:
    """Reduction: STAR, spectral truncation and rescale (Lee et al. 2025, §3), η = 40 %.

    Each task matrix keeps its fewest top singular values reaching η % of Σσ,
    rescaled to the full nuclear norm; Δ = mean over tasks.
    """
    _check(0 < eta <= 100, f"star eta must be in (0, 100], got {eta}")

    def apply(x, ctx):
        _require_matrix(x, "star")
        return expert_sum(jax.vmap(lambda tau: star_matrix(tau, eta))(x)) / x.shape[0]

    return Merge(apply)


def svc(merge: Merge, floor: float = 0.1) -> Merge:
    """Combinator: SVC post-hoc calibration of any merge (METHODS.md §3).

    Matrix leaves: Δ = :func:`svc_calibrate` (merge's Δ, the task vectors, floor);
    other leaves keep the merge's value. ``floor`` α_c = 0.1 (the TA/TIES/DARE
    setting; FusionBench uses 0.2 for ISO-CTS and 1.0 for TSV).
    """
    _check(floor > 0 and math.isfinite(floor), f"svc floor must be > 0, got {floor}")

    def apply(x, ctx):
        delta = merge.apply(x, ctx)
        if not ctx.info.is_matrix:
            return delta
        return svc_calibrate(delta, ctx.taus, floor)

    return merge._replace(apply=apply,
                          rowwise=lambda info: not info.is_matrix and merge.rowwise(info),
                          flat=lambda info: not info.is_matrix and merge.flat(info))


__all__ = [
    "Split",
    "family_scale",
    "head",
    "combine",
    "head_correction",
    "head_correction_weight",
    "head_gram",
    "iso_c",
    "iso_c_merge",
    "iso_cts",
    "iso_cts_merge",
    "iso_cts_ranks",
    "lhc",
    "lhc_gate",
    "residual",
    "spectral_split",
    "split_task_matrices",
    "src_a",
    "src_a_backbone",
    "src_a_weights",
    "star",
    "star_keep_count",
    "star_matrix",
    "svc",
    "svc_calibrate",
    "tsv",
    "tsv_merge",
]
