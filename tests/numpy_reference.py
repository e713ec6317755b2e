"""Independent float64 NumPy reference implementation of the merge methods in METHODS.md.

This module is the golden-value oracle for the ``jaxmerge`` tests. It deliberately imports nothing
from ``jaxmerge``: it is written from ``METHODS.md`` (§0, §1, §2, §5) alone, with the edge-case
notes of ``reference/baselines-notes.md`` where METHODS.md is silent.

Conventions (shared by every function):

- ``taus`` is an array ``[N, *shape]`` holding the task vectors τ_t = θ_t − θ₀ of ONE tensor
  (leaf); ``base`` is θ₀ with shape ``[*shape]``.
- Every method returns the merged task vector Δ (float64, shape ``[*shape]``), so θ = θ₀ + Δ.
  Methods that act on several tensors at once (``ties_global``, ``ram_plus``) take and return
  lists.
- All math is float64, whatever dtype is passed in (``np.asarray(x, np.float64)``).
- Random methods (DARE family, DELLA) take their keep masks explicitly, so the tests can feed in
  the masks the library drew and compare the deterministic remainder exactly.

Clarity over speed: the arrays in the tests are small, so plain loops are used where they make the
math obvious.
"""

import math

import numpy as np

COS_EPS = 1e-8  # §0: cos(a, b) = <a, b> / (|a||b| + 1e-8)
SLERP_NORM_EPS = 1e-8  # §1 slerp: leave v unnormalised if |v| <= 1e-8
SLERP_DOT_THRESHOLD = 0.9995  # §1 slerp: |d| > 0.9995 -> lerp
RAM_EPS = 1e-5  # §5: active mask |tau| > 1e-5 (strict)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _f64(x):
    """Return ``x`` as a float64 ndarray (always a fresh array, never a view of the input)."""
    return np.array(x, dtype=np.float64, copy=True)


def _as_taus(taus):
    """Cast a stack of task vectors ``[N, *shape]`` to float64 and check N >= 1 (§0)."""
    taus = _f64(taus)
    if taus.ndim < 1 or taus.shape[0] < 1:
        raise ValueError("taus must have a leading expert axis with N >= 1")
    return taus


def cos(a, b):
    """cos(a, b) = <a, b> / (|a| |b| + 1e-8) on the flattened tensors (METHODS.md §0)."""
    a = _f64(a).ravel()
    b = _f64(b).ravel()
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + COS_EPS))


def mean_pairwise_cos(taus):
    """Mean of cos(τ_s, τ_t) over the pairs s < t (METHODS.md §1 model_stock).

    Returns ``None`` when N < 2 (no pairs); the caller decides what that means.
    """
    taus = _as_taus(taus)
    n = taus.shape[0]
    values = []
    for s in range(n):
        for t in range(s + 1, n):
            values.append(cos(taus[s], taus[t]))
    if not values:
        return None
    return float(np.mean(values))


def majority_sign(g):
    """sign(Σ g) over a scope: the tie-break sign of TIES election (METHODS.md §2 ties step 2).

    ``g`` is the array (or a list of arrays, for a multi-tensor scope) of elected signs before
    tie-breaking. The result is -1.0, 0.0 or +1.0 and may itself be 0.
    """
    if isinstance(g, (list, tuple)):
        total = sum(float(np.sum(_f64(x))) for x in g)
    else:
        total = float(np.sum(_f64(g)))
    return float(np.sign(total))


def _stable_ranks(values):
    """Ascending ranks 0..n-1 of a 1-D array; equal values are ranked by position (stable)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.shape[0], dtype=np.int64)
    ranks[order] = np.arange(values.shape[0])
    return ranks


# ---------------------------------------------------------------------------------------------
# §1 Averaging family
# ---------------------------------------------------------------------------------------------


def linear(taus, weights=None):
    """Model soup: Δ = Σ_t w_t τ_t / Σ_t w_t, weights default 1 (METHODS.md §1 linear).

    Raises ValueError if the weights sum to 0 (the normalisation is undefined).
    """
    taus = _as_taus(taus)
    n = taus.shape[0]
    w = np.ones(n) if weights is None else _f64(weights).reshape(n)
    total_w = float(np.sum(w))
    if total_w == 0.0:
        raise ValueError("linear: the weights sum to 0")
    delta = np.zeros(taus.shape[1:])
    for t in range(n):
        delta += w[t] * taus[t]
    return delta / total_w


def task_arithmetic(taus, scale=1.0, weights=None):
    """Task arithmetic: Δ = λ Σ_t w_t τ_t, λ = ``scale`` default 1.0, w default 1 (§1)."""
    taus = _as_taus(taus)
    n = taus.shape[0]
    w = np.ones(n) if weights is None else _f64(weights).reshape(n)
    delta = np.zeros(taus.shape[1:])
    for t in range(n):
        delta += w[t] * taus[t]
    return float(scale) * delta


def slerp(base, taus, t=0.5):
    """Spherical interpolation of two models, per tensor, flattened (METHODS.md §1 slerp).

    N = 1: v0 = θ₀, v1 = θ₀ + τ_1.  N = 2: v0 = θ₀ + τ_1, v1 = θ₀ + τ_2 (the base itself is not
    interpolated then). v̂ = v/|v| unless |v| <= 1e-8 (then v̂ = v); d = <v̂0, v̂1>; if |d| > 0.9995
    the result is the lerp (1−t) v0 + t v1, else with Ω = arccos d it is
    sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1 on the unnormalised tensors. Returns result − θ₀.
    """
    base = _f64(base)
    taus = _as_taus(taus)
    n = taus.shape[0]
    if taus.shape[1:] != base.shape:
        raise ValueError("slerp: taus must have shape [N, *base.shape]")
    if n == 1:
        v0 = base.ravel()
        v1 = (base + taus[0]).ravel()
    elif n == 2:
        v0 = (base + taus[0]).ravel()
        v1 = (base + taus[1]).ravel()
    else:
        raise ValueError("slerp needs exactly 2 models (base + 1 expert, or 2 experts)")
    t = float(t)

    def _normalise(v):
        norm = np.linalg.norm(v)
        return v if norm <= SLERP_NORM_EPS else v / norm

    d = float(np.dot(_normalise(v0), _normalise(v1)))
    if abs(d) > SLERP_DOT_THRESHOLD:
        result = (1.0 - t) * v0 + t * v1
    else:
        omega = math.acos(d)  # |d| <= 0.9995 here, so acos is defined and sin(omega) > 0
        sin_omega = math.sin(omega)
        c0 = math.sin((1.0 - t) * omega) / sin_omega
        c1 = math.sin(t * omega) / sin_omega
        result = c0 * v0 + c1 * v1
    return result.reshape(base.shape) - base


def model_stock_ratio(taus):
    """The Model Stock interpolation ratio τ (METHODS.md §1 model_stock).

    cosθ = mean over pairs s < t of cos(τ_s, τ_t), clipped to [−1, 1]; N = 1 gives cosθ := 1
    (house choice: the single expert is returned). τ = N cosθ / (1 + (N−1) cosθ) clamped to [0, 1].
    If 1 + (N−1) cosθ <= 0 the ratio is taken as 0 (that happens only for cosθ < 0, where the
    ratio is already clamped to 0 when the denominator is positive) and no division is done.
    """
    taus = _as_taus(taus)
    n = taus.shape[0]
    cos_theta = mean_pairwise_cos(taus)
    cos_theta = 1.0 if cos_theta is None else float(np.clip(cos_theta, -1.0, 1.0))
    denominator = 1.0 + (n - 1) * cos_theta
    if denominator <= 0.0:
        return 0.0
    return float(np.clip(n * cos_theta / denominator, 0.0, 1.0))


def model_stock(taus):
    """Model Stock: θ = τ·mean_t θ_t + (1−τ)·θ₀, i.e. Δ = τ · mean_t τ_t (METHODS.md §1)."""
    taus = _as_taus(taus)
    return model_stock_ratio(taus) * np.mean(taus, axis=0)


# ---------------------------------------------------------------------------------------------
# §2 TIES
# ---------------------------------------------------------------------------------------------


def ties_threshold(values_abs_flat, density):
    """TIES trim threshold of one task over one scope (METHODS.md §2 ties step 1).

    d = number of values, n = floor(d · density). If n >= d every entry is kept (returns −inf).
    Otherwise the threshold is the (d − n)-th smallest value (1-indexed), ``sort(x)[d − n − 1]``,
    as the official TIES code's ``kthvalue``; the kept set |τ| >= threshold then has n + 1
    entries (more with ties). n = 0 keeps the maximum entry (and its ties).
    """
    x = np.sort(_f64(values_abs_flat).ravel())
    d = x.shape[0]
    n = math.floor(d * float(density))
    if d == 0 or n >= d:
        return -math.inf
    return float(x[d - n - 1])


def ties_trim(taus, density):
    """Trim every task of one tensor: τ̂_t = τ_t where |τ_t| >= threshold_t, else 0 (§2 step 1).

    The threshold is per task over this tensor (``per_tensor`` scope).
    """
    taus = _as_taus(taus)
    trimmed = np.zeros_like(taus)
    for t in range(taus.shape[0]):
        h = ties_threshold(np.abs(taus[t]), density)
        trimmed[t] = np.where(np.abs(taus[t]) >= h, taus[t], 0.0)
    return trimmed


def elected_sign(trimmed):
    """g = sign(Σ_t τ̂_t), elementwise, before the zero tie-break (METHODS.md §2 ties step 2)."""
    return np.sign(np.sum(_as_taus(trimmed), axis=0))


def elect_disjoint(trimmed, aggregation="mean", majority_scope_sum=None):
    """Sign election plus disjoint merge of one tensor (METHODS.md §2 ties steps 2-3; no λ).

    g = sign(Σ_t τ̂_t); where g = 0 it is replaced by the majority sign sign(Σ_scope g) (may
    itself be 0). ``majority_scope_sum`` is Σ g over the scope (before tie-breaking); ``None``
    means the scope is this tensor. Then Δ_i = Σ_{t: τ̂_t,i ≠ 0, sign(τ̂_t,i) = g_i} τ̂_t,i,
    divided by max(count, 1) for ``aggregation="mean"`` and not divided for ``"sum"``.
    """
    if aggregation not in ("mean", "sum"):
        raise ValueError(f"unknown aggregation {aggregation!r}")
    trimmed = _as_taus(trimmed)
    g = elected_sign(trimmed)
    if majority_scope_sum is None:
        majority_scope_sum = float(np.sum(g))
    g = np.where(g == 0, np.sign(float(majority_scope_sum)), g)

    total = np.zeros(trimmed.shape[1:])
    count = np.zeros(trimmed.shape[1:])
    for t in range(trimmed.shape[0]):
        agree = (trimmed[t] != 0) & (np.sign(trimmed[t]) == g)
        total += np.where(agree, trimmed[t], 0.0)
        count += agree
    if aggregation == "sum":
        return total
    return total / np.maximum(count, 1.0)


def ties(taus, density=0.2, scale=1.0, aggregation="mean", scope="per_tensor"):
    """TIES-merging of one tensor: trim → elect → disjoint mean → ×λ (METHODS.md §2 ties).

    With a single tensor the ``global`` scope is the same set of entries as ``per_tensor``; use
    ``ties_global`` for a whole model.
    """
    if scope not in ("per_tensor", "global"):
        raise ValueError(f"unknown scope {scope!r}")
    trimmed = ties_trim(taus, density)
    return float(scale) * elect_disjoint(trimmed, aggregation)


def ties_global(list_of_taus, density=0.2, scale=1.0, aggregation="mean"):
    """TIES with the ``global`` scope over several tensors of one model (METHODS.md §2 ties).

    ``list_of_taus[j]`` is ``[N, *shape_j]``. The trim threshold of task t is computed over the
    concatenation of |τ_t| of all tensors, and the zero tie-break sign is sign(Σ g) over all
    tensors. Returns the list of Δ_j.
    """
    tensors = [_as_taus(x) for x in list_of_taus]
    if not tensors:
        return []
    n = tensors[0].shape[0]
    if any(x.shape[0] != n for x in tensors):
        raise ValueError("every tensor needs the same number of experts")

    trimmed = [np.zeros_like(x) for x in tensors]
    for t in range(n):
        flat = np.concatenate([np.abs(x[t]).ravel() for x in tensors])
        h = ties_threshold(flat, density)
        for j, x in enumerate(tensors):
            trimmed[j][t] = np.where(np.abs(x[t]) >= h, x[t], 0.0)

    scope_sum = sum(float(np.sum(elected_sign(x))) for x in trimmed)
    return [
        float(scale) * elect_disjoint(x, aggregation, majority_scope_sum=scope_sum) for x in trimmed
    ]


# ---------------------------------------------------------------------------------------------
# §2 DARE family
# ---------------------------------------------------------------------------------------------


def dare(taus, keep_masks, p):
    """Drop and rescale: τ̃_t = m_t ⊙ τ_t / (1 − p) (METHODS.md §2 dare).

    ``keep_masks`` is ``[N, *shape]`` (True/1 = kept). p = 1 gives zeros (no NaN).
    """
    taus = _as_taus(taus)
    masks = np.asarray(keep_masks).astype(bool)
    if masks.shape != taus.shape:
        raise ValueError("keep_masks must have the shape of taus")
    p = float(p)
    if p >= 1.0:
        return np.zeros_like(taus)
    return np.where(masks, taus, 0.0) / (1.0 - p)


def dare_linear(taus, keep_masks, p=0.8, scale=1.0):
    """DARE + task arithmetic: Δ = λ Σ_t τ̃_t (METHODS.md §2 dare_linear)."""
    return task_arithmetic(dare(taus, keep_masks, p), scale=scale)


def dare_ties(taus, keep_masks, p=0.8, scale=1.0, trim_density=None, aggregation="mean"):
    """DARE + TIES: τ̃ → (optional TIES trim) → elect → disjoint mean → ×λ (METHODS.md §2).

    ``trim_density=None`` (house default) skips the magnitude trim; a number trims τ̃ per task
    with ``ties_trim`` first. The majority-sign scope is this tensor.
    """
    dropped = dare(taus, keep_masks, p)
    if trim_density is not None:
        dropped = ties_trim(dropped, trim_density)
    return float(scale) * elect_disjoint(dropped, aggregation)


# ---------------------------------------------------------------------------------------------
# §2 Breadcrumbs
# ---------------------------------------------------------------------------------------------


def breadcrumbs_mask(tau_t, density=0.2, gamma=0.01):
    """Keep mask of one task of one tensor (METHODS.md §2 breadcrumbs; notes §12).

    n = size, n_top = floor(γ n), n_bot = n − floor(density n) − n_top; if n_bot < 0 then
    n_top += n_bot and n_bot = 0. Entries whose ascending |τ| rank (stable argsort) lies in
    [n_bot, n − n_top) are kept; n_top = 0 keeps the largest entries.
    """
    tau_t = _f64(tau_t)
    flat = np.abs(tau_t).ravel()
    n = flat.shape[0]
    n_top = math.floor(float(gamma) * n)
    n_bot = n - math.floor(float(density) * n) - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    ranks = _stable_ranks(flat)
    keep = (ranks >= n_bot) & (ranks < n - n_top)
    return keep.reshape(tau_t.shape)


def breadcrumbs(taus, density=0.2, gamma=0.01, scale=1.0, ties=False, aggregation="mean"):
    """Model Breadcrumbs: drop the top-γ outliers and the small entries, then TA or TIES (§2).

    ``ties=False``: Δ = λ Σ_t τ̂_t. ``ties=True``: elect + disjoint mean (majority-sign scope =
    this tensor), then ×λ.
    """
    taus = _as_taus(taus)
    kept = np.zeros_like(taus)
    for t in range(taus.shape[0]):
        kept[t] = np.where(breadcrumbs_mask(taus[t], density, gamma), taus[t], 0.0)
    if ties:
        return float(scale) * elect_disjoint(kept, aggregation)
    return task_arithmetic(kept, scale=scale)


# ---------------------------------------------------------------------------------------------
# §2 DELLA
# ---------------------------------------------------------------------------------------------


def della_keep_probs(tau_t, density=0.2, epsilon=0.15):
    """Per-entry keep probabilities of one task of one tensor (METHODS.md §2 della; notes §13).

    The tensor is viewed as 2-D: rows = dim 0 (``reshape(shape[0], -1)``; a 1-D tensor or a
    scalar is one row). Within each row |τ| is ranked ascending (stable argsort),
    rank_norm = rank / (n_row − 1) and p_i = density − ε + 2ε·rank_norm_i ∈ [density − ε,
    density + ε]. A row of length 1 gets p = density (rank_norm = 1/2), per METHODS.md.
    """
    tau_t = _f64(tau_t)
    if tau_t.ndim <= 1:
        rows = np.abs(tau_t).reshape(1, -1)
    else:
        rows = np.abs(tau_t).reshape(tau_t.shape[0], -1)
    density = float(density)
    epsilon = float(epsilon)
    probs = np.zeros(rows.shape)
    n_row = rows.shape[1]
    for r in range(rows.shape[0]):
        if n_row == 1:
            rank_norm = np.full(1, 0.5)
        else:
            rank_norm = _stable_ranks(rows[r]) / (n_row - 1)
        probs[r] = density - epsilon + 2.0 * epsilon * rank_norm
    return probs.reshape(tau_t.shape)


def della(taus, keep_masks, density=0.2, epsilon=0.15, scale=1.0, aggregation="mean"):
    """DELLA: τ̃_t = m_t ⊙ τ_t / p_t (elementwise), then elect + disjoint mean + ×λ (§2 della).

    p_t = ``della_keep_probs(τ_t, density, epsilon)``; ``keep_masks`` is ``[N, *shape]`` (True =
    kept). Entries with p <= 0 can never be kept and give 0 (no division). The majority-sign
    scope is this tensor.
    """
    taus = _as_taus(taus)
    masks = np.asarray(keep_masks).astype(bool)
    if masks.shape != taus.shape:
        raise ValueError("keep_masks must have the shape of taus")
    rescaled = np.zeros_like(taus)
    for t in range(taus.shape[0]):
        probs = della_keep_probs(taus[t], density, epsilon)
        ok = masks[t] & (probs > 0)
        rescaled[t] = np.where(ok, taus[t] / np.where(ok, probs, 1.0), 0.0)
    return float(scale) * elect_disjoint(rescaled, aggregation)


# ---------------------------------------------------------------------------------------------
# §5 RAM / RAM+
# ---------------------------------------------------------------------------------------------


def ram_active(taus, eps=RAM_EPS):
    """Active mask m_t,i = |τ_t,i| > ε (strict) and active count c_i = Σ_t m_t,i (§5)."""
    taus = _as_taus(taus)
    active = np.abs(taus) > float(eps)
    return active, np.sum(active, axis=0)


def ram(taus, eps=RAM_EPS):
    """RAM: Δ_i = Σ_t m_t,i τ_t,i / max(c_i, 1) (METHODS.md §5 ram).

    Unique entries keep the owner's delta, shared ones the mean of the active deltas, inactive
    ones stay 0; sub-threshold deltas are discarded.
    """
    taus = _as_taus(taus)
    active, count = ram_active(taus, eps)
    total = np.sum(np.where(active, taus, 0.0), axis=0)
    return total / np.maximum(count, 1)


def ram_plus_lambdas(list_of_taus, eps=RAM_EPS, r=0.1, alpha=2.0):
    """Per-expert boost λ_t of RAM+ over the given tensors (METHODS.md §5 ram_plus).

    S_t = #{m_t ∧ c >= 2}, U_t = #{m_t ∧ c = 1}, counted over all tensors of the list;
    ρ_t = S_t / U_t, with ρ_t = α when U_t = 0 < N_t = S_t + U_t and ρ_t = 0 when N_t = 0;
    λ_t = 1 + r · clip(ρ_t, 0, α). Returns (lambdas, rhos) as float64 arrays [N].
    """
    tensors = [_as_taus(x) for x in list_of_taus]
    n = tensors[0].shape[0]
    shared = np.zeros(n)
    unique = np.zeros(n)
    for x in tensors:
        active, count = ram_active(x, eps)
        for t in range(n):
            shared[t] += np.sum(active[t] & (count >= 2))
            unique[t] += np.sum(active[t] & (count == 1))
    rhos = np.zeros(n)
    for t in range(n):
        if shared[t] + unique[t] == 0:
            rhos[t] = 0.0
        elif unique[t] == 0:
            rhos[t] = float(alpha)
        else:
            rhos[t] = shared[t] / unique[t]
    lambdas = 1.0 + float(r) * np.clip(rhos, 0.0, float(alpha))
    return lambdas, rhos


def ram_plus(list_of_taus, eps=RAM_EPS, r=0.1, alpha=2.0):
    """RAM+ over several tensors of one model (METHODS.md §5 ram_plus; two-pass, global).

    Unique entries (c = 1) become λ_owner · τ_owner, shared entries (c >= 2) the plain mean of
    the active deltas, inactive entries 0. Passing a one-tensor list gives the ``per_tensor``
    scope (counts inside that tensor only). Returns the list of Δ per tensor.
    """
    tensors = [_as_taus(x) for x in list_of_taus]
    if not tensors:
        return []
    n = tensors[0].shape[0]
    if any(x.shape[0] != n for x in tensors):
        raise ValueError("every tensor needs the same number of experts")
    lambdas, _ = ram_plus_lambdas(tensors, eps, r, alpha)
    deltas = []
    for x in tensors:
        active, count = ram_active(x, eps)
        delta = ram(x, eps)
        for t in range(n):
            owner = active[t] & (count == 1)
            delta = np.where(owner, lambdas[t] * x[t], delta)
        deltas.append(delta)
    return deltas
