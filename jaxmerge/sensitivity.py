"""Fisher-aware merge pieces: SAR-Merging (METHODS.md §6) and Fisher merging (§7).

Both read a per-expert sensitivity S_t (the diagonal Fisher of expert t at its
own parameters, ``python -m jaxmerge.fisher``) as the extra input ``"fisher"``:
the executor streams it beside the experts under the same tensor names, and it
arrives as ``ctx.extras["fisher"]: f32[N, *shape]``.

SAR-Merging (Sensitivity-aware Resolving Merging, papers/sar-merging §5):

1. :func:`sar_resolve` (eq. 12–14). For N = 2 (the paper): τ^r = τ_A + τ_B where
   τ_A τ_B ≥ 0 (a sum, not a mean); in the conflict region τ_A τ_B < 0 the delta
   of the expert with the larger S (ties → B). For N ≠ 2 (house generalisation,
   equal to the paper at N = 2 up to sub-ε deltas): at each entry t* = the
   active expert (|τ_t| > ε) with the largest S (ties → the later expert); τ^r =
   the sum of the active deltas whose sign equals sign(τ_t*); no active expert → 0.
2. :func:`private_sparsify` (eq. 15–16): in the private region (exactly one
   expert active), entries whose |τ^r| is below the median |τ^r| of the tensor's
   private entries are dropped with probability p = 0.2 and survivors scaled by
   1/(1 − p); all other entries are kept.
3. θ = θ₀ + λ τ^final, λ = 1.0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmerge.algebra import LeafContext, Merge, rowwise, stats_pass
from jaxmerge.errors import ConfigError
from jaxmerge.ops import (
    expert_count,
    expert_sum,
    high_bin_counts,
    keep_masks,
    kth_smallest_abs,
    low_bin_counts,
    radix_value,
    select_bin,
)

FISHER = "fisher"
"""Name of the per-expert extra input: the diagonal Fisher checkpoints."""

ARBITRATIONS = ("hard", "fisher_weighted")
UPDATE_EPS = 1e-5
FISHER_FLOOR = 1e-6


def _check_epsilon(epsilon: float) -> None:
    if not epsilon >= 0:
        raise ConfigError(f"epsilon must be >= 0, got {epsilon}")


def _fisher(ctx: LeafContext):
    return ctx.extras[FISHER]


def _weighted(taus, weights, include):
    """Σ_t w_t τ_t / Σ_t w_t over ``include``; None where Σ w = 0 (caller falls back)."""
    w = jnp.where(include, weights, 0.0)
    total = expert_sum(w)
    value = expert_sum(w * taus) / jnp.where(total > 0, total, 1.0)
    return value, total > 0


def resolve_pair(taus, sensitivity, arbitration: str = "hard"):
    """SAR's resolve step for two experts (paper eq. 12–14), entrywise.

    ``hard``: τ_A + τ_B where τ_A τ_B ≥ 0, else the delta of the larger S (ties → B).
    ``fisher_weighted``: in the conflict region (S_A τ_A + S_B τ_B)/(S_A + S_B)
    instead (the hard rule where S_A + S_B = 0).
    """
    a, b = taus[0], taus[1]
    conflict = a * b < 0
    hard = jnp.where(sensitivity[0] > sensitivity[1], a, b)
    if arbitration == "fisher_weighted":
        weighted, defined = _weighted(taus, sensitivity, jnp.ones_like(taus, bool))
        hard = jnp.where(defined, weighted, hard)
    return jnp.where(conflict, hard, a + b)


def _last_argmax(values):
    """Index of the largest value along axis 0, the last one on ties."""
    n = values.shape[0]
    flipped = jnp.argmax(values[::-1], axis=0)
    return n - 1 - flipped


def resolve_general(taus, sensitivity, arbitration: str = "hard", epsilon: float = UPDATE_EPS):
    """SAR's resolve step for any N (house generalisation, METHODS.md §6).

    t* = the active expert with the largest S (ties → the later one); τ^r = Σ of
    the active deltas with the sign of τ_t*. ``fisher_weighted``: where the
    active deltas disagree in sign, Σ S_t τ_t / Σ S_t over the active experts.
    """
    n = taus.shape[0]
    active = jnp.abs(taus) > jnp.float32(epsilon)
    ranked = jnp.where(active, sensitivity, -jnp.inf)
    winner = _last_argmax(ranked)
    onehot = jnp.arange(n).reshape((n,) + (1,) * (taus.ndim - 1)) == winner[None]
    winner_sign = jnp.sign(expert_sum(jnp.where(onehot, taus, 0.0)))
    agree = active & (jnp.sign(taus) == winner_sign[None])
    resolved = expert_sum(jnp.where(agree, taus, 0.0))
    if arbitration == "fisher_weighted":
        positive = expert_count(active & (taus > 0))
        negative = expert_count(active & (taus < 0))
        mixed = (positive > 0) & (negative > 0)
        weighted, defined = _weighted(taus, sensitivity, active)
        resolved = jnp.where(mixed & defined, weighted, resolved)
    return resolved


def sar_resolve(arbitration: str = "hard", epsilon: float = UPDATE_EPS) -> Merge:
    """Reduction: stacked task vectors -> τ^r, arbitrated by the experts' Fisher (SAR step 1).

    Args:
      arbitration: ``hard`` (the paper) or ``fisher_weighted`` (conflicts become the
        Fisher-weighted mean of the disagreeing deltas).
      epsilon: |τ| > ε counts as updated (N ≠ 2 rule). Default 1e-5.
    """
    if arbitration not in ARBITRATIONS:
        raise ConfigError(f"arbitration must be one of {ARBITRATIONS}, got {arbitration!r}")
    _check_epsilon(epsilon)

    def apply(x, ctx):
        if x.shape[0] == 2:
            return resolve_pair(x, _fisher(ctx), arbitration)
        return resolve_general(x, _fisher(ctx), arbitration, epsilon)

    return rowwise(apply, extra_inputs=(FISHER,))


def _private_magnitudes(resolved, taus, epsilon):
    """(private mask, |τ^r| at private entries and +inf elsewhere)."""
    private = expert_count(jnp.abs(taus) > jnp.float32(epsilon)) == 1
    return private, jnp.where(private, jnp.abs(resolved), jnp.inf)


def _median_of(lower, upper):
    return jnp.float32(0.5) * (lower + upper)


def private_median(resolved, private):
    """Median of |τ^r| over the private entries (mean of the two middle values for an
    even count, as ``numpy.median``), and whether there is any private entry."""
    count = jnp.sum(private)
    values = jnp.where(private, jnp.abs(resolved), jnp.inf).ravel()
    lower = kth_smallest_abs(values, jnp.maximum((count - 1) // 2, 0))
    upper = kth_smallest_abs(values, jnp.maximum(count // 2, 0))
    return _median_of(lower, upper), count > 0


def _median_passes(epsilon: float):
    """Two per-leaf passes finding the private median exactly by radix select, for
    tensors the executor merges in row blocks (whole tensors select in-call)."""

    def high_partial(resolved, ctx):
        private, values = _private_magnitudes(resolved, ctx.taus, epsilon)
        return {"counts": high_bin_counts(values), "private": jnp.sum(private, dtype=jnp.int32)}

    def high_finalize(total, stats):
        count = int(total["private"])
        ranks = np.array([max((count - 1) // 2, 0), max(count // 2, 0)], np.int64)
        counts = np.asarray(total["counts"], np.int64)
        high, inner = select_bin(np.stack([counts, counts]), ranks, xp=np)
        return {"any": np.bool_(count > 0), "high": high.astype(np.int32),
                "rank": inner.astype(np.float64)}

    high_pass = stats_pass(high_partial, high_finalize, "SAR private median (1/2)", True)

    def low_partial(resolved, ctx):
        _, values = _private_magnitudes(resolved, ctx.taus, epsilon)
        high = jnp.asarray(ctx.stats[high_pass.id]["high"])
        return jnp.stack([low_bin_counts(values, high[0]), low_bin_counts(values, high[1])])

    def low_finalize(total, stats):
        first = stats[high_pass.id]
        low, _ = select_bin(np.asarray(total, np.int64), first["rank"].astype(np.int64), xp=np)
        lower, upper = radix_value(first["high"], low)
        return {"median": np.float32(0.5) * (lower + upper), "any": first["any"]}

    low_pass = stats_pass(low_partial, low_finalize, "SAR private median (2/2)", True)
    return high_pass, low_pass


def private_sparsify(drop_rate: float = 0.2, epsilon: float = UPDATE_EPS) -> Merge:
    """Post step: random drop of the small private entries of τ^r (SAR step 2, eq. 15–16).

    Private = exactly one expert has |τ_t| > ε (from ``ctx.taus``). Private entries
    with |τ^r| below the tensor's private median are dropped with probability
    ``drop_rate`` (0.2) and the survivors scaled by 1/(1 − p); everything else is
    kept. The mask is a pure function of (seed, tensor name, entry position), and
    the median is exact (a radix select: inside the compiled call for a whole
    tensor, two per-leaf statistics passes when the executor splits a tensor into
    row blocks), so the result does not depend on how a tensor is chunked.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate must be in [0, 1), got {drop_rate}")
    _check_epsilon(epsilon)
    keep = 1.0 - drop_rate
    passes = _median_passes(epsilon)

    def apply(resolved, ctx):
        if drop_rate == 0.0:
            return resolved
        private, _ = _private_magnitudes(resolved, ctx.taus, epsilon)
        if passes[1].id in ctx.stats:
            found = ctx.stats[passes[1].id]
            median, any_private = jnp.asarray(found["median"]), jnp.asarray(found["any"])
        else:
            median, any_private = private_median(resolved, private)
        candidate = private & (jnp.abs(resolved) < median) & any_private
        probabilities = jnp.full((1, *resolved.shape), keep, jnp.float32)
        kept = keep_masks(ctx.keys[:1], probabilities, "sar_private", ctx.row_offset)[0]
        return jnp.where(candidate, jnp.where(kept, resolved / jnp.float32(keep), 0.0),
                         resolved)

    return rowwise(apply, passes=passes if drop_rate > 0 else ())


def fisher_weighted_mean(floor: float = FISHER_FLOOR) -> Merge:
    """Reduction: Fisher merging, Δ = Σ_t F̃_t τ_t / Σ_t F̃_t with F̃ = F + floor (§7).

    Matena & Raffel 2022. Equivalent to θ = Σ_t F̃_t θ_t / Σ_t F̃_t; the floor
    (1e-6) keeps entries with zero Fisher at the plain mean.
    """
    if not floor > 0:
        raise ConfigError(f"the Fisher floor must be > 0, got {floor}")

    def apply(x, ctx):
        weights = _fisher(ctx) + jnp.float32(floor)
        return expert_sum(weights * x) / expert_sum(weights)

    return rowwise(apply, extra_inputs=(FISHER,))

