"""Independent float64 NumPy reference implementation of the merge methods in METHODS.md.

This module is the golden-value oracle for the ``jaxmerge`` tests. It deliberately imports nothing
from ``jaxmerge``: it is written from ``METHODS.md`` (§0, §1, §2, §3, §4, §5) alone, with the
edge-case notes of ``reference/baselines-notes.md`` and ``reference/resmerge-release-notes.md``
where METHODS.md is silent.

Conventions (shared by every function):

- ``taus`` is an array ``[N, *shape]`` holding the task vectors τ_t = θ_t − θ₀ of ONE tensor
  (leaf); ``base`` is θ₀ with shape ``[*shape]``.
- Every method returns the merged task vector Δ (float64, shape ``[*shape]``), so θ = θ₀ + Δ.
  Methods that act on several tensors at once (``ties_global``, ``ram_plus``) take and return
  lists.
- All math is float64, whatever dtype is passed in (``np.asarray(x, np.float64)``).
- Random methods (DARE family, DELLA) take their keep masks explicitly, so the tests can feed in
  the masks the library drew and compare the deterministic remainder exactly.
- Spectral methods (§3 TSV / ISO / STAR / SVC, §4 ResMerge) act on matrix leaves only: ``taus``
  is ``[N, m, n]``. Every SVD is ``numpy.linalg.svd(full_matrices=False)`` (exact, thin). Their
  non-matrix rules are separate functions (``spectral_nonmatrix``, ``resmerge_nonmatrix``).

Clarity over speed: the arrays in the tests are small, so plain loops are used where they make the
math obvious.
"""

import math
from fractions import Fraction

import numpy as np

COS_EPS = 1e-8  # §0: cos(a, b) = <a, b> / (|a||b| + 1e-8)
SLERP_NORM_EPS = 1e-8  # §1 slerp: leave v unnormalised if |v| <= 1e-8
SLERP_DOT_THRESHOLD = 0.9995  # §1 slerp: |d| > 0.9995 -> lerp
RAM_EPS = 1e-5  # §5: active mask |tau| > 1e-5 (strict)
SPECTRAL_ZERO_EPS = 1e-8  # §3 tsv (and the iso_cts task mask): |τ_t| <= 1e-8 -> slots stay zero
SRC_EPS = 1e-8  # §4 step 2: SRC-A eps
LHC_EPS = 1e-8  # §4 step 3: heads with |H_t| > 1e-8 are kept; |A|, |H̄| > 1e-8 for C != 0
SVC_DENOM_FLOOR = 1e-12  # §3 svc: max(|u_jᵀ τ_t|², 1e-12)


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


# ---------------------------------------------------------------------------------------------
# §3 / §4 shared linear algebra (matrix leaves)
# ---------------------------------------------------------------------------------------------
#
# Note on uniqueness. The thin SVD is unique only up to (a) signs of paired singular vectors,
# (b) rotations inside a repeated singular value, and (c) the choice of basis for the ZERO singular
# values of a rank-deficient matrix. Everything below is invariant under (a). It is NOT invariant
# under (b) and (c) wherever the spec itself uses those vectors with a nonzero weight:
# ``iso_c`` / ``iso_cts`` (σ̄ multiplies every one of the r directions), ``polar`` of a
# rank-deficient matrix (the completion of P Qᵀ), the TSV / ISO-CTS top-k blocks of a task whose
# rank is below k (its zero-σ vectors enter polar()), ``svc`` with repeated σ of the merged
# matrix, and the ResMerge head when σ_k = σ_{k+1}. In those cases any two correct
# implementations can differ; what stays fixed is documented per function (e.g. the singular
# values of the ``tsv`` / ``iso_*`` output). Compare values only on well-posed inputs (full rank,
# distinct singular values) and compare the invariants otherwise.


def _as_matrix_taus(taus):
    """Cast a stack of matrix task vectors ``[N, m, n]`` to float64 (matrix leaves only)."""
    taus = _as_taus(taus)
    if taus.ndim != 3:
        raise ValueError("spectral methods take matrix leaves: taus must have shape [N, m, n]")
    return taus


def _as_matrix(a):
    a = _f64(a)
    if a.ndim != 2:
        raise ValueError("expected a 2-D matrix")
    return a


def _thin_svd(a):
    """Thin SVD a = U diag(s) Vt, s descending (``numpy.linalg.svd(full_matrices=False)``)."""
    return np.linalg.svd(_as_matrix(a), full_matrices=False)


def _sequential_sum(values):
    """Σ values, added left to right (so it equals the last partial sum of the same loop)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total


def polar(a):
    """polar(A) = P Qᵀ from the thin SVD A = P diag(s) Qᵀ (METHODS.md §0).

    For an m×n matrix the result is m×n with orthonormal columns (m >= n) or orthonormal rows
    (m < n), whatever the rank of A. For a rank-deficient A the part of P Qᵀ on the zero singular
    values depends on the SVD's basis choice (see the note above).
    """
    p, _, qt = _thin_svd(a)
    return p @ qt


def spectral_nonmatrix(taus, alpha=1.0):
    """Non-matrix rule of TSV / ISO-C / ISO-CTS (and STAR): Δ = α · (1/N) Σ_t τ_t (§3)."""
    taus = _as_taus(taus)
    return float(alpha) * np.mean(taus, axis=0)


# ---------------------------------------------------------------------------------------------
# §4 ResMerge
# ---------------------------------------------------------------------------------------------


def spectral_split(tau, k=1):
    """Head / residual split of one task matrix (METHODS.md §4 step 1).

    H = Σ_{i < min(k, r)} s_i u_i v_iᵀ (top-k SVD part), R = τ − H. ‖τ‖ == 0 (exactly) gives
    H = R = 0. Returns (H, R). H is sign-invariant; it is not unique when s_k = s_{k+1} > 0.
    """
    tau = _as_matrix(tau)
    k = int(k)
    if k < 1:
        raise ValueError("head rank k must be >= 1")
    if float(np.linalg.norm(tau)) == 0.0:
        return np.zeros_like(tau), np.zeros_like(tau)
    u, s, vt = _thin_svd(tau)
    kk = min(k, s.shape[0])
    head = (u[:, :kk] * s[:kk]) @ vt[:kk, :]
    return head, tau - head


def _family_scale(family, attention_score_scale, ffn_score_scale, other_score_scale):
    """φ_family: attention / ffn / anything else -> the ``other`` scale (METHODS.md §4 step 2)."""
    if family == "attention":
        return float(attention_score_scale)
    if family == "ffn":
        return float(ffn_score_scale)
    return float(other_score_scale)


def _clamp01(x):
    return min(1.0, max(0.0, float(x)))


def _pairs(n):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def src_a_details(
    residuals,
    family="attention",
    beta_min=0.7,
    beta_max=1.0,
    attention_score_scale=1.0,
    ffn_score_scale=0.25,
    other_score_scale=0.0,
    score_map="affine",
    pair_threshold=0.03,
    pair_ref=0.05,
    coherence_ref=0.60,
    eps=SRC_EPS,
):
    """SRC-A backbone and its intermediate scalars: returns ``(A, info)``.

    ``info`` holds ``norms`` (n_t), ``phi``, ``s_R``, ``c_R`` (``c`` for the ramp map), the mapped
    scores (``s_bar``/``c_bar`` or ``pair_score``/``coh_score``), ``score`` (ρ), ``beta``,
    ``alpha_R`` = c^β, ``n_bar`` and ``case``: ``"zero"`` (max n_t <= eps -> A = 0),
    ``"q_sum_zero"`` (affine: ‖Q‖ <= eps -> mean residual), ``"zero_coherence"`` (ramp:
    c <= eps -> A = 0), ``"fallback"`` (affine: c_R <= 1/√N -> mean residual) or ``"src"``.
    Scalars that the branch taken never computes are ``None``. See ``src_a`` for the math.
    """
    residuals = _as_taus(residuals)
    n_exp = residuals.shape[0]
    eps = float(eps)
    beta_min = float(beta_min)
    beta_max = float(beta_max)
    phi = _family_scale(family, attention_score_scale, ffn_score_scale, other_score_scale)
    if score_map not in ("affine", "ramp"):
        raise ValueError(f"unknown score_map {score_map!r}")

    norms = np.array([float(np.linalg.norm(residuals[t])) for t in range(n_exp)])
    info = {
        "norms": norms,
        "phi": phi,
        "s_R": None,
        "c_R": None,
        "s_bar": None,
        "c_bar": None,
        "pair_score": None,
        "coh_score": None,
        "score": None,
        "beta": None,
        "alpha_R": None,
        "n_bar": float(np.mean(norms)),
        "case": None,
    }
    mean_residual = np.mean(residuals, axis=0)

    # Step 2.1 (both maps): no residual at all -> A = 0.
    if float(np.max(norms)) <= eps:
        info["case"] = "zero"
        return np.zeros(residuals.shape[1:]), info

    if score_map == "affine":
        # v2 (HEAD), METHODS.md §4 step 2.
        q = [residuals[t] / (norms[t] + eps) for t in range(n_exp)]
        if n_exp == 1:
            s_r = 1.0
        else:
            s_r = float(np.mean([cos(q[i], q[j]) for i, j in _pairs(n_exp)]))
        info["s_R"] = s_r
        q_sum = np.sum(q, axis=0)
        q_sum_norm = float(np.linalg.norm(q_sum))
        if q_sum_norm <= eps:
            info["case"] = "q_sum_zero"
            return mean_residual, info
        q_src = q_sum / (q_sum_norm + eps)
        c_r = _clamp01(np.mean([cos(q[t], q_src) for t in range(n_exp)]))
        s_bar = _clamp01((s_r + 1.0) / 2.0)
        c_bar = _clamp01((c_r + 1.0) / 2.0)
        score = _clamp01(0.5 * (s_bar + c_bar) * phi)
        beta = beta_max - (beta_max - beta_min) * score
        info.update(c_R=c_r, s_bar=s_bar, c_bar=c_bar, score=score, beta=beta)
        if c_r <= 1.0 / math.sqrt(n_exp):
            info["case"] = "fallback"
            return mean_residual, info
        alpha_r = c_r**beta
        info.update(alpha_R=alpha_r, case="src")
        return alpha_r * info["n_bar"] * q_src, info

    # score_map == "ramp": v1 (the code released with the paper), end of METHODS.md §4 and
    # resmerge-release-notes §1.4.
    q = [residuals[t] / max(norms[t], eps) for t in range(n_exp)]
    if n_exp == 1:
        s_r = 1.0
    else:
        s_r = float(np.mean([float(np.dot(q[i].ravel(), q[j].ravel())) for i, j in _pairs(n_exp)]))
    info["s_R"] = s_r
    q_mean = np.mean(q, axis=0)
    c = float(np.linalg.norm(q_mean))
    info["c_R"] = c
    if c <= eps:
        info["case"] = "zero_coherence"
        return np.zeros(residuals.shape[1:]), info
    direction = q_mean / c
    inv_sqrt_n = 1.0 / math.sqrt(n_exp)
    pair_threshold = float(pair_threshold)
    pair_ref_eff = max(float(pair_ref), pair_threshold + eps)
    coherence_ref_eff = max(float(coherence_ref), inv_sqrt_n + eps)
    pair_score = _clamp01((s_r - pair_threshold) / (pair_ref_eff - pair_threshold))
    coh_score = _clamp01((c - inv_sqrt_n) / (coherence_ref_eff - inv_sqrt_n))
    score = _clamp01(0.5 * (pair_score + coh_score) * phi)
    beta = beta_max - (beta_max - beta_min) * score
    alpha_r = c**beta
    info.update(pair_score=pair_score, coh_score=coh_score, score=score, beta=beta)
    info.update(alpha_R=alpha_r, case="src")
    return direction * alpha_r * info["n_bar"], info


def src_a(
    residuals,
    family="attention",
    beta_min=0.7,
    beta_max=1.0,
    attention_score_scale=1.0,
    ffn_score_scale=0.25,
    other_score_scale=0.0,
    score_map="affine",
    pair_threshold=0.03,
    pair_ref=0.05,
    coherence_ref=0.60,
    eps=SRC_EPS,
):
    """SRC-A backbone A of the residuals ``[N, m, n]`` (METHODS.md §4 step 2).

    ``score_map="affine"`` (house default, v2 code):
      n_t = ‖R_t‖; max n_t <= eps -> A = 0. q_t = R_t / (n_t + eps) (a zero residual gives q_t = 0
      and still counts in N). s_R = mean over pairs t < u of cos(q_t, q_u) (§0 cos, signed);
      s_R = 1 if N = 1. Q = Σ q_t; ‖Q‖ <= eps -> A = mean_t R_t; else q_src = Q / (‖Q‖ + eps).
      c_R = clamp01(mean_t cos(q_t, q_src)). s̄ = clamp01((s_R + 1)/2), c̄ = clamp01((c_R + 1)/2),
      ρ = clamp01(½(s̄ + c̄)·φ), β = β_max − (β_max − β_min)·ρ, n̄ = mean_t n_t.
      c_R <= 1/√N -> A = mean_t R_t (fallback); else A = c_R^β · n̄ · q_src.
    ``score_map="ramp"`` (v1 code): max n_t <= eps -> A = 0 (step 2.1, shared by both versions);
      q_t = R_t / max(n_t, eps); s_R = mean over pairs of the raw dot products ⟨q_t, q_u⟩ (1 if
      N = 1); c = ‖mean_t q_t‖, c <= eps -> A = 0 (no mean fallback); direction = mean_t q_t / c;
      pair = clamp01((s_R − τ_p)/(max(r_p, τ_p + eps) − τ_p)), τ_p = ``pair_threshold``,
      r_p = ``pair_ref``; coh = clamp01((c − 1/√N)/(max(r_c, 1/√N + eps) − 1/√N)),
      r_c = ``coherence_ref``; ρ = clamp01(½(pair + coh)·φ); β as above;
      A = direction · c^β · n̄.
    φ = ``attention_score_scale`` / ``ffn_score_scale`` for family "attention" / "ffn", and
    ``other_score_scale`` for any other family. ``ffn_score_scale=1.0`` reproduces v2's HEAD.
    The pair / coherence parameters are used by the ramp map only.
    """
    delta, _ = src_a_details(
        residuals,
        family=family,
        beta_min=beta_min,
        beta_max=beta_max,
        attention_score_scale=attention_score_scale,
        ffn_score_scale=ffn_score_scale,
        other_score_scale=other_score_scale,
        score_map=score_map,
        pair_threshold=pair_threshold,
        pair_ref=pair_ref,
        coherence_ref=coherence_ref,
        eps=eps,
    )
    return delta


def lhc_gate(heads, gate="positive_mean"):
    """Head agreement gate S_H of LHC (METHODS.md §4 step 3).

    ``gate="positive_mean"`` (house default): heads with ‖H_t‖ > 1e-8 are normalised to ĥ_t;
    S_H = 0 if none is kept, 1 if exactly one is kept or N = 1, else
    clamp01(mean over kept pairs of max(0, cos(ĥ_t, ĥ_u))). ``gate="none"``: S_H = 1 always (the
    ungated ablation). ``gate="mean"`` (v1 option ``--head_reliability_rule mean``): as
    ``positive_mean`` but clamp01(max(0, mean over pairs of cos(ĥ_t, ĥ_u))).
    With N = 1 and a zero head the "none kept" rule is applied first (S_H = 0); C is 0 either
    way because H̄ = 0.
    """
    if gate not in ("positive_mean", "none", "mean"):
        raise ValueError(f"unknown gate {gate!r}")
    heads = _as_taus(heads)
    if gate == "none":
        return 1.0
    kept = []
    for t in range(heads.shape[0]):
        norm = float(np.linalg.norm(heads[t]))
        if norm > LHC_EPS:
            kept.append(heads[t] / norm)
    if not kept:
        return 0.0
    if len(kept) == 1 or heads.shape[0] == 1:
        return 1.0
    cosines = [cos(kept[i], kept[j]) for i, j in _pairs(len(kept))]
    if gate == "positive_mean":
        return _clamp01(np.mean([max(0.0, c) for c in cosines]))
    return _clamp01(max(0.0, float(np.mean(cosines))))


def lhc(heads, backbone, rho_max=0.2, gate="positive_mean"):
    """LHC head correction C (METHODS.md §4 step 3).

    S_H = ``lhc_gate(heads, gate)``; H̄ = (1/N) Σ_t H_t over ALL N heads (zero ones included, no
    sign alignment). If ρ_max·S_H > 0, ‖A‖ > 1e-8 and ‖H̄‖ > 1e-8:
    C = ρ_max · S_H · ‖A‖ · H̄ / ‖H̄‖; otherwise C = 0. A = ``backbone``.
    """
    heads = _as_taus(heads)
    backbone = _f64(backbone)
    s_h = lhc_gate(heads, gate)
    h_bar = np.mean(heads, axis=0)
    budget = float(rho_max) * s_h
    a_norm = float(np.linalg.norm(backbone))
    h_norm = float(np.linalg.norm(h_bar))
    if budget > 0.0 and a_norm > LHC_EPS and h_norm > LHC_EPS:
        return budget * a_norm * h_bar / h_norm
    return np.zeros(heads.shape[1:])


def resmerge(
    taus,
    family="attention",
    head_rank=1,
    beta_min=0.7,
    beta_max=1.0,
    rho_max=0.2,
    attention_score_scale=1.0,
    ffn_score_scale=0.25,
    other_score_scale=0.0,
    score_map="affine",
    gate="positive_mean",
):
    """ResMerge of one matrix leaf ``[N, m, n]``: Δ = A + C (METHODS.md §4).

    (H_t, R_t) = ``spectral_split(τ_t, head_rank)``; A = ``src_a(R, ...)`` (v1 pair / coherence
    parameters at their defaults); C = ``lhc(H, A, rho_max, gate)``.
    Non-matrix leaves use ``resmerge_nonmatrix``.
    """
    taus = _as_matrix_taus(taus)
    heads = np.zeros_like(taus)
    residuals = np.zeros_like(taus)
    for t in range(taus.shape[0]):
        heads[t], residuals[t] = spectral_split(taus[t], head_rank)
    backbone = src_a(
        residuals,
        family=family,
        beta_min=beta_min,
        beta_max=beta_max,
        attention_score_scale=attention_score_scale,
        ffn_score_scale=ffn_score_scale,
        other_score_scale=other_score_scale,
        score_map=score_map,
    )
    return backbone + lhc(heads, backbone, rho_max=rho_max, gate=gate)


def resmerge_nonmatrix(taus):
    """ResMerge non-matrix rule: Δ = (1/N) Σ_t τ_t (METHODS.md §4)."""
    return np.mean(_as_taus(taus), axis=0)


# ---------------------------------------------------------------------------------------------
# §3 TSV-Merge
# ---------------------------------------------------------------------------------------------


def tsv(taus, alpha=1.0):
    """TSV-Merge of one matrix leaf ``[N, m, n]`` (METHODS.md §3 tsv).

    r = min(m, n), k = ⌊r/N⌋. For each task with ‖τ_t‖ > 1e-8 its top-k triplets go into slots
    [t·k, (t+1)·k) of the zero buffers U_cat (m×r), s_cat (r), V_cat (r×n); tasks with
    ‖τ_t‖ <= 1e-8 leave their slots zero. Δ = α · polar(U_cat) diag(s_cat) polar(V_cat).
    k = 0 (N > r) gives Δ = 0 (the library also warns; the oracle only returns the value).

    Invariant (any rank): polar(U_cat) has orthonormal columns and polar(V_cat) orthonormal rows,
    so the singular values of Δ are exactly α · s_cat.
    """
    taus = _as_matrix_taus(taus)
    n_exp, m, n = taus.shape
    r = min(m, n)
    k = r // n_exp
    if k == 0:
        return np.zeros((m, n))
    u_cat = np.zeros((m, r))
    s_cat = np.zeros(r)
    v_cat = np.zeros((r, n))
    for t in range(n_exp):
        if float(np.linalg.norm(taus[t])) <= SPECTRAL_ZERO_EPS:
            continue
        u, s, vt = _thin_svd(taus[t])
        slots = slice(t * k, (t + 1) * k)
        u_cat[:, slots] = u[:, :k]
        s_cat[slots] = s[:k]
        v_cat[slots, :] = vt[:k, :]
    return float(alpha) * ((polar(u_cat) * s_cat) @ polar(v_cat))


# ---------------------------------------------------------------------------------------------
# §3 ISO-C / ISO-CTS
# ---------------------------------------------------------------------------------------------


def iso_c(taus, alpha=1.0):
    """ISO-C of one matrix leaf ``[N, m, n]`` (METHODS.md §3 iso_c).

    M = Σ_t τ_t (the sum) = U diag(σ) Vᵀ; Δ = α · mean(σ) · U Vᵀ, the mean over all r = min(m, n)
    singular values (zeros included). Invariant: every singular value of Δ is α·mean(σ), i.e.
    ‖Δ‖_* = α‖M‖_*. U Vᵀ is unique only when M has full rank r.
    """
    taus = _as_matrix_taus(taus)
    u, s, vt = _thin_svd(np.sum(taus, axis=0))
    return float(alpha) * float(np.mean(s)) * (u @ vt)


def round_half_even(x):
    """Round to the nearest integer, halves to the even neighbour (Python's ``round``), exactly.

    ``x`` may be an int, a float or a ``fractions.Fraction``; it is converted exactly to a
    Fraction first, so e.g. 5/2 -> 2, 3/2 -> 2, 7/2 -> 4, 1/2 -> 0.
    """
    x = Fraction(x)
    low = math.floor(x)
    diff = x - low
    half = Fraction(1, 2)
    if diff > half:
        return low + 1
    if diff < half:
        return low
    return low if low % 2 == 0 else low + 1


def iso_cts_sizes(r, n_tasks, common_fraction=0.8):
    """Common rank k_c and per-task rank d of ISO-CTS (METHODS.md §3 iso_cts).

    k₀ = ⌊f·r⌋ (float product, as the reference); s = round_half_even((r − k₀)/N)·N, with the
    quotient taken as an exact fraction; k_c = r − s; d = s/N. Returns (k_c, d).
    Raises ValueError if k_c < 0 (only possible for small f, e.g. r = 2, N = 3, f = 0).
    """
    r = int(r)
    n_tasks = int(n_tasks)
    if r < 0 or n_tasks < 1:
        raise ValueError("need r >= 0 and N >= 1")
    f = float(common_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError("common_fraction must lie in [0, 1]")
    k0 = math.floor(f * r)
    s = round_half_even(Fraction(r - k0, n_tasks)) * n_tasks
    k_c = r - s
    if k_c < 0:
        raise ValueError(f"iso_cts: task blocks ({s}) exceed the rank r = {r}")
    return k_c, s // n_tasks


def iso_cts(taus, alpha=1.0, common_fraction=0.8):
    """ISO-CTS of one matrix leaf ``[N, m, n]`` (METHODS.md §3 iso_cts).

    (k_c, d) = ``iso_cts_sizes(r, N, f)``. M = Σ_t τ_t = U diag(σ) Vᵀ; common block =
    (U[:, :k_c], σ[:k_c], Vᵀ[:k_c]). Task t: R_t = τ_t − U_c U_cᵀ τ_t (left projection only); if
    ‖R_t‖ <= 1e-8 its block stays zero (mask, as the TSV recommendation), else its top-d triplets
    fill slots [t·d, (t+1)·d). The common block fills slots [N·d, N·d + k_c) (task blocks first).
    σ̄ = mean of all r assembled singular values (masked zeros included);
    Δ = α · σ̄ · polar(U_all) polar(V_all). With d = 0 (s = 0) the common block is all of
    U, σ, Vᵀ and Δ reduces to ``iso_c`` (the general path is taken; polar(U) = U).

    The slot order (task blocks first) does not change the value: polar(U Π) = polar(U) Π for a
    permutation Π, and the same Π reorders the rows of V_all, so U⊥ V⊥ is unchanged.

    Invariant (any rank): every singular value of Δ equals α·σ̄. When U_all / V_all are
    rank-deficient (masked or low-rank blocks) the directions of Δ are not unique (see the note
    at the top of §3/§4); they stay finite.
    """
    taus = _as_matrix_taus(taus)
    n_exp, m, n = taus.shape
    r = min(m, n)
    k_c, d = iso_cts_sizes(r, n_exp, common_fraction)
    u, s, vt = _thin_svd(np.sum(taus, axis=0))
    u_c = u[:, :k_c]

    u_all = np.zeros((m, r))
    s_all = np.zeros(r)
    v_all = np.zeros((r, n))
    if d > 0:
        for t in range(n_exp):
            projected = taus[t] - u_c @ (u_c.T @ taus[t])
            if float(np.linalg.norm(projected)) <= SPECTRAL_ZERO_EPS:
                continue
            ut, st, vtt = _thin_svd(projected)
            slots = slice(t * d, (t + 1) * d)
            u_all[:, slots] = ut[:, :d]
            s_all[slots] = st[:d]
            v_all[slots, :] = vtt[:d, :]
    common = slice(n_exp * d, n_exp * d + k_c)
    u_all[:, common] = u_c
    s_all[common] = s[:k_c]
    v_all[common, :] = vt[:k_c, :]
    sigma_bar = float(np.mean(s_all))
    return float(alpha) * sigma_bar * (polar(u_all) @ polar(v_all))


# ---------------------------------------------------------------------------------------------
# §3 STAR
# ---------------------------------------------------------------------------------------------


def star_rank(sigma, eta=40.0):
    """Number q of top singular values STAR keeps (METHODS.md §3 star; notes §9).

    ``sigma`` is descending and non-negative. total = Σσ and the partial sums are both added left
    to right, and target = η·total/100 (η multiplied first, so η = 40 and total = 10 give exactly
    4). q = the fewest leading values whose partial sum satisfies ``partial >= target`` (">=":
    reaching the target counts; the reference's searchsorted "left" + 1). If no partial sum
    reaches the target (η > 100, or rounding at η = 100) q = len(σ). q >= 1 always (η <= 0 gives
    1). Returns 0 for an empty or all-zero σ.
    """
    sigma = _f64(sigma).ravel()
    total = _sequential_sum(sigma)
    if sigma.shape[0] == 0 or total <= 0.0:
        return 0
    target = float(eta) * total / 100.0
    partial = 0.0
    for i, value in enumerate(sigma):
        partial += float(value)
        if partial >= target:
            return i + 1
    return sigma.shape[0]


def star(taus, eta=40.0):
    """STAR of one matrix leaf ``[N, m, n]`` (METHODS.md §3 star).

    Per task: thin SVD; q = ``star_rank(σ, η)``; the kept σ_1..σ_q are rescaled by
    Σσ_all / Σσ_kept (nuclear norm preserved) and the rank-q matrix is rebuilt. A zero matrix
    (Σσ = 0) contributes zero. Δ = (1/N) Σ_t STAR(τ_t).
    """
    taus = _as_matrix_taus(taus)
    n_exp = taus.shape[0]
    total_delta = np.zeros(taus.shape[1:])
    for t in range(n_exp):
        u, s, vt = _thin_svd(taus[t])
        q = star_rank(s, eta)
        if q == 0:
            continue
        kept = s[:q]
        scale = _sequential_sum(s) / _sequential_sum(kept)
        total_delta += (u[:, :q] * (kept * scale)) @ vt[:q, :]
    return total_delta / n_exp


# ---------------------------------------------------------------------------------------------
# §3 SVC
# ---------------------------------------------------------------------------------------------


def svc(merged_delta, taus, floor=0.1):
    """Singular value calibration of an already-merged matrix Δ_m (METHODS.md §3 svc; notes §8).

    Δ_m = U diag(σ) Vᵀ (thin). For j = 1..r: a_j^m = u_jᵀ Δ_m, a_j^t = u_jᵀ τ_t,
    s_j^t = ⟨a_j^m, a_j^t⟩ / max(‖a_j^t‖², 1e-12), γ_j = N / Σ_t max(α_c, s_j^t), σ'_j = γ_j σ_j.
    Returns the calibrated Δ = U diag(σ') Vᵀ. ``floor`` = α_c must be > 0 (it keeps Σ_t > 0).
    A zero task response gives s = 0 -> α_c. Sign-invariant; not unique for repeated σ_j.
    """
    merged = _as_matrix(merged_delta)
    taus = _as_matrix_taus(taus)
    if taus.shape[1:] != merged.shape:
        raise ValueError("svc: taus must have shape [N, *merged_delta.shape]")
    floor = float(floor)
    if floor <= 0.0:
        raise ValueError("svc: the calibration floor must be > 0")
    n_exp = taus.shape[0]
    u, s, vt = _thin_svd(merged)
    new_s = np.zeros_like(s)
    for j in range(s.shape[0]):
        a_m = u[:, j] @ merged
        denominator = 0.0
        for t in range(n_exp):
            a_t = u[:, j] @ taus[t]
            s_jt = float(np.dot(a_m, a_t)) / max(float(np.dot(a_t, a_t)), SVC_DENOM_FLOOR)
            denominator += max(floor, s_jt)
        new_s[j] = n_exp / denominator * s[j]
    return (u * new_s) @ vt


# ---------------------------------------------------------------------------
# Diagnostics (the jaxmerge.analyze statistics), from their definitions:
# SAR-Merging §4.2 (sparsity), §5 (regions), Fig. 3 (cosine); ResMerge §5.4
# (energy share, stable and effective rank), §5.5 and A.3 (head/residual geometry).

UPDATE_EPS = 1e-5


def update_sparsity(tau, eps=UPDATE_EPS):
    """Fraction of entries with |τ| ≤ eps."""
    tau = _f64(tau)
    return float(np.mean(np.abs(tau) <= eps))


def pair_regions(tau_a, tau_b, eps=UPDATE_EPS):
    """Fractions {unchanged, private, overlap, conflict} of a pair, entry by entry."""
    a, b = _f64(tau_a).ravel(), _f64(tau_b).ravel()
    counts = {"unchanged": 0, "private": 0, "overlap": 0, "conflict": 0}
    for x, y in zip(a, b):
        active_x, active_y = abs(x) > eps, abs(y) > eps
        if active_x and active_y:
            counts["conflict" if x * y < 0 else "overlap"] += 1
        elif active_x or active_y:
            counts["private"] += 1
        else:
            counts["unchanged"] += 1
    return {k: v / a.size for k, v in counts.items()}


def all_regions(taus, eps=UPDATE_EPS):
    """Fractions {unchanged, private, overlap, conflict} over all N experts."""
    taus = _as_taus(taus).reshape(len(taus), -1)
    counts = {"unchanged": 0, "private": 0, "overlap": 0, "conflict": 0}
    for column in taus.T:
        active = column[np.abs(column) > eps]
        if active.size == 0:
            counts["unchanged"] += 1
        elif active.size == 1:
            counts["private"] += 1
        elif np.all(active > 0) or np.all(active < 0):
            counts["overlap"] += 1
        else:
            counts["conflict"] += 1
    return {k: v / taus.shape[1] for k, v in counts.items()}


def spectrum_stats(sigma, ks=(1, 4, 16)):
    """(energy shares of the top k, stable rank, effective rank) of a spectrum; zeros if 0."""
    sigma = np.sort(_f64(sigma))[::-1]
    energy = sigma**2
    if energy.sum() == 0:
        return [0.0] * len(ks), 0.0, 0.0
    shares = [float(energy[:k].sum() / energy.sum()) for k in ks]
    p = sigma / sigma.sum()
    p = p[p > 0]
    return shares, float(energy.sum() / energy[0]), float(np.exp(-(p * np.log(p)).sum()))


def head_residual_geometry(taus, k=1):
    """Pairwise head/residual cosines, S_H, c_R and mean retentions from full SVDs."""
    taus = _as_matrix_taus(taus)
    heads, residuals = zip(*[spectral_split(t, k) for t in taus])
    n = len(taus)
    _, details = src_a_details(np.stack(residuals))

    def retention(xs):
        mean_norm = np.mean([np.linalg.norm(x) for x in xs])
        return 0.0 if mean_norm <= 1e-8 else float(np.linalg.norm(np.mean(xs, 0)) / mean_norm)

    return {
        "head_cos": [cos(heads[s], heads[t]) for s, t in _pairs(n)],
        "residual_cos": [cos(residuals[s], residuals[t]) for s, t in _pairs(n)],
        "head_agreement": lhc_gate(np.stack(heads)),
        # c_R is not computed when every residual is 0 or their q_t sum to 0: 0 then.
        "residual_coherence": details["c_R"] or 0.0,
        "head_retention": retention(heads),
        "residual_retention": retention(residuals),
    }


# ---------------------------------------------------------------------------
# §6 SAR-Merging and §7 Fisher merging. ``fisher`` is [N, *shape], the experts' sensitivities.


def sar_resolve(taus, fisher, arbitration="hard", eps=UPDATE_EPS):
    """τ^r entry by entry: the paper's eq. 12–14 for N = 2, the house rule otherwise."""
    taus = _as_taus(taus)
    fisher = _f64(fisher)
    n = taus.shape[0]
    flat_t = taus.reshape(n, -1)
    flat_s = fisher.reshape(n, -1)
    out = np.zeros(flat_t.shape[1])
    for j in range(flat_t.shape[1]):
        t, s = flat_t[:, j], flat_s[:, j]
        if n == 2:
            if t[0] * t[1] >= 0:
                out[j] = t[0] + t[1]
            elif arbitration == "fisher_weighted" and s.sum() > 0:
                out[j] = (s * t).sum() / s.sum()
            else:
                out[j] = t[0] if s[0] > s[1] else t[1]  # ties -> B
            continue
        active = [i for i in range(n) if abs(t[i]) > eps]
        if not active:
            continue
        signs = {np.sign(t[i]) for i in active}
        if arbitration == "fisher_weighted" and len(signs) > 1 and sum(s[i] for i in active) > 0:
            out[j] = sum(s[i] * t[i] for i in active) / sum(s[i] for i in active)
            continue
        best = max(active, key=lambda i: (s[i], i))  # largest S, ties -> the later expert
        out[j] = sum(t[i] for i in active if np.sign(t[i]) == np.sign(t[best]))
    return out.reshape(taus.shape[1:])


def sar_private(taus, eps=UPDATE_EPS):
    """Entries updated (|τ| > eps) by exactly one expert."""
    taus = _as_taus(taus)
    return (np.abs(taus) > eps).sum(axis=0) == 1


def sar_drop_candidates(resolved, private):
    """Private entries with |τ^r| below the median |τ^r| of the private entries."""
    resolved = _f64(resolved)
    if not private.any():
        return np.zeros_like(private)
    median = np.median(np.abs(resolved[private]))
    return private & (np.abs(resolved) < median)


def sar(taus, fisher, keep_mask, p=0.2, scale=1.0, arbitration="hard", eps=UPDATE_EPS):
    """SAR-Merging Δ with an explicit keep mask for the private small entries."""
    resolved = sar_resolve(taus, fisher, arbitration, eps)
    candidates = sar_drop_candidates(resolved, sar_private(taus, eps))
    sparse = np.where(candidates, np.where(keep_mask, resolved / (1 - p), 0.0), resolved)
    return scale * sparse


def fisher_merge(taus, fisher, floor=1e-6):
    """Fisher merging Δ = Σ F̃_t τ_t / Σ F̃_t, F̃ = F + floor (Matena & Raffel)."""
    taus = _as_taus(taus)
    weights = _f64(fisher) + floor
    return (weights * taus).sum(axis=0) / weights.sum(axis=0)
