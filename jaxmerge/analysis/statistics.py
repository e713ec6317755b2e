"""Per-tensor measurements of task vectors: the papers' diagnostics, as pure leaf functions.

Each function takes one leaf's stacked task vectors ``τ: f32[N, *shape]`` and
returns a dict of small arrays. They are jitted and ``vmap``-ed over same-shape
tensors by the executor, exactly like merge methods (:meth:`Executor.measure`).

- :func:`update_statistics` (any floating tensor, row-splittable: every value is
  a sum over entries): update counts (sparsity, SAR-Merging §4.2 and Table 1),
  the Gram matrix of the task vectors (layer-wise cosine, SAR-Merging Fig. 3),
  and the conflict / overlap / private / unchanged regions of every pair and of
  all N experts (SAR-Merging §5, Fig. 6–7).
- :func:`spectral_statistics` (matrix leaves): energy share of the top singular
  values, stable and effective rank before and after removing the rank-k head
  (ResMerge §5.4, Fig. 4), and the head/residual geometry of ResMerge §5.5, A.3
  and A.4: pairwise cosines of heads and of residuals, head agreement S_H,
  residual spherical coherence c_R and the mean retention of heads and residuals.

Definitions (the constants are the papers'):

- An entry is *updated* (active) when |τ_t,i| > ε, ε = 1e-5, on the float32
  upcast of the stored values (METHODS.md §5, §8). Update sparsity = the fraction
  of entries that are not updated.
- Regions of a pair (s, t), a partition of the entries: *conflict* = both
  updated with opposite signs; *overlap* = both updated with the same sign (the
  non-conflicting overlap); *private* = exactly one updated; *unchanged* = neither.
  For all N experts: conflict = at least two updated and the signs disagree,
  overlap = at least two updated and they agree, private = exactly one updated.
  Sub-ε deltas count as not updated here (SAR-Merging's resolve rule, by
  contrast, compares raw signs).
- Singular values σ_1 ≥ σ_2 ≥ ... of τ_t. Energy share of the top k:
  Σ_{i≤k} σ_i² / Σ_i σ_i². Stable rank: Σ_i σ_i² / σ_1². Effective rank:
  exp(−Σ_i p_i log p_i), p_i = σ_i / Σ_j σ_j. "After the head": the same on the
  residual spectrum σ_{k+1}, σ_{k+2}, ... A zero spectrum gives 0 for all three.
- Heads H_t = top-k SVD part of τ_t, residuals R_t = τ_t − H_t (as ResMerge
  splits them). cos(a, b) = ⟨a, b⟩/(‖a‖‖b‖ + 1e-8). S_H and c_R exactly as
  ResMerge's LHC gate and SRC-A compute them (METHODS.md §4). Mean retention of
  X ∈ {H, R} (ResMerge eq. 17): ‖(1/N) Σ_t X_t‖ / ((1/N) Σ_t ‖X_t‖), 0 when all
  X_t are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmerge import linalg, spectral
from jaxmerge.errors import ConfigError

Array = jax.Array

UPDATE_EPS = 1e-5
"""|τ| > ε counts as updated (SAR-Merging Table 1, RAM; METHODS.md §5)."""

ENERGY_RANKS = (1, 4, 16)
"""Default k of the top-k energy shares reported."""

RETENTION_EPS = 1e-8
"""Mean retention is 0 when (1/N) Σ_t ‖X_t‖ is at most this."""


def _count(mask: Array) -> Array:
    return jnp.sum(mask, dtype=jnp.int32)


def pair_indices(num_experts: int) -> list[tuple[int, int]]:
    """The pairs (s, t), s < t, in the order every pairwise statistic lists them."""
    return [(s, t) for s in range(num_experts) for t in range(s + 1, num_experts)]


def update_statistics(taus: Array, eps: float = UPDATE_EPS) -> dict[str, Array]:
    """Counts and inner products of one tensor's task vectors ``f32[N, *shape]``.

    Every value is a sum over entries, so row blocks of a tensor add up to the
    whole tensor's value.

    Returns:
      entries: number of entries (int32 scalar).
      updated: ``int32[N]``, entries with |τ_t| > eps.
      gram: ``f32[N, N]``, ⟨τ_s, τ_t⟩ (diagonal: ‖τ_t‖²).
      pair_conflict, pair_overlap: ``int32[P]`` for the pairs of
        :func:`pair_indices`: both updated with opposite / equal signs.
      regions: ``int32[4]``: unchanged, private, overlap, conflict over all N.
      private: ``int32[N]``: entries updated by expert t alone.
      shared_by: ``int32[N + 1]``: entries updated by exactly c experts, c = 0..N.
    """
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    updated = jnp.abs(flat) > eps
    positive = updated & (flat > 0)
    negative = updated & (flat < 0)
    pairs = pair_indices(n)
    conflict = [_count((positive[s] & negative[t]) | (negative[s] & positive[t]))
                for s, t in pairs]
    overlap = [_count((positive[s] & positive[t]) | (negative[s] & negative[t]))
               for s, t in pairs]
    active = sum(updated[t].astype(jnp.int32) for t in range(n))
    num_positive = sum(positive[t].astype(jnp.int32) for t in range(n))
    num_negative = sum(negative[t].astype(jnp.int32) for t in range(n))
    disagree = (num_positive > 0) & (num_negative > 0)
    regions = jnp.stack([
        _count(active == 0),
        _count(active == 1),
        _count((active >= 2) & ~disagree),
        _count(disagree),
    ])
    return {
        "entries": jnp.int32(flat.shape[1]),
        "updated": jnp.sum(updated, axis=1, dtype=jnp.int32),
        "gram": linalg.gram(flat),
        "pair_conflict": jnp.stack(conflict) if pairs else jnp.zeros((0,), jnp.int32),
        "pair_overlap": jnp.stack(overlap) if pairs else jnp.zeros((0,), jnp.int32),
        "regions": regions,
        "private": jnp.stack([_count(updated[t] & (active == 1)) for t in range(n)]),
        "shared_by": jnp.stack([_count(active == c) for c in range(n + 1)]),
    }


REGIONS = ("unchanged", "private", "overlap", "conflict")
"""The region names, in the order of ``update_statistics(...)["regions"]``."""


def region_stats(taus: Array, eps: float = UPDATE_EPS) -> dict[str, Array]:
    """Fractions of one tensor's entries in SAR-Merging's regions (METHODS.md §6).

    A partition over all N experts of ``taus`` ``f32[N, *shape]``, an entry counting as
    updated by expert t when |τ_t| > ``eps`` (default 1e-5): *unchanged* (no expert),
    *private* (exactly one), *overlap* (two or more, all of one sign), *conflict* (two or
    more, signs disagreeing). For N = 2 these are the paper's regions. Jittable; the four
    fractions sum to 1.
    """
    counts = update_statistics(taus, eps)["regions"]
    total = jnp.maximum(jnp.sum(counts), 1).astype(jnp.float32)
    return {name: counts[i].astype(jnp.float32) / total for i, name in enumerate(REGIONS)}


def spectrum_summary(sigma: Array, energy_ranks=ENERGY_RANKS) -> dict[str, Array]:
    """Energy shares of the top-k (one per k in ``energy_ranks``), stable and effective
    rank of one descending spectrum ``sigma: f32[r]``; all 0 for a zero spectrum."""
    energy = jnp.square(sigma)
    total = jnp.sum(energy)
    nonzero = total > 0
    safe_total = jnp.where(nonzero, total, 1.0)
    cumulative = jnp.cumsum(energy)
    shares = jnp.stack([cumulative[min(k, sigma.shape[0]) - 1] if sigma.shape[0] else 0.0
                        for k in energy_ranks]) / safe_total
    top = jnp.where(nonzero, energy[0], 1.0) if sigma.shape[0] else jnp.float32(1.0)
    stable = total / top
    weights = sigma / jnp.where(nonzero, jnp.sum(sigma), 1.0)
    entropy = -jnp.sum(jnp.where(weights > 0, weights * jnp.log(jnp.where(weights > 0,
                                                                           weights, 1.0)), 0.0))
    return {
        "energy_share": jnp.where(nonzero, shares, 0.0),
        "stable_rank": jnp.where(nonzero, stable, 0.0),
        "effective_rank": jnp.where(nonzero, jnp.exp(entropy), 0.0),
    }


def cosines(gram: Array) -> Array:
    """cos(x_s, x_t) = G_st / (‖x_s‖‖x_t‖ + 1e-8) from the Gram matrix, ``f32[N, N]``."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    return gram / (norms[:, None] * norms[None, :] + linalg.COS_EPS)


def mean_retention(gram: Array) -> Array:
    """‖(1/N) Σ_t X_t‖ / ((1/N) Σ_t ‖X_t‖) from the Gram matrix (ResMerge eq. 17)."""
    n = gram.shape[0]
    mean_norm = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0)))
    norm_of_mean = jnp.sqrt(jnp.maximum(jnp.sum(gram), 0.0)) / n
    return jnp.where(mean_norm > RETENTION_EPS,
                     norm_of_mean / jnp.where(mean_norm > RETENTION_EPS, mean_norm, 1.0), 0.0)


def _pair_values(matrix: Array) -> Array:
    pairs = pair_indices(matrix.shape[0])
    if not pairs:
        return jnp.zeros((0,), matrix.dtype)
    return jnp.stack([matrix[s, t] for s, t in pairs])


def spectral_statistics(taus: Array, keys: Array, head_rank: int = 1,
                        energy_ranks=ENERGY_RANKS, svd: str = "auto") -> dict[str, Array]:
    """Spectral structure and head/residual geometry of stacked task matrices ``f32[N, m, n]``.

    The spectra are exact (all singular values); the heads come from ResMerge's
    own split (:func:`jaxmerge.spectral.split_task_matrices`, top-``head_rank``
    SVD, randomised or exact per ``svd``).

    Returns:
      before, after: dicts of :func:`spectrum_summary` values per expert
        (``energy_share: f32[N, K]``, ``stable_rank``, ``effective_rank: f32[N]``),
        of σ and of the residual spectrum σ_{k+1}, ... .
      head_cos, residual_cos: ``f32[P]`` pairwise cosines of heads / residuals.
      head_agreement: S_H (LHC's positive-mean gate); residual_coherence: c_R;
      residual_pair_cos: s_R (SRC-A's mean pairwise cosine of the q_t).
      head_retention, residual_retention: mean retention of H and of R.
      head_norm, residual_norm: ``f32[N]``, ‖H_t‖ and ‖R_t‖.
    """
    if taus.ndim != 3:
        raise ConfigError(f"spectral statistics need stacked matrices, got shape {taus.shape}")
    if head_rank < 1:
        raise ConfigError(f"head_rank must be at least 1, got {head_rank}")
    if not energy_ranks or min(energy_ranks) < 1:
        raise ConfigError(f"energy ranks must be positive integers, got {energy_ranks}")
    rank = min(head_rank, *taus.shape[-2:])
    sigma = linalg.singular_values(taus)
    before = jax.vmap(lambda s: spectrum_summary(s, energy_ranks))(sigma)
    after = jax.vmap(lambda s: spectrum_summary(s, energy_ranks))(sigma[:, rank:])
    split = spectral.split_task_matrices(taus, rank, keys, svd=svd)
    head_gram = spectral.head_gram(split.head)
    residual_gram = linalg.gram(split.residual)
    consensus = spectral.spherical_consensus(residual_gram)
    return {
        "before": before,
        "after": after,
        "head_cos": _pair_values(cosines(head_gram)),
        "residual_cos": _pair_values(cosines(residual_gram)),
        "head_agreement": spectral.lhc_gate(head_gram),
        "residual_coherence": consensus.coherence,
        "residual_pair_cos": consensus.pair_cos,
        "head_retention": mean_retention(head_gram),
        "residual_retention": mean_retention(residual_gram),
        "head_norm": jnp.sqrt(jnp.maximum(jnp.diagonal(head_gram), 0.0)),
        "residual_norm": jnp.sqrt(jnp.maximum(jnp.diagonal(residual_gram), 0.0)),
    }
