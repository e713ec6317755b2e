"""Matrix building blocks of the spectral methods: top-k SVD, exact thin SVD, polar, cosines.

Every function takes one matrix ``f32[m, n]`` (or vectors) and is pure and
jittable, so the executor can ``vmap`` it over stacked layers and experts.

Top-k SVD (METHODS.md §8) uses randomised subspace iteration (Halko, Martinsson &
Tropp 2011, Alg. 4.4) with an a-posteriori accuracy check and an exact fallback:

- A random-sign sketch of ``l = k + oversample`` columns (default oversample 4) is
  refined by power iterations, re-orthonormalised on both sides each time.
- After each iteration the Ritz triplets ``(s_i, u_i, v_i)`` of ``QᵀA`` are checked.
  ``Aᵀu_i = s_i v_i`` holds exactly by construction, so the residual is
  ``r_i = ‖A v_i − s_i u_i‖``, and by Wedin's theorem the angle between the computed
  and the true top-k singular subspaces is at most about ``max_i r_i / gap`` with
  ``gap = s_k − s_{k+1}``. The iteration stops when that bound is ``≤ tolerance``
  (default 1e-4), or when the matrix is zero (``s_1 = 0``: the head is zero).
- It gives up early when the observed rate ``(s_{l}/s_k)²`` per iteration cannot
  reach the tolerance within ``max_iterations``; then, and when the budget runs out,
  the exact SVD is used instead (``used_exact`` is True). This happens for
  near-degenerate leading singular values (``σ_k ≈ σ_{k+1}``, where the top-k
  subspace is itself ill-defined) and for flat, noise-like spectra (dense SFT-like
  task vectors). Spectrally concentrated task vectors, the RL case ResMerge
  targets, typically pass after 1–3 iterations.

Under ``vmap`` (also nested: layers × experts) the matrices are processed one by
one (a ``custom_vmap`` rule folds every vmapped axis into one ``lax.map``), so
the fallback stays a real ``cond`` that costs nothing for a matrix that
converged, each matrix stops iterating as soon as it passes, and the loop's
LAPACK calls (a thin QR, a ``(k + oversample)``-square SVD) are never batched:
batched LAPACK inside a vmapped loop deadlocked XLA:CPU's thread pool on a
2-core machine, and batched thin products are several times slower on XLA:CPU.

Accuracy of the float32 result, measured in ``tests/test_linalg.py``: subspace
angle ≤ ``tolerance`` up to float32 rounding (≈ 1e-6 relative to ``s_1``) when the
randomised path is accepted; the exact path is LAPACK's (CPU) or cuSOLVER's (GPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from jaxmerge.hashing import mix32

Array = jax.Array

COS_EPS = 1e-8
"""cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖ + 1e-8) (METHODS.md §0)."""

SVD_MODES = ("auto", "randomized", "exact")
"""``auto``: randomised (with fallback) when ``k ≤ AUTO_MAX_RANK`` and
``4 (k + 8) ≤ min(m, n)``, else exact."""

OVERSAMPLE = 4
"""Extra sketch columns. The loop's products cost in proportion to ``k + oversample``
and are memory-bound on CPU; 4 merged SmolLM2 (3 experts) 1.45× faster than 8 with the
same iteration counts. More columns only help spectra that fall back to exact anyway."""

AUTO_MIN_SIDE_PER_RANK = 4
"""``svd='auto'`` takes the randomised path only when ``min(m, n) ≥ 4 (k + 8)``: below
that an exact SVD costs about as much (and is exact)."""

AUTO_MAX_RANK = 16
"""Largest k that ``svd='auto'`` sends down the randomised path. Wider sketches
orthonormalise column by column, and the gap test ``σ_k − σ_{k+1}`` deep in a
smooth spectrum rarely certifies, so exact is as fast there (TSV, ISO-CTS blocks)."""


def frobenius_norm(x: Array) -> Array:
    """‖x‖_F over all entries of ``x``."""
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def frobenius_cos(a: Array, b: Array, eps: float = COS_EPS) -> Array:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖‖b‖ + eps) on the flattened arrays (METHODS.md §0)."""
    return jnp.vdot(a.ravel(), b.ravel()) / (frobenius_norm(a) * frobenius_norm(b) + eps)


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` at full float32 precision on every backend (no TF32 / bf16 passes)."""
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def gram(x: Array) -> Array:
    """``G[s, t] = ⟨x_s, x_t⟩`` for stacked tensors ``x: f32[N, ...]`` (flattened), ``f32[N, N]``.

    Under ``vmap`` the products run one after another (``lax.map``): XLA:CPU's
    batched matrix products with so few rows are several times slower than single ones.
    """
    return _stacked_gram(x.reshape(x.shape[0], -1))


@custom_vmap
def _stacked_gram(flat):
    lead = flat.shape[:-2]
    pieces = flat.reshape((-1,) + flat.shape[-2:])
    out = lax.map(lambda f: matmul(f, f.T), pieces)
    return out.reshape(lead + out.shape[1:])


@_stacked_gram.def_vmap
def _stacked_gram_batched(axis_size, in_batched, flat):
    del axis_size, in_batched
    return _stacked_gram(flat), True


def low_rank_product(u: Array, vt: Array) -> Array:
    """``u @ vt`` for ``u: f32[m, r]``, ``vt: f32[r, n]``; for r ≤ 8 a sum of outer products.

    The elementwise form fuses with its consumer (e.g. ``τ − H``) and avoids
    XLA:CPU's slow batched products when vmapped.
    """
    rank = u.shape[-1]
    if rank > 8:
        return matmul(u, vt)
    return sum(u[:, i, None] * vt[None, i, :] for i in range(rank))


def one_matrix_per_lapack_call(fn):
    """``fn`` of a matrix stack ``[..., m, n]``, made to run one matrix at a time on CPU.

    On CPU the stack is flattened and ``lax.map``-ped, so every LAPACK call ``fn``
    makes sees a single matrix; other backends run ``fn`` on the whole stack (one
    batched cuSOLVER call). The reason is a deadlock in jaxlib 0.10's CPU
    LAPACK kernels: a batched call (``lapack_sgesdd_ffi`` and the QR, eigh, LU,
    Cholesky, ... kernels) splits its batch into tasks on XLA:CPU's intra-op thread
    pool and blocks a pool thread until they finish, so when as many batched calls
    run at once as the pool has threads (two on a 2-core machine: TSV's two polar
    factors are independent), every pool thread waits and no task ever runs. A
    single-matrix call runs inline and never waits on the pool.
    """

    def per_matrix(a):
        lead = a.shape[:-2]
        out = lax.map(fn, a.reshape((-1,) + a.shape[-2:]))
        return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)

    def call(a):
        if a.ndim == 2:
            return fn(a)
        return lax.platform_dependent(a, cpu=per_matrix, default=fn)

    return call


def exact_svd(a: Array) -> tuple[Array, Array, Array]:
    """Thin SVD ``a = u @ diag(s) @ vt`` in float32, singular values descending.

    Works on any leading batch dimensions (on CPU, one LAPACK call per matrix: see
    :func:`one_matrix_per_lapack_call`). LAPACK's divide-and-conquer driver (gesdd)
    is tried first; if it fails to converge (jax then returns NaN), the matrix (on
    GPU, the whole batch) is recomputed with the slower QR-iteration driver (gesvd),
    so a rank-deficient or badly scaled matrix still gets a finite answer.
    """
    return _robust_svd(a.astype(jnp.float32))


def _svd_with_retry(a):
    u, s, vt = lax.linalg.svd(a, full_matrices=False)
    failed = ~(jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(vt)))
    return lax.cond(
        failed,
        lambda: lax.linalg.svd(a, full_matrices=False, algorithm=lax.linalg.SvdAlgorithm.QR),
        lambda: (u, s, vt))


@custom_vmap
def _robust_svd(a):
    return one_matrix_per_lapack_call(_svd_with_retry)(a)


@_robust_svd.def_vmap
def _robust_svd_batched(axis_size, in_batched, a):
    # The body handles leading batch axes (one batched call, or one call per matrix on
    # CPU), so the gesvd retry stays a real, rarely taken branch.
    del axis_size, in_batched
    return _robust_svd(a), (True, True, True)


def singular_values(a: Array) -> Array:
    """All singular values of ``a`` (any leading batch axes), float32, descending.

    No singular vectors are formed (several times cheaper than :func:`exact_svd`).
    gesdd first; if it fails to converge (NaN), the matrix (on GPU, the batch) is
    recomputed with the QR-iteration driver, as in :func:`exact_svd`.
    """
    return _robust_singular_values(a.astype(jnp.float32))


def _singular_values_with_retry(a):
    s = lax.linalg.svd(a, full_matrices=False, compute_uv=False)
    return lax.cond(
        ~jnp.all(jnp.isfinite(s)),
        lambda: lax.linalg.svd(a, full_matrices=False, compute_uv=False,
                               algorithm=lax.linalg.SvdAlgorithm.QR),
        lambda: s)


@custom_vmap
def _robust_singular_values(a):
    return one_matrix_per_lapack_call(_singular_values_with_retry)(a)


@_robust_singular_values.def_vmap
def _robust_singular_values_batched(axis_size, in_batched, a):
    del axis_size, in_batched
    return _robust_singular_values(a), True


def polar(a: Array) -> Array:
    """The orthogonal polar factor ``P Qᵀ`` of ``a = P diag(s) Qᵀ`` (METHODS.md §0).

    For rank-deficient ``a`` the factor is not unique; the columns that meet
    zero singular values are LAPACK's completion, as in the reference code.
    """
    u, _, vt = exact_svd(a)
    return matmul(u, vt)


class TopK(NamedTuple):
    """The leading ``k`` singular triplets of a matrix.

    Attributes:
      u: ``f32[m, k]`` left singular vectors.
      s: ``f32[k]`` singular values, descending.
      vt: ``f32[k, n]`` right singular vectors (rows).
      used_exact: True when the exact SVD produced the result (the randomised check
        failed, or ``svd='exact'``, or ``auto`` judged the matrix too small).
      iterations: power iterations run by the randomised path (0 if not used).
    """

    u: Array
    s: Array
    vt: Array
    used_exact: Array
    iterations: Array

    def reconstruct(self) -> Array:
        """``u @ diag(s) @ vt``, the best rank-k approximation."""
        return low_rank_product(self.u * self.s, self.vt)


def sketch_width(k: int, shape: tuple[int, int], oversample: int = OVERSAMPLE) -> int:
    """Columns of the randomised sketch for rank ``k`` of an ``m × n`` matrix."""
    return min(k + oversample, min(shape))


def uses_randomized(k: int, shape: tuple[int, int], svd: str = "auto",
                    oversample: int = OVERSAMPLE) -> bool:
    """Whether :func:`topk_svd` takes the randomised path for this rank and shape."""
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    if svd == "exact" or k < 1:
        return False
    if sketch_width(k, shape, oversample) <= k:
        return False  # no room for the gap estimate: exact is as cheap
    return svd == "randomized" or (k <= AUTO_MAX_RANK and AUTO_MIN_SIDE_PER_RANK * (k + 8)
                                   <= min(shape))


def _exact_topk(a: Array, k: int) -> tuple[Array, Array, Array]:
    u, s, vt = exact_svd(a)
    return u[..., :k], s[..., :k], vt[..., :k, :]


class _State(NamedTuple):
    q: Array
    u: Array
    s: Array
    vt: Array
    iteration: Array
    done: Array
    give_up: Array


def topk_svd(a: Array, k: int, key: Array | None = None, *, svd: str = "auto",
             oversample: int = OVERSAMPLE, tolerance: float = 1e-4,
             max_iterations: int = 16) -> TopK:
    """The top-``k`` singular triplets of ``a`` (``f32[m, n]``), vmap- and jit-friendly.

    Args:
      a: the matrix (upcast to float32).
      k: number of triplets, ``1 ≤ k ≤ min(m, n)``.
      key: PRNG key of the random-sign sketch (default ``PRNGKey(0)``). Results agree
        with the exact SVD to ``tolerance`` for any key; pass a fixed key for
        bit-reproducibility (the merge methods derive it from the leaf's name).
      svd: ``auto`` (randomised when ``k ≤ 16`` and ``4 (k + 8) ≤ min(m, n)``, else exact),
        ``randomized`` (always try the randomised path first) or ``exact``.
      oversample: extra sketch columns beyond ``k`` (4).
      tolerance: accepted bound on the subspace angle, ``max_i r_i / (s_k − s_{k+1})``
        (1e-4).
      max_iterations: power-iteration budget before falling back to exact (16).

    Returns:
      A :class:`TopK`. A zero matrix gives zero singular values (and unit-norm
      but arbitrary vectors), never NaN.

    Under ``vmap`` the matrices of a batch are processed one after the other
    (``lax.map``), each with its own iteration count and its own fallback decision:
    batched matrix-times-thin-matrix products are several times slower than
    single ones on XLA:CPU, and a batched fallback would run the exact SVD for the
    whole batch whenever one matrix needed it.
    """
    m, n = a.shape[-2:]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"top-k SVD needs 1 <= k <= min(m, n) = {min(m, n)}, got k={k}")
    if key is None:
        key = jax.random.PRNGKey(0)
    if not uses_randomized(k, (m, n), svd, oversample):
        u, s, vt = _exact_topk(a.astype(jnp.float32), k)
        batch = a.shape[:-2]
        return TopK(u, s, vt, jnp.ones(batch, bool), jnp.zeros(batch, jnp.int32))
    fn = _randomized_topk(k, oversample, float(tolerance), int(max_iterations))
    return fn(a.astype(jnp.float32), key)


@functools.cache
def _randomized_topk(k: int, oversample: int, tolerance: float, max_iterations: int):
    """The randomised top-k SVD over any leading batch axes, one matrix after another.

    Its ``custom_vmap`` rule treats the vmapped axis as one more leading axis, so
    nested vmaps (layers × experts) become a single ``lax.map`` over all matrices.
    """

    @custom_vmap
    def batched(a, key):
        lead = a.shape[:-2]
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        key_shape = () if typed else key.shape[-1:]  # a typed key, or raw uint32[2]
        key = jnp.broadcast_to(key, lead + key_shape)
        flat = (a.reshape((-1,) + a.shape[-2:]), key.reshape((-1,) + key_shape))
        out = lax.map(lambda args: _randomized_topk_single(*args, k, oversample, tolerance,
                                                           max_iterations), flat)
        return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)

    @batched.def_vmap
    def rule(axis_size, in_batched, a, key):
        a_batched, key_batched = in_batched
        if not a_batched:
            a = jnp.broadcast_to(a, (axis_size, *a.shape))
        if not key_batched:
            key = jnp.broadcast_to(key, (axis_size, *key.shape))
        return batched(a, key), TopK(True, True, True, True, True)

    return batched


def _randomized_topk_single(a, key, k, oversample, tolerance, max_iterations) -> TopK:
    m, n = a.shape
    width = sketch_width(k, (m, n), oversample)
    tiny = jnp.finfo(jnp.float32).tiny
    # Below this the float32 residual cannot certify the tolerance: give up early.
    noise = 64 * jnp.finfo(jnp.float32).eps
    omega = rademacher(key, (n, width))
    q0, _ = orthonormalize(matmul(a, omega))

    def step(state: _State) -> _State:
        # B = QᵀA = zᵀ. The barrier keeps XLA:CPU from folding the transpose into
        # the product, which makes it a strided A·Q several times slower.
        z = lax.optimization_barrier(matmul(state.q.T, a)).T
        z_basis, r = orthonormalize(z)  # z = z_basis @ r, so B = rᵀ z_basisᵀ
        y = matmul(a, z_basis)  # the next sketch; also A·v for every v in span(z)
        ritz_u, s, w_t = jnp.linalg.svd(r.T)  # width × width
        w_top = w_t[:k].T
        u = matmul(state.q, ritz_u[:, :k])
        s_top = s[:k]
        a_v = matmul(y, w_top)  # A @ vᵢ for the Ritz vectors vᵢ = z_basis @ w_top
        residual = jnp.sqrt(jnp.max(jnp.sum(jnp.square(a_v - u * s_top), axis=0)))
        gap = s[k - 1] - s[k]
        zero = s[0] <= tiny
        done = zero | (residual <= tolerance * gap)
        # Subspace iteration shrinks the residual by about (s_l / s_k)^2 per step.
        rate = jnp.square(s[width - 1] / jnp.maximum(s[k - 1], tiny))
        needed = jnp.log(tolerance * jnp.maximum(gap, tiny) / jnp.maximum(residual, tiny))
        steps_left = needed / jnp.log(jnp.clip(rate, tiny, 1.0 - 1e-7))
        iteration = state.iteration + 1
        unreachable = (tolerance * gap <= noise * s[0]) | (rate >= 1.0 - 1e-7)
        too_slow = iteration + steps_left > max_iterations
        give_up = ~done & (((iteration >= 2) & (unreachable | too_slow))
                           | (iteration >= max_iterations))
        q_next, _ = orthonormalize(y)
        vt = matmul(z_basis, w_top).T
        return _State(q_next, u, s_top, vt, iteration, done, give_up)

    def running(state: _State) -> Array:
        return ~state.done & ~state.give_up

    init = _State(q0, jnp.zeros((m, k), jnp.float32), jnp.zeros((k,), jnp.float32),
                  jnp.zeros((k, n), jnp.float32), jnp.int32(0), jnp.bool_(False),
                  jnp.bool_(False))
    final = lax.while_loop(running, step, init)
    u, s, vt = lax.cond(final.give_up, lambda: _exact_topk(a, k),
                        lambda: (final.u, final.s, final.vt))
    return TopK(u, s, vt, final.give_up, final.iteration)


def rademacher(key: Array, shape: tuple[int, int]) -> Array:
    """A ±1 test matrix, entry (i, j) from a counter hash of (key, i, j).

    Halko, Martinsson & Tropp (2011, §4.6) allow any sub-Gaussian test matrix;
    random signs need ~10 integer operations an entry and compile several times
    faster than threefry Gaussians (which were ~half of the top-k SVD's compile time).
    """
    words = jax.random.key_data(key).astype(jnp.uint32).reshape(-1)
    index = jnp.arange(shape[0] * shape[1], dtype=jnp.uint32).reshape(shape)
    bits = mix32(mix32(index ^ words[0]) ^ words[-1])
    return jnp.where(bits >> 31 == 1, 1.0, -1.0).astype(jnp.float32)


def orthonormalize(y: Array) -> tuple[Array, Array]:
    """``(q, r)`` with ``y = q @ r`` and ``q`` orthonormal columns (Householder QR).

    Called on one matrix at a time (the randomised path maps over batches), so
    it is a single LAPACK call, never a batched one: batched LAPACK kernels inside
    a vmapped loop deadlocked XLA:CPU's thread pool on a 2-core machine. Columns
    that are numerically dependent on earlier ones still give orthonormal ``q``
    (LAPACK completes the basis), never NaN.
    """
    return jnp.linalg.qr(y)
