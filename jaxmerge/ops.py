"""Leaf-level building blocks of merge methods (METHODS.md §1, §2, §5).

Every function here returns a :class:`~jaxmerge.algebra.Merge` piece: a pure,
jittable ``(x, ctx) -> y`` step. Transforms map stacked task vectors
``f32[N, *shape]`` to the same shape, reductions map them to ``f32[*shape]``.
Named methods (``jaxmerge.methods``) are chains of these pieces.

Thresholds are exact order statistics on the float32 bit patterns (|x| ≥ 0
orders like its uint32 bits): inside one leaf, a sort of a small leaf's bits, else a
sampled bracket and a bisection of counting passes (:func:`kth_smallest_abs`); over
a leaf merged in row blocks or the whole model, a count of exact zeros and, unless
that settles it, a two-level radix select as two streaming statistics passes
(:func:`high_bin_counts`, :func:`low_bin_counts`).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge import hashing
from jaxmerge.algebra import LeafContext, Merge, requires_experts, rowwise, stats_pass
from jaxmerge.errors import ConfigError

_BINS = 1 << 16


def _salt(label: str) -> int:
    """A stable per-operation salt, so two random pieces in a chain draw independently."""
    return zlib.crc32(label.encode()) & 0x7FFFFFFF


def _expand(values, like):
    """Reshapes per-expert values [N] to broadcast against [N, *shape]."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _per_expert(fn, x):
    """Maps ``fn`` over the expert axis (``vmap``): one batched selection for all N.

    Not ``lax.map``: under the executor's ``vmap`` over leaves, a scan over the
    expert axis makes XLA:CPU transpose the stacked task vectors to put that axis
    first, and the copy, plus fusions it defeats, made a TIES leaf of
    3 × 1536 × 576 take 17 ms instead of 5 ms (jaxlib 0.10).
    """
    return jax.vmap(fn)(x)


def _per_expert_histogram(fn, x):
    """Maps a scatter-add histogram over the expert axis one expert at a time
    (``lax.map``): a batched scatter-add is ~3x slower on XLA:CPU."""
    return jax.lax.map(fn, x)


def expert_sum(x):
    """Σ_t x_t over the leading expert axis of ``x: [N, *shape]``, written as N − 1 adds.

    Same value as ``jnp.sum(x, axis=0)`` (same order), but XLA:CPU compiles a
    reduction over the major axis of a fused operand ~10–100× slower than the
    unrolled adds (measured on jaxlib 0.10: 36 ms vs 0.3 ms for 3 × 1536 × 576).
    """
    total = x[0]
    for t in range(1, x.shape[0]):
        total = total + x[t]
    return total


def expert_count(mask):
    """#{t : mask_t} per entry (``int32``) for a boolean ``mask: bool[N, *shape]``."""
    return expert_sum(mask.astype(jnp.int32))


def _flat(x):
    """[N, *shape] -> [N, size]."""
    return x.reshape(x.shape[0], -1)


def _check_fraction(name: str, value: float, *, low_open=True, high_closed=True) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value <= 1 if high_closed else value < 1
    if not (low_ok and high_ok) or math.isnan(value):
        low = "(0" if low_open else "[0"
        high = "1]" if high_closed else "1)"
        raise ConfigError(f"{name} must be in {low}, {high}, got {value}")


# ---------------------------------------------------------------------------
# Exact order statistics over statistics passes: two-level radix select on float32 bits.


def _bits(x):
    return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.uint32)


def _high_bin(bits):
    """First-level radix bin of |x| bits: 0 for exactly 0, else the top 16 bits + 1.

    Order-preserving (|x| ≤ NaN's 0x7FFFFFFF, so bins stay below 2¹⁵ + 1), and a
    selection landing in bin 0 is exactly 0 with no second level: a sparse task
    vector's TIES threshold (≥ 1 − k of its entries zero, as RL updates are).
    """
    return jnp.where(bits == 0, 0, (bits >> 16).astype(jnp.int32) + 1)


def high_bin_counts(abs_values):
    """Histogram of the first radix level of |x| (:func:`_high_bin`), int32[65536]."""
    return jnp.zeros(_BINS, jnp.int32).at[_high_bin(_bits(abs_values).ravel())].add(1)


def low_bin_counts(abs_values, high_bin):
    """Histogram of the low 16 bits of the entries in first-level bin ``high_bin``."""
    bits = _bits(abs_values).ravel()
    inside = (_high_bin(bits) == high_bin).astype(jnp.int32)
    low = (bits & 0xFFFF).astype(jnp.int32)
    return jnp.zeros(_BINS, jnp.int32).at[low].add(inside)


def radix_value(high_bin, low_bin) -> np.ndarray:
    """The float32 magnitudes of (first-level, second-level) radix bins (host side)."""
    high_bin = np.asarray(high_bin, np.int64)
    bits = ((np.maximum(high_bin - 1, 0) << 16) | np.asarray(low_bin, np.int64))
    return np.where(high_bin == 0, 0, bits).astype(np.uint32).view(np.float32)


def select_bin(counts, rank, xp=jnp):
    """The bin holding the ``rank``-th smallest entry (0-indexed) and the rank inside it.

    ``counts`` is ``[..., bins]`` with one ``rank`` per leading index; ``xp=np`` runs
    the same selection on the host in 64-bit for the statistics passes.
    """
    rank = xp.asarray(rank)
    cumulative = xp.cumsum(counts, axis=-1)
    index = xp.minimum(xp.sum(cumulative <= rank[..., None], axis=-1), counts.shape[-1] - 1)
    below = xp.take_along_axis(cumulative - counts, index[..., None], axis=-1)[..., 0]
    return index, rank - below


# ---------------------------------------------------------------------------
# Exact order statistics inside one leaf. A scatter-add histogram runs at ~90 M entries/s on
# XLA:CPU; a counting pass (compare + sum) at ~7 G/s, so bisecting the 31-bit range
# with counts is ~2x faster than the radix select, and a sample's quantiles usually
# bracket the answer within ~20 bits (or 0: sparse task vectors, threshold 0).

_SAMPLE = 4096  # entries in the bracketing sample
_SAMPLE_SIGMAS = 4.0  # bracket half-width in binomial standard deviations
_INF_BITS = 0x7F800000  # bits of +inf, the largest |x| that is not NaN
# Up to this many entries a leaf's order statistic is read off a full sort: XLA:CPU
# compiles a sort ~0.09 s faster than the bisection's while loop (a program of 61
# norm vectors: 0.12 → 0.035 s); it runs slower (576 entries: 1.4 → 2.7 ms for 183
# vectors; 4096: 6 → 24 ms), a price paid once per chunk of small leaves.
_SORT_SELECT_MAX = 4096


def _abs_bits(x):
    """:func:`_bits` as flat int32 (sign bit clear: they still order like the magnitudes)."""
    return jax.lax.bitcast_convert_type(_bits(x), jnp.int32).ravel()


def sample_positions(size: int) -> np.ndarray:
    """The flat indices of the bracketing sample: ``_SAMPLE`` multiplicative-hash positions,
    spread over rows and columns (a plain stride aliases with the row length)."""
    step = 2654435761 % size or 1
    while math.gcd(step, size) != 1:
        step += 1
    return (np.arange(_SAMPLE, dtype=np.int64) * step) % size


def _bracket(bits, rank):
    """``(lo, hi)``, each ``[B]``: ``lo ≤ answer ≤ hi`` for the ``rank``-th smallest of
    each row of ``bits`` (``[B, size]``).

    From the sample's quantiles ``_SAMPLE_SIGMAS`` standard deviations either side of
    ``rank``; each end is checked with one count and replaced by the full range's end
    (0 or +inf) when the sample misled it, so the bracket is always right, only
    sometimes wide.
    """
    size = bits.shape[1]
    # 0 and +inf, derived from the data: a while-loop carry must vary like the data
    # (inside shard_map a constant carry is rejected). Not jnp.min / jnp.max of the
    # data: those reductions made XLA:CPU re-materialise the bits, 6 → 22 ms per leaf.
    lowest = bits[:, 0] & 0
    highest = lowest | _INF_BITS
    if size <= 4 * _SAMPLE:
        return lowest, highest
    sample = jnp.sort(bits[:, sample_positions(size)], axis=1)
    quantile = (rank.astype(jnp.float32) + 0.5) / size
    margin = _SAMPLE_SIGMAS * jnp.sqrt(_SAMPLE * quantile * (1.0 - quantile)) + 2.0
    centre = quantile * _SAMPLE
    lo = sample[:, jnp.clip(jnp.floor(centre - margin).astype(jnp.int32), 0, _SAMPLE - 1)]
    hi = sample[:, jnp.clip(jnp.ceil(centre + margin).astype(jnp.int32), 0, _SAMPLE - 1)]
    lo = jnp.where(_counts_at_most(bits, lo - 1) <= rank, lo, lowest)
    hi = jnp.where(_counts_at_most(bits, hi) > rank, hi, highest)
    return lo, hi


def _counts_at_most(bits, values):
    """``#{bits[b] ≤ values[b]}`` for each row ``b`` of ``bits`` (``[B, size]``)."""
    return jnp.sum(bits <= values[:, None], axis=1, dtype=jnp.int32)


def kth_smallest_abs(x, rank):
    """The ``rank``-th smallest (0-indexed) |x| over all entries of ``x``, exactly
    (``0 ≤ rank < x.size``; ``rank`` may be traced). See :func:`kth_smallest_abs_rows`."""
    return kth_smallest_abs_rows(x.reshape(1, -1), rank)[0]


def kth_smallest_abs_rows(x, rank):
    """The ``rank``-th smallest (0-indexed) |x| of each ``x[b]`` (all its entries), exactly:
    ``f32[B]`` for ``x: [B, ...]``, one ``rank`` for every row (it may be traced).

    Bisection on the bit patterns inside :func:`_bracket`: the answer is the smallest
    ``v`` with ``#{|x| ≤ v} > rank``. At most 31 counting passes, ~20 on dense task
    vectors, none when the sample brackets a single value (e.g. mostly-zero ones); the
    rows bisect together, one loop (3 dense rows of 884736 entries: 39 ms, where a loop
    per row under ``vmap`` took 54 ms). Rows of at most
    ``_SORT_SELECT_MAX`` entries are sorted instead (cheaper to compile).
    """
    bits = jax.vmap(_abs_bits)(x)
    rank = jnp.asarray(rank, jnp.int32)
    if bits.shape[1] <= _SORT_SELECT_MAX:
        return jax.lax.bitcast_convert_type(jnp.sort(bits, axis=1)[:, rank], jnp.float32)

    def unresolved(bracket):
        lo, hi = bracket
        return jnp.any(lo < hi)

    def halve(bracket):
        lo, hi = bracket
        middle = lo + (hi - lo) // 2
        answer_at_most_middle = _counts_at_most(bits, middle) > rank
        return (jnp.where(answer_at_most_middle, lo, middle + 1),
                jnp.where(answer_at_most_middle, middle, hi))

    lo, _ = jax.lax.while_loop(unresolved, halve, _bracket(bits, rank))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def rank_at_least(x, rank: int):
    """Mask of the entries whose ascending |x| rank is ≥ ``rank`` (0-indexed).

    Ranks are those of a stable sort: equal magnitudes are ordered by flat index,
    which matters on bf16 checkpoints where many |τ| are equal. O(n), no sort.
    """
    magnitude = jnp.abs(x).ravel()
    pivot = kth_smallest_abs(magnitude, rank)
    below = jnp.sum(magnitude < pivot)
    equal = magnitude == pivot
    position_among_equal = jnp.cumsum(equal)
    keep = (magnitude > pivot) | (equal & (position_among_equal > rank - below))
    return keep.reshape(x.shape)


def ties_rank(size: int, density: float) -> int | None:
    """0-indexed rank of the TIES threshold, or None when everything is kept.

    With d entries and n = ⌊d·k⌋, the threshold is the (d − n)-th smallest |τ|
    (1-indexed), as in the official TIES code: entries with |τ| ≥ it survive.
    """
    keep = math.floor(size * density)
    return None if keep >= size else size - keep - 1


# ---------------------------------------------------------------------------
# Transforms: [N, *shape] -> [N, *shape]


def weight_experts(weights) -> Merge:
    """Multiplies expert t's value by ``weights[t]``."""
    weights_array = np.asarray(weights, np.float32)

    def check(num_experts):
        if len(weights_array) != num_experts:
            raise ConfigError(f"got {len(weights_array)} weights for {num_experts} experts")

    def apply(x, ctx):
        return x * _expand(jnp.asarray(weights_array), x)

    return rowwise(apply, check=check, flat=True)


def trim(density: float = 0.2, scope: str = "per_tensor") -> Merge:
    """TIES trim: keeps entries with |τ_t| ≥ the density-quantile threshold of |τ_t|.

    Yadav et al. 2023 (TIES-Merging), METHODS.md §2 step 1. The threshold is the
    (d − ⌊d·k⌋)-th smallest |τ_t| over the scope (d entries). A leaf merged whole finds
    it inside its compiled call; over row blocks or the whole model (``global``) it
    takes statistics passes: a count of the exact zeros, which settles it at 0 when
    more than d − ⌊d·k⌋ entries are zero (RL task vectors: ~98 % zeros), else an exact
    radix select over two more passes. The count is a compare and a sum (the radix's
    first-level scatter-add histogram costs ~10× more an entry), so a sparse embedding
    takes one cheap sweep instead of a histogram's; a dense one, one sweep more.

    Args:
      density: fraction k of entries kept, in (0, 1]. Default 0.2.
      scope: ``per_tensor`` (house default) or ``global`` (the whole model per task).
    """
    _check_fraction("density", density)
    if scope not in ("per_tensor", "global"):
        raise ConfigError(f"scope must be 'per_tensor' or 'global', got {scope!r}")
    per_leaf = scope == "per_tensor"
    label = "TIES threshold" + ("" if per_leaf else " (global)")

    def zero_partial(x, ctx):
        flat = x.reshape(x.shape[0], -1)
        return jnp.stack([jnp.sum(flat == 0, axis=1, dtype=jnp.int32),
                          jnp.full(flat.shape[0], flat.shape[1], jnp.int32)], axis=1)

    def zero_finalize(total, stats):
        return np.asarray(total, np.int64)  # [N, 2]: zero entries, entries

    zero_pass = stats_pass(zero_partial, zero_finalize, f"{label} (zeros)", per_leaf)

    def high_partial(x, ctx):
        return _per_expert_histogram(high_bin_counts, x)

    def first_level(high, inner_rank):
        """The first radix pass's statistic: each threshold's first-level bin and its
        rank inside that bin ("rank" is host bookkeeping: float64 is exact to 2**53
        entries; jit sees float32). Bin 0 is a threshold of exactly 0."""
        return {"high": np.asarray(high, np.int32), "rank": np.asarray(inner_rank, np.float64)}

    def high_settle(stats):
        zeros, entries = stats[zero_pass.id].T
        rank = ties_rank(int(entries[0]), density)
        if rank is None or (zeros > rank).all():  # every threshold is 0 (None: keep all)
            return first_level(np.zeros(len(zeros)), np.full(len(zeros), rank or 0))
        return None

    def high_finalize(total, stats):  # only unsettled: rank is not None
        total = np.asarray(total, np.int64)
        rank = ties_rank(int(total[0].sum()), density)
        return first_level(*select_bin(total, np.full(len(total), rank, np.int64), xp=np))

    high_pass = stats_pass(high_partial, high_finalize, f"{label} (1/2)", per_leaf,
                           high_settle)

    def low_partial(x, ctx):
        high = jnp.asarray(ctx.stats[high_pass.id]["high"])
        return _per_expert_histogram(lambda args: low_bin_counts(*args), (x, high))

    def low_finalize(total, stats):
        first = stats[high_pass.id]
        low, _ = select_bin(np.asarray(total, np.int64), first["rank"].astype(np.int64), xp=np)
        return radix_value(first["high"], low)

    def low_settle(stats):
        first = stats[high_pass.id]
        if not first["high"].any():  # every threshold is exactly 0
            return np.zeros(len(first["high"]), np.float32)
        return None

    low_pass = stats_pass(low_partial, low_finalize, f"{label} (2/2)", per_leaf, low_settle)

    def apply(x, ctx):
        if low_pass.id in ctx.stats:
            thresholds = jnp.asarray(ctx.stats[low_pass.id])
        else:  # a whole leaf: select inside the compiled call, no extra pass
            rank = ties_rank(x[0].size, density)
            if rank is None:
                return x
            thresholds = kth_smallest_abs_rows(x, rank)
        return jnp.where(jnp.abs(x) >= _expand(thresholds, x), x, 0.0)

    return rowwise(apply, passes=(zero_pass, high_pass, low_pass), flat=True)


def _count_sum(signs):
    """Σ of a ±1/0 array as int32, exactly. Summed in float32 when that is exact (at
    most 2²⁴ entries: every partial sum is an integer float32 holds), which XLA:CPU
    reduces with one vectorised kernel; an int32 sum compiles into several."""
    if signs.size <= 2**24:
        return jnp.sum(signs.astype(jnp.float32)).astype(jnp.int32)
    return jnp.sum(signs.astype(jnp.int32))


def elect_sign(scope: str = "per_tensor") -> Merge:
    """TIES elect: keeps the entries whose sign agrees with g = sign(Σ_t τ̂_t).

    METHODS.md §2 step 2. Where g = 0 the majority sign of g over the scope
    (``per_tensor`` or ``global``, a statistics pass) is used; entries that
    disagree become 0. Per tensor the pass is ``in_call``: a call counts the
    majority of the leaves it merges itself, summed over their pieces
    (``ctx.leaf_total``), so DARE-TIES's leaves may be cut into segments that share
    one compiled program, with no statistics pass.
    """
    if scope not in ("per_tensor", "global"):
        raise ConfigError(f"scope must be 'per_tensor' or 'global', got {scope!r}")

    def partial(x, ctx):
        return _count_sum(jnp.sign(expert_sum(x)))

    def finalize(total, stats):
        return np.float32(np.sign(np.asarray(total, np.int64)))

    per_tensor = scope == "per_tensor"
    majority_pass = stats_pass(partial, finalize, f"TIES majority sign ({scope})",
                               per_leaf=per_tensor, in_call=per_tensor)

    def apply(x, ctx):
        g = jnp.sign(expert_sum(x))
        if majority_pass.id in ctx.stats:
            majority = jnp.asarray(ctx.stats[majority_pass.id])
        else:  # the leaf's own majority, from its pieces in this call
            majority = jnp.sign(ctx.leaf_total(_count_sum(g))).astype(g.dtype)
        g = jnp.where(g == 0, majority, g)
        return jnp.where(jnp.sign(x) == g, x, 0.0)

    return rowwise(apply, passes=(majority_pass,), flat=True)


def uniform_bits(key, shape, row_offset=0):
    """24-bit uniform integers ``uint32[*shape]``, a pure function of (key, position).

    The key (per leaf, expert and piece, from :func:`jaxmerge.hashing.fold_in`) seeds a
    counter-based hash of each entry's flat position in the whole leaf:
    ``row_offset · R + e`` for entry ``e`` (row-major) of a block whose rows hold ``R``
    entries each, ``row_offset`` being the block's first row. So an entry's bits are
    the same whether the leaf is merged whole, flattened (``R = 1``), or in row blocks,
    on one device or many. Positions are 64-bit counts (two words), so leaves past 2³²
    entries repeat no bits. About a dozen integer operations an entry: several times
    cheaper than threefry on CPU, and ample for Bernoulli masks (tests/test_random.py).

    Raises:
      ConfigError: a block of 2³² entries or more (blocks stay far below: the budget).
    """
    words = jax.random.key_data(key).astype(jnp.uint32)
    size = math.prod(shape)
    if size >= 2**32:
        raise ConfigError(f"a block of {size} entries is too large for jaxmerge's random "
                          "bits (at most 2**32 - 1); lower the chunk memory budget")
    start_high, start_low = _times_64(row_offset, math.prod(shape[1:]) if shape else 1)
    low = start_low + jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    carried = low < start_low  # the count passed a multiple of 2**32 inside this block
    seed_words = hashing.mix32(jnp.stack([start_high, start_high + jnp.uint32(1)])
                               * jnp.uint32(0x9E3779B9) ^ words[0]) ^ words[1]
    seed = jnp.where(carried, seed_words[1], seed_words[0])
    return hashing.mix32((low * jnp.uint32(0x85EBCA6B)) ^ seed) >> 8


def _times_64(a, b: int):
    """``(high, low)`` uint32 words of the 64-bit product ``a · b``: ``a`` a (traced)
    non-negative int32 scalar, ``b`` a Python int below 2³²; 16-bit limbs, no overflow."""
    a = jnp.asarray(a).astype(jnp.uint32)
    a_low, a_high = a & jnp.uint32(0xFFFF), a >> 16
    b_low, b_high = jnp.uint32(b & 0xFFFF), jnp.uint32(b >> 16)
    low_low, high_high = a_low * b_low, a_high * b_high
    cross = a_low * b_high
    middle = cross + a_high * b_low
    middle_carry = (middle < cross).astype(jnp.uint32)
    low = low_low + (middle << 16)
    low_carry = (low < low_low).astype(jnp.uint32)
    high = high_high + (middle >> 16) + (middle_carry << 16) + low_carry
    return high, low


def keep_masks(keys, probabilities, label: str, row_offset=0):
    """Bernoulli keep-masks ``bool[N, *shape]``, expert t drawn from ``keys[t]``.

    ``probabilities`` is ``f32[N, *shape]``; ``label`` salts the key so different
    random pieces in one chain draw independently. Entry i is kept when its
    24-bit :func:`uniform_bits` value is below ``p_i · 2²⁴``.
    """
    salt = _salt(label)

    def one_expert(key, p):
        bits = uniform_bits(hashing.fold_in(key, salt), p.shape, row_offset)
        return bits.astype(jnp.float32) < p * jnp.float32(1 << 24)

    return jax.vmap(one_expert)(keys, probabilities)


def dare_masks(keys, keep_probability: float, shape, row_offset=0):
    """The DARE keep-masks ``bool[N, *shape]`` for one leaf (see :func:`keep_masks`)."""
    probabilities = jnp.full((keys.shape[0], *shape), keep_probability, jnp.float32)
    return keep_masks(keys, probabilities, "dare", row_offset)


def dare(drop_rate: float = 0.8) -> Merge:
    """DARE drop-and-rescale: τ̃_t = m ⊙ τ_t / (1 − p), m ~ Bernoulli(1 − p).

    Yu et al. 2024, METHODS.md §2. Masks are iid per entry, independent per
    expert and leaf (keys from ``ctx.keys``). p = 1 gives zeros, never NaN.

    Args:
      drop_rate: p in [0, 1]. House default 0.8 (density 0.2).
    """
    _check_fraction("drop_rate", drop_rate, low_open=False)
    keep = 1.0 - drop_rate

    def apply(x, ctx):
        if keep == 0.0:
            return jnp.zeros_like(x)
        masks = dare_masks(ctx.keys, keep, x.shape[1:], ctx.row_offset)
        return jnp.where(masks, x / jnp.float32(keep), 0.0)

    return rowwise(apply, flat=True)  # (masks follow the flat position)


def breadcrumbs_mask(density: float = 0.2, gamma: float = 0.01) -> Merge:
    """Model Breadcrumbs: drops the top γ fraction by |τ| and the smallest, keeping ``density``.

    Davari & Belilovsky 2024, METHODS.md §2. Per tensor per task with n entries:
    n_top = ⌊γn⌋, n_bot = n − ⌊density·n⌋ − n_top (if negative, n_top absorbs it);
    entries whose ascending |τ| rank lies in [n_bot, n − n_top) are kept, so
    n_top = 0 keeps the top (unlike mergekit, which then zeroes the tensor). Equal
    magnitudes are ranked by flat index, as a stable sort would.
    """
    _check_fraction("density", density)
    _check_fraction("gamma", gamma, low_open=False, high_closed=False)

    def apply(x, ctx):
        size = x[0].size
        top = math.floor(gamma * size)
        bottom = size - math.floor(density * size) - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        keep = jnp.ones(x.shape, bool)
        if bottom > 0:
            keep &= _per_expert(lambda v: rank_at_least(v, bottom), x)
        if top > 0:
            keep &= ~_per_expert(lambda v: rank_at_least(v, size - top), x)
        return jnp.where(keep, x, 0.0)

    return Merge(apply, flat=lambda info: True)


def _inverse_permutations(order):
    """The inverse of each row's permutation ``order`` (int[R, L]), by a scatter instead
    of a second ``argsort``: DELLA's probabilities of a 3 × 1536 × 576 leaf took 0.64 s
    with two sorts, 0.37 s with one (XLA:CPU)."""
    rows, length = order.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=order.dtype), order.shape)
    row_index = jnp.broadcast_to(jnp.arange(rows, dtype=order.dtype)[:, None], order.shape)
    return jnp.zeros_like(order).at[row_index, order].set(positions, unique_indices=True)


def della_keep_probabilities(x, density: float, epsilon: float):
    """DELLA MagPrune keep probabilities for one task vector, per row.

    Rows are dim 0 (a 1-D tensor is one row, >2-D tensors are flattened to 2-D).
    Within a row, |τ| ranks are mapped linearly to [density − ε, density + ε];
    rows of length 1 keep with probability ``density``.
    """
    rows = x.reshape(1, -1) if x.ndim < 2 else x.reshape(x.shape[0], -1)
    length = rows.shape[1]
    if length == 1:
        return jnp.full(x.shape, density, jnp.float32)
    # |x| as int32 bits (same order): XLA:CPU sorts integer keys faster than floats
    # (276 → 223 ms for 3 × 1536 × 576).
    order = jnp.argsort(jax.lax.bitcast_convert_type(_bits(rows), jnp.int32), axis=1, stable=True)
    ranks = _inverse_permutations(order)
    normalized = ranks.astype(jnp.float32) / jnp.float32(length - 1)
    probabilities = jnp.float32(density - epsilon) + jnp.float32(2 * epsilon) * normalized
    return probabilities.reshape(x.shape)


def della_mask(density: float = 0.2, epsilon: float = 0.15) -> Merge:
    """DELLA: magnitude-ranked stochastic drop with per-entry rescale 1/p_i.

    Deep et al. 2024, METHODS.md §2. Requires 0 < density − ε and density + ε ≤ 1.
    """
    _check_fraction("density", density)
    if not (0 < density - epsilon and density + epsilon <= 1) or epsilon < 0:
        raise ConfigError(
            f"della needs 0 < density - epsilon and density + epsilon <= 1, "
            f"got density={density}, epsilon={epsilon}"
        )

    def apply(x, ctx):
        probabilities = jax.vmap(della_keep_probabilities, in_axes=(0, None, None))(
            x, density, epsilon
        )
        masks = keep_masks(ctx.keys, probabilities, "della", ctx.row_offset)
        return jnp.where(masks, x / probabilities, 0.0)

    # A 1-D leaf is one row, ranked as a whole: it cannot be split.
    return Merge(apply, rowwise=lambda info: info.ndim >= 2)


def active(epsilon: float = 1e-5) -> Merge:
    """RAM activity mask: entries with |τ| ≤ ε (strict >) become exactly 0 (METHODS.md §5)."""
    if not epsilon >= 0:
        raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
    return rowwise(lambda x, ctx: jnp.where(jnp.abs(x) > jnp.float32(epsilon), x, 0.0),
                   flat=True)


def ram_plus_lambdas(shared, unique, rate, alpha, xp=jnp):
    """λ_t = 1 + r·clip(ρ_t, 0, α) with ρ_t = S_t / U_t (RAM+, METHODS.md §5).

    U_t = 0 gives ρ = α when expert t is active anywhere, and ρ = 0 when it is
    not active at all.
    """
    shared = xp.asarray(shared).astype(xp.float32)
    unique = xp.asarray(unique).astype(xp.float32)
    safe = xp.where(unique > 0, unique, 1.0)
    rho = xp.where(unique > 0, shared / safe, xp.where(shared > 0, alpha, 0.0))
    return (1.0 + rate * xp.clip(rho, 0.0, alpha)).astype(xp.float32)


def _shared_unique_counts(x):
    """Per expert: (# active entries shared with another expert, # unique to it)."""
    is_active = x != 0
    count = expert_count(is_active)
    shared = jnp.sum(_flat(is_active & (count >= 2)), axis=1)
    unique = jnp.sum(_flat(is_active & (count == 1)), axis=1)
    return shared.astype(jnp.int32), unique.astype(jnp.int32)


def boost_unique(rate: float = 0.1, alpha: float = 2.0, scope: str = "global") -> Merge:
    """RAM+ rescale: multiplies entries active in exactly one expert by that expert's λ_t.

    Expects zeros at inactive entries (apply :func:`active` first). ρ_t counts
    over the whole model (``global``, the paper, two-pass) or per tensor
    (``per_tensor``, mergekit's ``ramplus_tl``).
    """
    if not (rate >= 0 and alpha >= 0):
        raise ConfigError(f"RAM+ needs r >= 0 and alpha >= 0, got r={rate}, alpha={alpha}")
    if scope not in ("per_tensor", "global"):
        raise ConfigError(f"scope must be 'per_tensor' or 'global', got {scope!r}")

    def boosted(x, lambdas):
        unique = (x != 0) & (expert_count(x != 0) == 1)
        return jnp.where(unique, x * _expand(lambdas, x), x)

    def partial(x, ctx):
        return jnp.stack(_shared_unique_counts(x), axis=1)

    def finalize(total, stats):
        total = np.asarray(total, np.int64)
        return ram_plus_lambdas(total[:, 0], total[:, 1], rate, alpha, xp=np)

    counts_pass = stats_pass(partial, finalize, f"RAM+ shared/unique counts ({scope})",
                             per_leaf=scope == "per_tensor")

    def apply(x, ctx):
        if counts_pass.id in ctx.stats:
            return boosted(x, jnp.asarray(ctx.stats[counts_pass.id]))
        return boosted(x, ram_plus_lambdas(*_shared_unique_counts(x), rate, alpha))

    return rowwise(apply, passes=(counts_pass,), flat=True)


# ---------------------------------------------------------------------------
# Reductions: [N, *shape] -> [*shape]


def mean() -> Merge:
    """Δ = (1/N) Σ_t x_t."""
    return rowwise(lambda x, ctx: expert_sum(x) / jnp.float32(x.shape[0]), flat=True)


def sum_experts() -> Merge:
    """Δ = Σ_t x_t."""
    return rowwise(lambda x, ctx: expert_sum(x), flat=True)


def weighted_mean(weights=None) -> Merge:
    """Δ = Σ_t w_t x_t / Σ_t w_t (weights default to 1: the model soup)."""

    def apply(x, ctx):
        w = jnp.ones(x.shape[0], jnp.float32) if weights is None else jnp.asarray(
            weights, jnp.float32)
        return expert_sum(x * _expand(w, x)) / jnp.sum(w)

    merge = rowwise(apply, flat=True)
    if weights is not None:
        if not np.isfinite(np.sum(weights)) or np.sum(weights) == 0:
            raise ConfigError(f"weights must have a non-zero finite sum, got {list(weights)}")
        merge = merge._replace(check=weight_experts(weights).check)
    return merge


def disjoint_mean() -> Merge:
    """Mean over the non-zero entries only: Σ_t x_t / max(#{t: x_t ≠ 0}, 1).

    The TIES disjoint merge after :func:`elect_sign` (METHODS.md §2 step 3), and
    the RAM average after :func:`active` (§5).
    """

    def apply(x, ctx):
        count = expert_count(x != 0).astype(jnp.float32)
        return expert_sum(x) / jnp.maximum(count, 1.0)

    return rowwise(apply, flat=True)


def _cosine(a, b):
    """cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖ + 1e-8) on flattened tensors (METHODS.md §0)."""
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-8)


def model_stock_reduce() -> Merge:
    """Model Stock (Jang et al. 2024, METHODS.md §1): Δ = τ·mean_t τ_t.

    cosθ = mean pairwise cosine of the task vectors, clipped to [−1, 1];
    τ = N cosθ / (1 + (N − 1) cosθ) clamped to [0, 1]. With N = 1 there are no
    pairs; cosθ := 1, so the result is the expert itself.
    """

    def apply(x, ctx):
        n = x.shape[0]
        if n == 1:
            return x[0]
        flat = _flat(x)
        pairs = [(s, t) for s in range(n) for t in range(s + 1, n)]
        cos = jnp.mean(jnp.stack([_cosine(flat[s], flat[t]) for s, t in pairs]))
        cos = jnp.clip(cos, -1.0, 1.0)
        denominator = 1.0 + (n - 1) * cos
        ratio = jnp.where(denominator > 0, n * cos / jnp.where(denominator > 0, denominator,
                                                               1.0), 0.0)
        return jnp.clip(ratio, 0.0, 1.0) * (expert_sum(x) / jnp.float32(n))

    return Merge(apply)


def slerp_reduce(t: float = 0.5) -> Merge:
    """Spherical interpolation between two models (METHODS.md §1), flattened per leaf.

    One expert: v₀ = base, v₁ = the expert. Two experts: v₀, v₁ = the experts.
    Vectors with norm ≤ 1e-8 stay unnormalised; |d| > 0.9995 falls back to lerp.
    """
    if not 0 <= t <= 1:
        raise ConfigError(f"slerp t must be in [0, 1], got {t}")

    def normalized(v):
        norm = jnp.linalg.norm(v)
        return jnp.where(norm > 1e-8, v / jnp.where(norm > 1e-8, norm, 1.0), v)

    def apply(x, ctx):
        base = ctx.base
        v0, v1 = (base, base + x[0]) if x.shape[0] == 1 else (base + x[0], base + x[1])
        dot = jnp.vdot(normalized(v0.ravel()), normalized(v1.ravel()))
        lerp = (1 - t) * v0 + t * v1
        omega = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
        sin_omega = jnp.sin(omega)
        safe_sin = jnp.where(jnp.abs(dot) > 0.9995, 1.0, sin_omega)
        spherical = (jnp.sin((1 - t) * omega) * v0 + jnp.sin(t * omega) * v1) / safe_sin
        return jnp.where(jnp.abs(dot) > 0.9995, lerp, spherical) - base

    return requires_experts(
        Merge(apply), lambda n: n in (1, 2),
        "slerp interpolates exactly 2 models (the base and 1 expert, or 2 experts); "
        "got {n} experts")


__all__ = [
    "LeafContext",
    "active",
    "boost_unique",
    "breadcrumbs_mask",
    "dare",
    "dare_masks",
    "della_keep_probabilities",
    "della_mask",
    "disjoint_mean",
    "elect_sign",
    "expert_count",
    "expert_sum",
    "keep_masks",
    "kth_smallest_abs",
    "kth_smallest_abs_rows",
    "rank_at_least",
    "mean",
    "model_stock_reduce",
    "ram_plus_lambdas",
    "slerp_reduce",
    "sum_experts",
    "ties_rank",
    "trim",
    "uniform_bits",
    "weight_experts",
    "weighted_mean",
]
