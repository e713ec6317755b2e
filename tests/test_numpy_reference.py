"""Hand-checked tests of the float64 NumPy reference (``tests/numpy_reference.py``).

Every expected value below is computed by hand in the comment next to it, from METHODS.md, so the
oracle used by the jaxmerge tests is itself checked against the spec.
"""

import math
import warnings

import numpy as np
import pytest

try:  # works whether or not tests/ is a package
    from tests import numpy_reference as ref
except ImportError:  # pragma: no cover - depends on how pytest puts tests/ on sys.path
    import numpy_reference as ref

SQ2 = math.sqrt(2.0) / 2.0
SQ3 = math.sqrt(3.0) / 2.0


def close(actual, expected, atol=1e-12):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected, np.float64), rtol=0.0, atol=atol
    )


@pytest.fixture(autouse=True)
def _numpy_warnings_are_errors():
    """No method may emit a division / invalid-value warning (§8: finite in, finite out)."""
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_cos_basic_and_zero():
    # <[1,0],[1,1]> = 1, norms 1 and sqrt2 -> 1/sqrt2 (up to the 1e-8 in the denominator).
    close(ref.cos([1.0, 0.0], [1.0, 1.0]), SQ2, atol=1e-8)
    # A zero vector: 0 / (0 + 1e-8) = 0, no NaN.
    assert ref.cos([0.0, 0.0], [1.0, 2.0]) == 0.0
    # Flattening: 2x2 tensors are compared as 4-vectors. <.,.> = 1*4 = 4; norms 1 and 4 -> 1.
    close(ref.cos([[1.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]), 1.0, atol=1e-8)


def test_majority_sign():
    assert ref.majority_sign(np.array([1.0, 1.0, -1.0])) == 1.0
    assert ref.majority_sign(np.array([1.0, -1.0, 0.0])) == 0.0
    # Over a multi-tensor scope: 1 + (-1 - 1) = -1.
    assert ref.majority_sign([np.array([1.0]), np.array([-1.0, -1.0])]) == -1.0


# ---------------------------------------------------------------------------------------------
# §1 linear / task arithmetic
# ---------------------------------------------------------------------------------------------


def test_linear_default_is_mean():
    # mean of [2, 4] and [0, -2] = [1, 1].
    close(ref.linear([[2.0, 4.0], [0.0, -2.0]]), [1.0, 1.0])


def test_linear_weighted():
    # (1*[4,0] + 3*[0,4]) / 4 = [1, 3].
    close(ref.linear([[4.0, 0.0], [0.0, 4.0]], weights=[1.0, 3.0]), [1.0, 3.0])


def test_linear_zero_weight_sum_raises():
    with pytest.raises(ValueError):
        ref.linear([[1.0], [2.0]], weights=[1.0, -1.0])


def test_task_arithmetic():
    # 0.5 * (1*[2,2] + 2*[1,-1]) = 0.5 * [4, 0] = [2, 0].
    close(ref.task_arithmetic([[2.0, 2.0], [1.0, -1.0]], scale=0.5, weights=[1.0, 2.0]), [2.0, 0.0])
    # Default: plain sum, λ = 1.
    close(ref.task_arithmetic([[1.0, 2.0], [3.0, 4.0]]), [4.0, 6.0])


def test_output_is_float64_from_float32_input():
    out = ref.task_arithmetic(np.array([[1.5, 2.0]], np.float32))
    assert out.dtype == np.float64
    close(out, [1.5, 2.0])


# ---------------------------------------------------------------------------------------------
# §1 slerp
# ---------------------------------------------------------------------------------------------


def test_slerp_two_experts_orthogonal_half():
    # base 0, v0 = [1,0], v1 = [0,1]: d = 0, Ω = π/2, sin Ω = 1, both coefficients sin(π/4).
    close(ref.slerp([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], t=0.5), [SQ2, SQ2])


def test_slerp_base_plus_one_expert():
    # N = 1: v0 = base = [1,0], v1 = base + τ = [0,1] -> result [√2/2, √2/2]; Δ = result − base.
    close(ref.slerp([1.0, 0.0], [[-1.0, 1.0]], t=0.5), [SQ2 - 1.0, SQ2])


def test_slerp_sixty_degrees_unit_vectors():
    # v0 = [1,0], v1 at 60°: the midpoint of unit vectors is the unit vector at 30°.
    close(ref.slerp([0.0, 0.0], [[1.0, 0.0], [0.5, SQ3]], t=0.5), [SQ3, 0.5])


def test_slerp_uses_unnormalised_tensors():
    # v0 = [2,0], v1 = [0,4]: coefficients sin(π/4) -> [2·√2/2, 4·√2/2].
    close(ref.slerp([0.0, 0.0], [[2.0, 0.0], [0.0, 4.0]], t=0.5), [2.0 * SQ2, 4.0 * SQ2])


def test_slerp_parallel_falls_back_to_lerp():
    # v0 = [1,1], v1 = [2,2]: d = 1 > 0.9995 -> 0.75·[1,1] + 0.25·[2,2] = [1.25, 1.25].
    close(ref.slerp([0.0, 0.0], [[1.0, 1.0], [2.0, 2.0]], t=0.25), [1.25, 1.25])
    # Antiparallel: |d| = 1 -> lerp: 0.5·[1,0] + 0.5·[-3,0] = [-1, 0].
    close(ref.slerp([0.0, 0.0], [[1.0, 0.0], [-3.0, 0.0]], t=0.5), [-1.0, 0.0])


def test_slerp_zero_tensor_not_normalised():
    # v0 = 0 stays unnormalised: d = 0, Ω = π/2 -> sin(π/4)·v1 = [√2/2 · 3, 0].
    close(ref.slerp([0.0, 0.0], [[0.0, 0.0], [3.0, 0.0]], t=0.5), [3.0 * SQ2, 0.0])


def test_slerp_endpoints_and_shape():
    base = np.array([[1.0, 2.0], [3.0, 4.0]])
    taus = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]])
    # t = 0 -> v0 = base + τ1 -> Δ = τ1; t = 1 -> Δ = τ2 (coefficients sin(0) and sin Ω/sin Ω).
    close(ref.slerp(base, taus, t=0.0), taus[0])
    close(ref.slerp(base, taus, t=1.0), taus[1])
    assert ref.slerp(base, taus).shape == (2, 2)


def test_slerp_rejects_three_models():
    with pytest.raises(ValueError):
        ref.slerp([0.0], [[1.0], [2.0], [3.0]])


# ---------------------------------------------------------------------------------------------
# §1 model_stock
# ---------------------------------------------------------------------------------------------


def test_model_stock_identical_experts_ratio_one():
    # cos = 5/(5 + 1e-8) ≈ 1 -> τ = 2·1/(1+1) = 1 -> Δ = mean = [1, 2].
    taus = [[1.0, 2.0], [1.0, 2.0]]
    close(ref.model_stock_ratio(taus), 1.0, atol=1e-8)
    close(ref.model_stock(taus), [1.0, 2.0], atol=1e-8)


def test_model_stock_orthogonal_ratio_zero():
    # cos = 0 -> τ = 0 -> Δ = 0 (the base).
    close(ref.model_stock([[1.0, 0.0], [0.0, 1.0]]), [0.0, 0.0])


def test_model_stock_sixty_degrees():
    # cos = 0.5 (up to 1e-8), N = 2: τ = 2·0.5/(1 + 0.5) = 2/3; mean = [0.75, √3/4].
    taus = [[1.0, 0.0], [0.5, SQ3]]
    close(ref.model_stock_ratio(taus), 2.0 / 3.0, atol=1e-8)
    close(ref.model_stock(taus), [0.5, SQ3 / 3.0], atol=1e-8)


def test_model_stock_single_expert_is_the_expert():
    # N = 1: cosθ := 1 -> τ = 1·1/(1 + 0) = 1 -> Δ = τ_1.
    close(ref.model_stock([[3.0, -1.0]]), [3.0, -1.0])


def test_model_stock_negative_and_zero_are_base():
    # Antiparallel: cos = −1 (≈), 1 + (N−1)cos ≈ 0 or negative ratio -> τ = 0, no warning.
    close(ref.model_stock([[1.0, 0.0], [-1.0, 0.0]]), [0.0, 0.0])
    # Three experts with pairwise cos −1, −1, +1: mean −1/3, ratio −3 -> clamp to 0.
    close(ref.model_stock([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]), [0.0, 0.0])
    # Zero task vectors: cos = 0 -> τ = 0.
    close(ref.model_stock([[0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# §2 TIES
# ---------------------------------------------------------------------------------------------


def test_ties_threshold_kthvalue():
    x = [0.1, 0.5, 0.3, 0.9]  # sorted: 0.1, 0.3, 0.5, 0.9
    # d = 4, density 0.5 -> n = 2 -> (d − n)-th = 2nd smallest = 0.3 (keeps 3 = n + 1).
    assert ref.ties_threshold(x, 0.5) == 0.3
    # density 0.25 -> n = 1 -> 3rd smallest = 0.5 (keeps 2).
    assert ref.ties_threshold(x, 0.25) == 0.5
    # density 0 -> n = 0 -> 4th smallest = the max (keeps 1).
    assert ref.ties_threshold(x, 0.0) == 0.9
    # density 1 -> n = d -> keep everything.
    assert ref.ties_threshold(x, 1.0) == -math.inf


def test_ties_trim_per_task():
    taus = [[1.0, -2.0, 0.1], [3.0, 1.0, -0.2]]
    # density 1/3: d = 3, n = 1 -> threshold = 2nd smallest |τ|.
    # task 0: |τ| sorted 0.1, 1, 2 -> h = 1 -> [1, -2, 0]; task 1: 0.2, 1, 3 -> h = 1 -> [3, 1, 0].
    close(ref.ties_trim(taus, 1.0 / 3.0), [[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]])


def test_ties_brief_example_density_two_thirds():
    taus = [[1.0, -2.0, 0.1], [3.0, 1.0, -0.2]]
    # density 2/3: n = 2 -> h = smallest |τ| -> nothing trimmed (n + 1 = 3 kept).
    # Σ = [4, -1, -0.1] -> g = [+, -, -].
    # entry 0: both agree -> (1 + 3)/2 = 2; entry 1: only -2 agrees -> -2; entry 2: -0.2.
    close(ref.ties(taus, density=2.0 / 3.0), [2.0, -2.0, -0.2])
    # sum aggregation: [4, -2, -0.2]; λ = 2 on the mean: [4, -4, -0.4].
    close(ref.ties(taus, density=2.0 / 3.0, aggregation="sum"), [4.0, -2.0, -0.2])
    close(ref.ties(taus, density=2.0 / 3.0, scale=2.0), [4.0, -4.0, -0.4])


def test_ties_brief_example_density_one_third():
    taus = [[1.0, -2.0, 0.1], [3.0, 1.0, -0.2]]
    # Trimmed (see test_ties_trim_per_task): [[1, -2, 0], [3, 1, 0]]; Σ = [4, -1, 0]
    # g = [+, -, 0]; majority sign(1 − 1 + 0) = 0 -> entry 2 stays 0.
    # Δ = [(1+3)/2, -2, 0].
    close(ref.ties(taus, density=1.0 / 3.0), [2.0, -2.0, 0.0])


def test_ties_zero_sign_takes_majority():
    taus = [[1.0, 2.0, -1.0], [1.0, 2.0, 1.0]]
    # density 1 keeps all; Σ = [2, 4, 0] -> g = [+, +, 0]; majority sign(1 + 1) = + ->
    # entry 2: only task 1 (+1) agrees -> 1. Δ = [1, 2, 1]; sum: [2, 4, 1].
    close(ref.ties(taus, density=1.0), [1.0, 2.0, 1.0])
    close(ref.ties(taus, density=1.0, aggregation="sum"), [2.0, 4.0, 1.0])


def test_elect_disjoint_scope_sum_override():
    trimmed = [[1.0], [-1.0]]
    # g = 0 here; with no scope the majority is 0 -> Δ = 0; a negative scope sum elects −.
    close(ref.elect_disjoint(trimmed), [0.0])
    close(ref.elect_disjoint(trimmed, "mean", majority_scope_sum=-3.0), [-1.0])


def test_ties_zero_tensor():
    # All-zero scope: threshold 0, disjoint mean 0.
    close(ref.ties(np.zeros((3, 4))), np.zeros(4))


def test_ties_global_threshold_spans_tensors():
    # One task; tensors A = [10, 1], B = [2, 3]. Global, density 0.5: d = 4, n = 2, threshold =
    # 2nd smallest of {1, 2, 3, 10} = 2 -> A = [10, 0], B = [2, 3].
    a = np.array([[10.0, 1.0]])
    b = np.array([[2.0, 3.0]])
    da, db = ref.ties_global([a, b], density=0.5)
    close(da, [10.0, 0.0])
    close(db, [2.0, 3.0])
    # Per tensor, A alone: d = 2, n = 1 -> threshold = smallest -> A kept whole.
    close(ref.ties(a, density=0.5), [10.0, 1.0])


def test_ties_global_majority_sign_spans_tensors():
    # A: τ0 = [2, 3], τ1 = [1, 1] -> g = [+, +]. B: τ0 = [1], τ1 = [-1] -> g = 0.
    # Global majority sign(1 + 1 + 0) = + -> B takes τ0's +1. A: [(2+1)/2, (3+1)/2].
    a = np.array([[2.0, 3.0], [1.0, 1.0]])
    b = np.array([[1.0], [-1.0]])
    da, db = ref.ties_global([a, b], density=1.0)
    close(da, [1.5, 2.0])
    close(db, [1.0])
    # Per tensor, B's own majority is sign(0) = 0 -> 0.
    close(ref.ties(b, density=1.0), [0.0])


# ---------------------------------------------------------------------------------------------
# §2 DARE
# ---------------------------------------------------------------------------------------------


def test_dare_rescale():
    # m = [1, 0], p = 0.5 -> [2/0.5, 0] = [4, 0].
    close(ref.dare([[2.0, -4.0]], [[True, False]], 0.5), [[4.0, 0.0]])


def test_dare_p_one_is_zero():
    out = ref.dare([[2.0, -4.0]], [[True, True]], 1.0)
    close(out, [[0.0, 0.0]])
    close(ref.dare_linear([[2.0, -4.0]], [[True, True]], p=1.0), [0.0, 0.0])
    close(ref.dare_ties([[2.0, -4.0]], [[True, True]], p=1.0), [0.0, 0.0])


def test_dare_linear():
    # τ̃ = [[4, 0], [2, 2]] (p = 0.5) -> Σ = [6, 2] -> λ = 0.5 -> [3, 1].
    taus = [[2.0, -4.0], [1.0, 1.0]]
    masks = [[1, 0], [1, 1]]
    close(ref.dare_linear(taus, masks, p=0.5, scale=0.5), [3.0, 1.0])


def test_dare_ties_without_and_with_trim():
    taus = [[2.0, -4.0, 1.0], [-1.0, 2.0, 3.0]]
    masks = np.ones((2, 3), bool)
    # p = 0.5: τ̃ = [[4, -8, 2], [-2, 4, 6]]. Σ = [2, -4, 8] -> g = [+, -, +].
    # Δ = [4, -8, (2 + 6)/2 = 4].
    close(ref.dare_ties(taus, masks, p=0.5), [4.0, -8.0, 4.0])
    # Trim density 1/3 (n = 1, threshold = 2nd smallest): task 0 |.| 2, 4, 8 -> h = 4 ->
    # [4, -8, 0]; task 1 |.| 2, 4, 6 -> h = 4 -> [0, 4, 6]. Σ = [4, -4, 6] -> Δ = [4, -8, 6].
    close(ref.dare_ties(taus, masks, p=0.5, trim_density=1.0 / 3.0), [4.0, -8.0, 6.0])
    # λ = 0.5.
    close(ref.dare_ties(taus, masks, p=0.5, scale=0.5), [2.0, -4.0, 2.0])


# ---------------------------------------------------------------------------------------------
# §2 Breadcrumbs
# ---------------------------------------------------------------------------------------------


def test_breadcrumbs_n_top_zero_keeps_top():
    # n = 3, γ = 0.01 -> n_top = 0; density 2/3 -> n_bot = 3 − 2 − 0 = 1.
    # |τ| ranks [0, 2, 1] -> keep ranks [1, 3) = entries 1, 2.
    close(ref.breadcrumbs([[0.1, -0.5, 0.3]], density=2.0 / 3.0, gamma=0.01), [0.0, -0.5, 0.3])


def test_breadcrumbs_drops_outliers_and_small():
    taus = [np.arange(1.0, 11.0)]  # 1..10, ranks 0..9
    # density 0.5, γ 0.1: n_top = 1, n_bot = 10 − 5 − 1 = 4 -> ranks [4, 9) = values 5..9.
    expected = [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]
    close(ref.breadcrumbs(taus, density=0.5, gamma=0.1), expected)
    # density 0.95: floor(9.5) = 9, n_bot = 10 − 9 − 1 = 0 -> ranks [0, 9) = values 1..9.
    close(ref.breadcrumbs(taus, density=0.95, gamma=0.1), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    # density 1: n_bot = 10 − 10 − 1 = −1 -> n_top = 0, n_bot = 0 -> everything kept.
    close(ref.breadcrumbs(taus, density=1.0, gamma=0.1), np.arange(1.0, 11.0))


def test_breadcrumbs_stable_ties():
    # |τ| all equal; n = 3, density 1/3 -> n_top = 0, n_bot = 2 -> keep rank 2 only; the stable
    # argsort ranks equal values by position -> the last entry is kept.
    close(ref.breadcrumbs([[1.0, -1.0, 1.0]], density=1.0 / 3.0, gamma=0.0), [0.0, 0.0, 1.0])


def test_breadcrumbs_ta_and_ties():
    taus = [[1.0, -2.0, 3.0], [-4.0, 1.0, 2.0]]
    # density 1, γ 0 keeps all. TA: Σ = [-3, -1, 5]; λ = 2 -> [-6, -2, 10].
    close(ref.breadcrumbs(taus, density=1.0, gamma=0.0, scale=2.0), [-6.0, -2.0, 10.0])
    # ties: g = [-, -, +] -> Δ = [-4, -2, (3 + 2)/2].
    close(ref.breadcrumbs(taus, density=1.0, gamma=0.0, ties=True), [-4.0, -2.0, 2.5])


def test_breadcrumbs_mask_2d_is_per_tensor():
    # 2x2, n = 4, density 0.5, γ 0 -> n_top 0, n_bot 2 -> the two largest |τ| over the tensor.
    mask = ref.breadcrumbs_mask([[4.0, 1.0], [3.0, 2.0]], density=0.5, gamma=0.0)
    assert mask.tolist() == [[True, False], [True, False]]


# ---------------------------------------------------------------------------------------------
# §2 DELLA
# ---------------------------------------------------------------------------------------------


def test_della_keep_probs_1d():
    # one row |τ| = [0.3, 0.1, 0.2] -> ranks [2, 0, 1] -> rank_norm [1, 0, 0.5];
    # density 0.5, ε 0.1: p = 0.4 + 0.2·rank_norm = [0.6, 0.4, 0.5].
    close(ref.della_keep_probs([0.3, -0.1, 0.2], density=0.5, epsilon=0.1), [0.6, 0.4, 0.5])


def test_della_keep_probs_rows_are_dim0():
    # row 0 [1, 2] -> ranks [0, 1] -> p [0.05, 0.35]; row 1 [4, 3] -> [0.35, 0.05].
    close(
        ref.della_keep_probs([[1.0, 2.0], [4.0, 3.0]], density=0.2, epsilon=0.15),
        [[0.05, 0.35], [0.35, 0.05]],
    )
    # >2-D: [2, 1, 2] is viewed as 2 rows of length 2.
    p = ref.della_keep_probs([[[1.0, 2.0]], [[4.0, 3.0]]], density=0.2, epsilon=0.15)
    close(p, [[[0.05, 0.35]], [[0.35, 0.05]]])


def test_della_keep_probs_length_one_rows():
    # Rows of length 1 -> p = density exactly (no 0/0).
    close(
        ref.della_keep_probs([[5.0], [-1.0], [0.0]], density=0.3, epsilon=0.15),
        [[0.3], [0.3], [0.3]],
    )
    close(ref.della_keep_probs([7.0], density=0.3), [0.3])
    close(ref.della_keep_probs(7.0, density=0.3), 0.3)


def test_della_merge():
    taus = [[0.3, -0.1, 0.2], [0.6, 0.2, -0.4]]
    masks = [[1, 1, 0], [1, 0, 1]]
    # density 0.5, ε 0.1. task 0: p = [0.6, 0.4, 0.5] -> τ̃ = [0.5, -0.25, 0].
    # task 1: |τ| [0.6, 0.2, 0.4] -> ranks [2, 0, 1] -> p = [0.6, 0.4, 0.5] -> τ̃ = [1, 0, -0.8].
    # Σ = [1.5, -0.25, -0.8] -> g = [+, -, -] -> Δ = [0.75, -0.25, -0.8]; λ = 2 doubles it.
    close(ref.della(taus, masks, density=0.5, epsilon=0.1), [0.75, -0.25, -0.8], atol=1e-12)
    close(
        ref.della(taus, masks, density=0.5, epsilon=0.1, scale=2.0), [1.5, -0.5, -1.6], atol=1e-12
    )


def test_della_zero_probability_gives_zero():
    # density 0.1, ε 0.15: the smallest entry has p = −0.05 <= 0 -> contributes 0, no warning.
    # |τ| [1, 2] -> p = [-0.05, 0.25] -> τ̃ = [0, 2/0.25 = 8].
    close(ref.della([[1.0, 2.0]], [[1, 1]], density=0.1, epsilon=0.15), [0.0, 8.0])


# ---------------------------------------------------------------------------------------------
# §5 RAM / RAM+
# ---------------------------------------------------------------------------------------------


def test_ram_threshold_unique_shared_inactive():
    taus = [[1e-6, 0.5, 2e-5, 0.3, 1e-6], [0.2, 1e-6, -4e-5, -0.1, -2e-6]]
    # active: task 0 [F, T, T, T, F], task 1 [T, F, T, T, F]; c = [1, 1, 2, 2, 0].
    # Δ = [0.2 (unique), 0.5 (unique), (2e-5 − 4e-5)/2, (0.3 − 0.1)/2, 0 (inactive)].
    close(ref.ram(taus), [0.2, 0.5, -1e-5, 0.1, 0.0], atol=1e-15)


def test_ram_threshold_is_strict():
    # |τ| == ε exactly is not active; just above is.
    close(ref.ram([[1e-5, 1.1e-5]]), [0.0, 1.1e-5], atol=0.0)
    # Custom ε: 0.5 is not > 0.5, 0.6 is. Sub-threshold deltas are dropped, not averaged.
    close(ref.ram([[0.5, 0.6], [0.6, 0.6]], eps=0.5), [0.6, 0.6])


def test_ram_float32_values():
    # float32(1e-5) < 1e-5, and the next float32 is > 1e-5: the strict test agrees either way.
    x = np.array([[np.float32(1e-5), np.nextafter(np.float32(1e-5), np.float32(1))]], np.float32)
    out = ref.ram(x)
    assert out[0] == 0.0 and out[1] == np.float64(x[0, 1])


def test_ram_plus_unique_boost():
    # τ0 = [1, 2, 0, 3], τ1 = [0, 4, 5, 0] -> c = [1, 2, 1, 1].
    # task 0: S = 1, U = 2 -> ρ = 0.5 -> λ = 1 + 0.1·0.5 = 1.05.
    # task 1: S = 1, U = 1 -> ρ = 1 -> λ = 1.1.
    # Δ = [1.05·1, (2+4)/2, 1.1·5, 1.05·3] = [1.05, 3, 5.5, 3.15].
    taus = np.array([[1.0, 2.0, 0.0, 3.0], [0.0, 4.0, 5.0, 0.0]])
    lambdas, rhos = ref.ram_plus_lambdas([taus])
    close(rhos, [0.5, 1.0])
    close(lambdas, [1.05, 1.1])
    (delta,) = ref.ram_plus([taus])
    close(delta, [1.05, 3.0, 5.5, 3.15])


def test_ram_plus_no_unique_and_no_active():
    # τ0 = [1, 0], τ1 = [3, 4] -> c = [2, 1]. task 0: S = 1, U = 0 -> ρ = α = 2 -> λ = 1.2.
    # task 1: S = 1, U = 1 -> λ = 1.1. Δ = [(1+3)/2, 1.1·4].
    taus = np.array([[1.0, 0.0], [3.0, 4.0]])
    lambdas, rhos = ref.ram_plus_lambdas([taus])
    close(rhos, [2.0, 1.0])
    close(lambdas, [1.2, 1.1])
    close(ref.ram_plus([taus])[0], [2.0, 4.4])
    # A task with no active entry: N = 0 -> ρ = 0 -> λ = 1 (and it owns nothing).
    lambdas, rhos = ref.ram_plus_lambdas([np.array([[0.0, 0.0], [1.0, 0.0]])])
    close(rhos, [0.0, 0.0])
    close(lambdas, [1.0, 1.0])


def test_ram_plus_clip_with_official_setting():
    # τ0 = [1, 1, 1, 1], τ1 = [1, 1, 1, 0] -> c = [2, 2, 2, 1]; task 0: S = 3, U = 1 -> ρ = 3.
    # r = 0.2, α = 1: λ0 = 1 + 0.2·min(3, 1) = 1.2 -> Δ = [1, 1, 1, 1.2].
    taus = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    close(ref.ram_plus([taus], r=0.2, alpha=1.0)[0], [1.0, 1.0, 1.0, 1.2])
    # Paper default α = 2: λ0 = 1 + 0.1·2 = 1.2 too.
    close(ref.ram_plus([taus])[0], [1.0, 1.0, 1.0, 1.2])


def test_ram_plus_global_vs_per_tensor():
    # X: τ0 = [1, 1], τ1 = [1, 0] -> c = [2, 1]. Y: τ0 = [0], τ1 = [2] -> c = [1].
    # Global: task 0 S = 1, U = 1 -> λ0 = 1.1; task 1 S = 1 (X[0]), U = 1 (Y[0]) -> λ1 = 1.1.
    # X Δ = [1, 1.1·1], Y Δ = [1.1·2].
    x = np.array([[1.0, 1.0], [1.0, 0.0]])
    y = np.array([[0.0], [2.0]])
    dx, dy = ref.ram_plus([x, y])
    close(dx, [1.0, 1.1])
    close(dy, [2.2])
    # Per tensor Y: task 1 S = 0, U = 1 -> ρ = 0 -> λ = 1 -> Δ = [2].
    close(ref.ram_plus([y])[0], [2.0])
    close(ref.ram_plus([x])[0], [1.0, 1.1])


def test_ram_plus_without_boost_equals_ram():
    rng = np.random.default_rng(0)
    taus = rng.normal(size=(3, 5, 4)) * (rng.random((3, 5, 4)) < 0.5)
    close(ref.ram_plus([taus], r=0.0)[0], ref.ram(taus))
