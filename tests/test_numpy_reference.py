"""Hand-checked tests of the float64 NumPy reference (``tests/numpy_reference.py``).

Every expected value below is computed by hand in the comment next to it, from METHODS.md, so the
oracle used by the jaxmerge tests is itself checked against the spec.
"""

import math
import warnings
from fractions import Fraction

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


# ---------------------------------------------------------------------------------------------
# §3 / §4 spectral methods: helpers for building matrices with a known SVD
# ---------------------------------------------------------------------------------------------


def _orth(rng, m, k):
    """An m×k matrix with orthonormal columns (QR of a Gaussian matrix)."""
    q, _ = np.linalg.qr(rng.normal(size=(m, k)))
    return q


def _from_svd(u, s, v):
    """u diag(s) vᵀ for u: m×k, s: k, v: n×k."""
    return (u * np.asarray(s, np.float64)) @ v.T


def _gram_vectors(rng, gram, dim):
    """Rows x_t (t < N) of length ``dim`` with the Gram matrix ⟨x_s, x_t⟩ = gram[s, t]."""
    chol = np.linalg.cholesky(np.asarray(gram, np.float64))
    basis = _orth(rng, dim, chol.shape[0])
    return chol @ basis.T


def _equal_cos_gram(n, s):
    """Gram matrix of N unit vectors with every pairwise cosine equal to s."""
    return (1.0 - s) * np.eye(n) + s * np.ones((n, n))


def _residual_stack(rng, gram, shape=(4, 5), norms=None):
    vectors = _gram_vectors(rng, gram, int(np.prod(shape)))
    if norms is not None:
        vectors = vectors * np.asarray(norms, np.float64)[:, None]
    return vectors.reshape((len(vectors),) + tuple(shape))


def _singular_values(a):
    return np.linalg.svd(np.asarray(a, np.float64), compute_uv=False)


def _rel_close(actual, expected, rtol):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    close(actual, expected, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# §0 polar, §3/§4 non-matrix rules
# ---------------------------------------------------------------------------------------------


def test_polar_of_orthonormal_matrix_is_itself():
    rng = np.random.default_rng(1)
    u = _orth(rng, 7, 3)  # tall, orthonormal columns: U = U·I·I -> P Qᵀ = U
    close(ref.polar(u), u, atol=1e-12)
    close(ref.polar(u.T), u.T, atol=1e-12)  # wide, orthonormal rows


def test_polar_recovers_the_rotation_factor():
    rng = np.random.default_rng(2)
    # A = W S with W orthonormal columns and S symmetric positive definite: the polar factor of A
    # is W (A = P diag(s) Qᵀ with W = P Qᵀ, S = Q diag(s) Qᵀ).
    w = _orth(rng, 6, 3)
    q = _orth(rng, 3, 3)
    s_spd = _from_svd(q, [3.0, 1.0, 0.5], q)
    close(ref.polar(w @ s_spd), w, atol=1e-12)
    # Square: W orthogonal.
    w = _orth(rng, 4, 4)
    q = _orth(rng, 4, 4)
    close(ref.polar(w @ _from_svd(q, [5.0, 2.0, 2.0, 0.1], q)), w, atol=1e-11)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_polar_is_a_partial_isometry_even_when_rank_deficient(shape):
    rng = np.random.default_rng(3)
    r = min(shape)
    for a in (np.zeros(shape), np.outer(rng.normal(size=shape[0]), rng.normal(size=shape[1]))):
        p = ref.polar(a)
        assert p.shape == shape
        gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
        close(gram, np.eye(r), atol=1e-12)


def test_nonmatrix_rules():
    taus = [[1.0, 2.0], [3.0, 6.0]]
    # mean = [2, 4]; TSV / ISO: × α = 1.5 -> [3, 6]; ResMerge: plain mean.
    close(ref.spectral_nonmatrix(taus, alpha=1.5), [3.0, 6.0])
    close(ref.spectral_nonmatrix(taus), [2.0, 4.0])
    close(ref.resmerge_nonmatrix(taus), [2.0, 4.0])
    close(ref.resmerge_nonmatrix([[[1.0]], [[2.0]], [[6.0]]]), [[3.0]])


def test_spectral_methods_reject_non_matrix_leaves():
    for fn in (ref.resmerge, ref.tsv, ref.iso_c, ref.iso_cts, ref.star):
        with pytest.raises(ValueError):
            fn(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# §4 step 1: spectral split
# ---------------------------------------------------------------------------------------------


def test_spectral_split_closed_form():
    rng = np.random.default_rng(4)
    u, v = _orth(rng, 5, 3), _orth(rng, 4, 3)
    tau = _from_svd(u, [5.0, 2.0, 1.0], v)
    # k = 1: H = 5 u1 v1ᵀ, R = 2 u2 v2ᵀ + u3 v3ᵀ.
    head, res = ref.spectral_split(tau)
    close(head, 5.0 * np.outer(u[:, 0], v[:, 0]), atol=1e-12)
    close(res, _from_svd(u[:, 1:], [2.0, 1.0], v[:, 1:]), atol=1e-12)
    # k = 2: H gets the 2 u2 v2ᵀ term too.
    head, res = ref.spectral_split(tau, k=2)
    close(head, _from_svd(u[:, :2], [5.0, 2.0], v[:, :2]), atol=1e-12)
    close(res, np.outer(u[:, 2], v[:, 2]), atol=1e-12)
    # k >= r: H = τ, R = 0.
    head, res = ref.spectral_split(tau, k=9)
    close(head, tau, atol=1e-12)
    close(res, np.zeros_like(tau), atol=1e-12)


def test_spectral_split_zero_and_bad_rank():
    head, res = ref.spectral_split(np.zeros((3, 4)))
    assert np.all(head == 0.0) and np.all(res == 0.0)
    with pytest.raises(ValueError):
        ref.spectral_split(np.ones((2, 2)), k=0)


# ---------------------------------------------------------------------------------------------
# §4 step 2: SRC-A
# ---------------------------------------------------------------------------------------------

# Worked example of resmerge-release-notes §1.6: N = 3, every pairwise residual cosine 0.02.
# c_R = √((1 + 2·0.02)/3) = 0.58878; s̄ = 0.51; c̄ = (1 + c_R)/2 = 0.79439; ρ = ½(s̄ + c̄) = 0.65220;
# v2: β = 1 − 0.3ρ = 0.80434, α_R = c_R^β = 0.65308, gain α_R / c_R = 1.109.
# v1 attention: pair = clamp((0.02 − 0.03)/0.02) = 0; coh = (c − 1/√3)/(0.6 − 1/√3) = 0.5048;
# ρ = 0.2524, β = 0.9243, gain c^(β−1) = 1.041. v1 ffn: ρ = 0.0631, β = 0.9811, gain 1.010.


def test_src_a_worked_example_v2():
    rng = np.random.default_rng(5)
    res = _residual_stack(rng, _equal_cos_gram(3, 0.02))
    a, info = ref.src_a_details(res)
    assert info["case"] == "src"
    close(info["s_R"], 0.02, atol=1e-7)
    close(info["c_R"], math.sqrt(1.04 / 3.0), atol=1e-7)
    close(info["c_R"], 0.5888, atol=5e-5)
    close(info["s_bar"], 0.51, atol=1e-7)
    close(info["c_bar"], 0.7944, atol=5e-5)
    close(info["score"], 0.6522, atol=5e-5)
    close(info["beta"], 0.8043, atol=5e-5)
    close(info["alpha_R"], 0.6531, atol=5e-5)
    close(info["alpha_R"] / info["c_R"], 1.109, atol=5e-4)
    # A = α_R · n̄ · q_src with n̄ = 1 and q_src = ΣR / ‖ΣR‖ (equal norms).
    total = np.sum(res, axis=0)
    close(a, info["alpha_R"] * total / np.linalg.norm(total), atol=1e-7)


@pytest.mark.parametrize(
    "family, score, beta, gain",
    [("attention", 0.252, 0.924, 1.041), ("ffn", 0.063, 0.981, 1.010), ("other", 0.0, 1.0, 1.0)],
)
def test_src_a_worked_example_v1_ramp(family, score, beta, gain):
    rng = np.random.default_rng(6)
    res = _residual_stack(rng, _equal_cos_gram(3, 0.02))
    a, info = ref.src_a_details(res, family=family, score_map="ramp")
    assert info["case"] == "src"
    assert info["pair_score"] == 0.0  # s_R = 0.02 < τ_p = 0.03
    close(info["coh_score"], 0.505, atol=5e-4)
    close(info["score"], score, atol=5e-4)
    close(info["beta"], beta, atol=5e-4)
    close(info["alpha_R"] / info["c_R"], gain, atol=5e-4)
    # A = (q̄ / c) · c^β · n̄; equal unit norms -> q̄ = mean R, so ‖A‖ = c^β.
    mean = np.mean(res, axis=0)
    close(a, mean / np.linalg.norm(mean) * info["alpha_R"], atol=1e-12)


def test_src_a_family_scales_change_beta():
    rng = np.random.default_rng(7)
    res = _residual_stack(rng, _equal_cos_gram(3, 0.02))
    beta = {}
    for family, kwargs in [
        ("attention", {}),
        ("ffn", {}),  # φ = 0.25: ρ = 0.6522/4 = 0.16305, β = 1 − 0.3·0.16305 = 0.95109
        ("ffn", {"ffn_score_scale": 1.0}),  # v2 HEAD: ffn like attention, β = 0.80434
        ("attention", {"attention_score_scale": 0.5}),  # ρ = 0.3261, β = 0.90217
        ("other", {}),  # φ = 0: β = 1
        ("norm", {"other_score_scale": 1.0}),  # an unknown family takes the "other" scale
    ]:
        beta[(family, tuple(kwargs.items()))] = ref.src_a_details(res, family, **kwargs)[1]["beta"]
    close(beta[("attention", ())], 0.80434, atol=5e-5)
    close(beta[("ffn", ())], 0.95109, atol=5e-5)
    close(beta[("ffn", (("ffn_score_scale", 1.0),))], 0.80434, atol=5e-5)
    close(beta[("attention", (("attention_score_scale", 0.5),))], 0.90217, atol=5e-5)
    assert beta[("other", ())] == 1.0
    close(beta[("norm", (("other_score_scale", 1.0),))], 0.80434, atol=5e-5)
    # β_min / β_max: ρ = 0.6522 -> β = 0.9 − 0.4·0.6522 = 0.63912.
    info = ref.src_a_details(res, beta_min=0.5, beta_max=0.9)[1]
    close(info["beta"], 0.9 - 0.4 * 0.652196, atol=5e-5)


def test_src_a_other_family_is_the_plain_mean_for_equal_norms():
    # φ = 0 -> β = 1 -> A = c_R · n̄ · q_src; with equal norms n, c_R = ‖Q‖/N and q_src = Q/‖Q‖,
    # so A = n·Q/N = mean R (up to the 1e-8 eps terms).
    rng = np.random.default_rng(8)
    res = 2.0 * _residual_stack(rng, _equal_cos_gram(4, 0.3))
    a, info = ref.src_a_details(res, family="other")
    assert info["case"] == "src"
    close(a, np.mean(res, axis=0), atol=1e-7)
    # Attention instead amplifies the same direction by c_R^(β−1) > 1.
    a_att = ref.src_a(res, family="attention")
    ratio = np.linalg.norm(a_att) / np.linalg.norm(np.mean(res, axis=0))
    assert ratio > 1.01
    close(a_att / np.linalg.norm(a_att), a / np.linalg.norm(a), atol=1e-7)


GRAMS_AROUND_ZERO = [
    # (gram, fallback expected): the v2 fallback fires exactly when the mean pairwise cos <= 0.
    (_equal_cos_gram(2, -0.5), True),
    (_equal_cos_gram(2, 0.0), True),
    (_equal_cos_gram(2, 1e-3), False),
    (_equal_cos_gram(2, 0.5), False),
    (_equal_cos_gram(3, -0.2), True),
    (_equal_cos_gram(3, 0.0), True),
    (_equal_cos_gram(3, -1e-3), True),
    (_equal_cos_gram(3, 1e-3), False),
    (_equal_cos_gram(3, 0.02), False),
    (_equal_cos_gram(5, -0.1), True),
    (_equal_cos_gram(5, 0.0), True),
    (_equal_cos_gram(5, 1e-3), False),
    (_equal_cos_gram(5, 0.4), False),
    # Unequal pairwise cosines: (0.3, −0.2, −0.1) has mean 0; (0.3, −0.2, −0.05) has mean > 0.
    (np.array([[1.0, 0.3, -0.2], [0.3, 1.0, -0.1], [-0.2, -0.1, 1.0]]), True),
    (np.array([[1.0, 0.3, -0.2], [0.3, 1.0, -0.05], [-0.2, -0.05, 1.0]]), False),
]


@pytest.mark.parametrize("case", range(len(GRAMS_AROUND_ZERO)))
def test_src_a_fallback_iff_mean_pairwise_cos_nonpositive(case):
    gram, fallback = GRAMS_AROUND_ZERO[case]
    n = gram.shape[0]
    rng = np.random.default_rng(100 + case)
    norms = np.linspace(0.5, 2.0, n)  # unequal norms: cosines do not depend on them
    res = _residual_stack(rng, gram, norms=norms)
    a, info = ref.src_a_details(res)
    if fallback:
        assert info["case"] == "fallback"
        close(a, np.mean(res, axis=0), atol=1e-15)
    else:
        assert info["case"] == "src"
        assert info["c_R"] > 1.0 / math.sqrt(n)
        # A = c_R^β · n̄ · q_src, q_src the unit direction of Σ_t R_t/‖R_t‖.
        q_sum = np.sum(res / norms[:, None, None], axis=0)
        expected = info["c_R"] ** info["beta"] * np.mean(norms) * q_sum / np.linalg.norm(q_sum)
        close(a, expected, atol=1e-7)
        assert not np.allclose(a, np.mean(res, axis=0), atol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_src_a_coherence_formula(n):
    # ‖Σ q_t‖² = N + N(N−1) s̄ for unit q_t, so c_R = ‖Q‖/N = √((1 + (N−1) s̄)/N), any norms.
    rng = np.random.default_rng(200 + n)
    common = rng.normal(size=(4, 5))
    res = np.stack([common + rng.normal(size=(4, 5)) * (t + 1) for t in range(n)])
    unit = [r.ravel() / np.linalg.norm(r) for r in res]
    s_bar = np.mean([unit[i] @ unit[j] for i in range(n) for j in range(i + 1, n)])
    expected_c = math.sqrt((1.0 + (n - 1) * s_bar) / n)
    info = ref.src_a_details(res)[1]
    close(info["s_R"], s_bar, atol=1e-7)
    close(info["c_R"], expected_c, atol=1e-7)
    info = ref.src_a_details(res, score_map="ramp")[1]  # v1: c = ‖mean q‖, the same number
    close(info["s_R"], s_bar, atol=1e-12)
    close(info["c_R"], expected_c, atol=1e-12)


def test_src_a_single_expert_returns_the_residual():
    rng = np.random.default_rng(9)
    res = rng.normal(size=(1, 3, 4))
    a, info = ref.src_a_details(res)
    # N = 1: s_R = 1, c_R = cos(q, q_src) ≈ 1 <= 1/√1 -> fallback, A = R exactly.
    assert info["s_R"] == 1.0 and info["case"] == "fallback"
    close(a, res[0], atol=0.0)
    # v1: c = ‖q‖ = 1, A = (q/1) · 1^β · ‖R‖ = R.
    close(ref.src_a(res, score_map="ramp"), res[0], atol=1e-14)


def test_src_a_cancelling_residuals_take_the_mean_branch():
    rng = np.random.default_rng(10)
    r = rng.normal(size=(3, 3))
    r /= np.linalg.norm(r)
    # R and −2R: q_1 + q_2 = R(1/(1+ε) − 2/(2+ε)) ≈ −(ε/2)R, ‖Q‖ ≈ 5e-9 <= 1e-8 -> A = mean R.
    res = np.stack([r, -2.0 * r])
    a, info = ref.src_a_details(res)
    assert info["case"] == "q_sum_zero"
    close(a, -0.5 * r, atol=1e-15)
    # v1: q = ±R exactly, q̄ = 0 -> c = 0 <= eps -> A = 0 (no mean fallback).
    a, info = ref.src_a_details(res, score_map="ramp")
    assert info["case"] == "zero_coherence"
    assert np.all(a == 0.0)


def test_src_a_v1_has_no_mean_fallback():
    # s = −0.2, N = 3: c = √((1 − 0.4)/3) = 0.447 < 1/√3 -> coh = 0, pair = 0, ρ = 0, β = 1, and
    # A = (q̄/c)·c·n̄ = n̄ · mean_t(R_t/‖R_t‖), which is not the mean residual for unequal norms.
    rng = np.random.default_rng(11)
    norms = np.array([0.5, 1.0, 3.0])
    res = _residual_stack(rng, _equal_cos_gram(3, -0.2), norms=norms)
    a, info = ref.src_a_details(res, score_map="ramp")
    assert info["score"] == 0.0 and info["beta"] == 1.0
    expected = np.mean(norms) * np.mean(res / norms[:, None, None], axis=0)
    close(a, expected, atol=1e-12)
    assert not np.allclose(a, np.mean(res, axis=0), atol=1e-3)


def test_src_a_v1_ramp_thresholds():
    # N = 2, s = 0.04: pair = (0.04 − 0.03)/0.02 = 0.5; c = √(1.04/2) = 0.72111 >= 1/√2 + 1e-8
    # so coh = clamp((c − 0.70711)/(1e-8)) = 1. ρ = ½(0.5 + 1) = 0.75, β = 1 − 0.3·0.75 = 0.775.
    rng = np.random.default_rng(12)
    res = _residual_stack(rng, _equal_cos_gram(2, 0.04))
    info = ref.src_a_details(res, score_map="ramp")[1]
    close(info["pair_score"], 0.5, atol=1e-9)
    assert info["coh_score"] == 1.0
    close(info["beta"], 0.775, atol=1e-9)
    # Custom thresholds: τ_p = 0.0, r_p = 0.08 -> pair = 0.5 again; r_c = 0.9 ->
    # coh = (0.72111 − 0.70711)/(0.9 − 0.70711) = 0.072591.
    info = ref.src_a_details(
        res, score_map="ramp", pair_threshold=0.0, pair_ref=0.08, coherence_ref=0.9
    )[1]
    close(info["pair_score"], 0.5, atol=1e-9)
    c = math.sqrt(0.52)
    close(info["coh_score"], (c - SQ2) / (0.9 - SQ2), atol=1e-9)


@pytest.mark.parametrize("score_map", ["affine", "ramp"])
def test_src_a_zero_and_sub_eps_residuals(score_map):
    assert np.all(ref.src_a(np.zeros((3, 2, 2)), score_map=score_map) == 0.0)
    # Every ‖R_t‖ <= 1e-8 -> A = 0 (step 2.1).
    tiny = np.full((2, 2, 2), 1e-9)
    a, info = ref.src_a_details(tiny, score_map=score_map)
    assert info["case"] == "zero" and np.all(a == 0.0)


def test_src_a_rejects_unknown_score_map():
    with pytest.raises(ValueError):
        ref.src_a(np.ones((2, 2, 2)), score_map="sigmoid")


# ---------------------------------------------------------------------------------------------
# §4 step 3: LHC
# ---------------------------------------------------------------------------------------------


def test_lhc_gate_values():
    rng = np.random.default_rng(13)
    h = _gram_vectors(rng, [[1.0, 0.5], [0.5, 1.0]], 6).reshape(2, 2, 3)
    # Two heads at cos 0.5 (norms irrelevant) -> S_H = 0.5 (up to the 1e-8 in cos).
    close(ref.lhc_gate(np.stack([h[0], 3.0 * h[1]])), 0.5, atol=1e-7)
    # cos −0.5 -> max(0, ·) = 0.
    close(ref.lhc_gate(np.stack([h[0], -h[1]])), 0.0, atol=0.0)
    # Three heads with cosines (0.5, −0.2, 0.6): positive mean (0.5 + 0 + 0.6)/3 = 0.36667;
    # "mean" gate: max(0, (0.5 − 0.2 + 0.6)/3) = 0.3; "none": 1.
    gram = [[1.0, 0.5, -0.2], [0.5, 1.0, 0.6], [-0.2, 0.6, 1.0]]
    three = _gram_vectors(rng, gram, 8).reshape(3, 2, 4)
    close(ref.lhc_gate(three), 1.1 / 3.0, atol=1e-7)
    close(ref.lhc_gate(three, gate="mean"), 0.3, atol=1e-7)
    assert ref.lhc_gate(three, gate="none") == 1.0
    # Only one head above 1e-8 -> 1; none -> 0; N = 1 -> 1.
    assert ref.lhc_gate(np.stack([h[0], np.zeros((2, 3)), np.full((2, 3), 1e-10)])) == 1.0
    assert ref.lhc_gate(np.zeros((3, 2, 3))) == 0.0
    assert ref.lhc_gate(h[:1]) == 1.0
    with pytest.raises(ValueError):
        ref.lhc_gate(h, gate="max")


def test_lhc_correction_hand_values():
    # h1 = [2, 0], h2 = [1, √3] (norm 2, cos 0.5) -> S_H = 0.5; H̄ = [1.5, √3/2], ‖H̄‖ = √3,
    # H̄/‖H̄‖ = [√3/2, 1/2]. ‖A‖ = 4 -> C = 0.2 · 0.5 · 4 · [√3/2, 1/2] = [0.34641, 0.2].
    heads = np.array([[[2.0, 0.0]], [[1.0, 2.0 * SQ3]]])
    backbone = np.array([[0.0, 4.0]])
    close(ref.lhc(heads, backbone), [[0.4 * SQ3, 0.2]], atol=1e-8)
    # Ungated: S_H = 1 -> twice that. ρ_max = 0.5 -> 2.5 times.
    close(ref.lhc(heads, backbone, gate="none"), [[0.8 * SQ3, 0.4]], atol=1e-12)
    close(ref.lhc(heads, backbone, rho_max=0.5), [[SQ3, 0.5]], atol=1e-8)


def test_lhc_correction_is_zero_when_a_condition_fails():
    heads = np.array([[[1.0, 0.0]], [[1.0, 0.0]]])
    backbone = np.array([[3.0, 4.0]])
    close(ref.lhc(heads, backbone), [[1.0, 0.0]], atol=1e-7)  # 0.2 · 1 · 5 · [1, 0]
    assert np.all(ref.lhc(heads, np.zeros((1, 2))) == 0.0)  # ‖A‖ = 0
    assert np.all(ref.lhc(heads, np.array([[1e-9, 0.0]])) == 0.0)  # ‖A‖ <= 1e-8
    assert np.all(ref.lhc(heads, backbone, rho_max=0.0) == 0.0)  # budget 0
    opposite = np.array([[[1.0, 0.0]], [[-1.0, 0.0]]])
    assert np.all(ref.lhc(opposite, backbone) == 0.0)  # S_H = 0
    assert np.all(ref.lhc(opposite, backbone, gate="none") == 0.0)  # H̄ = 0
    # H̄ averages over all N, zero heads included: one head of 3 -> H̄ = h/3, same direction.
    one = np.array([[[0.0, 2.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    close(ref.lhc(one, backbone), [[0.0, 1.0]], atol=1e-12)
    # ... which also decides the ‖H̄‖ > 1e-8 test: one head of norm 2e-8 among N = 5 is kept
    # (2e-8 > 1e-8, S_H = 1) but H̄ = 4e-9 <= 1e-8 -> C = 0. Among N = 1, H̄ = 2e-8 -> C ≠ 0.
    small = np.zeros((5, 1, 2))
    small[0, 0, 1] = 2e-8
    assert ref.lhc_gate(small) == 1.0
    assert np.all(ref.lhc(small, backbone) == 0.0)
    close(ref.lhc(small[:1], backbone), [[0.0, 1.0]], atol=1e-12)


# ---------------------------------------------------------------------------------------------
# §4 ResMerge
# ---------------------------------------------------------------------------------------------


def _head_plus_residual(rng, m, n, head_sigmas, residual_block):
    """τ = Σ_i σ_i p_i q_iᵀ + P_rest X Q_restᵀ with orthonormal bases P, Q (random rotations).

    The head directions are orthogonal to the residual on both sides, so if every σ_i exceeds
    ‖X‖₂ the exact top-k split is H = Σ_i σ_i p_i q_iᵀ, R = P_rest X Q_restᵀ.
    """
    k = len(head_sigmas)
    p, q = _orth(rng, m, m), _orth(rng, n, n)
    head = _from_svd(p[:, :k], head_sigmas, q[:, :k])
    residual = p[:, k:] @ residual_block @ q[:, k:].T
    return head, residual


def test_resmerge_single_expert():
    rng = np.random.default_rng(14)
    head, residual = _head_plus_residual(rng, 5, 4, [6.0], rng.normal(size=(4, 3)) * 0.5)
    assert _singular_values(residual)[0] < 6.0
    # N = 1: A = R₁ (fallback), S_H = 1, Δ = R₁ + 0.2 ‖R₁‖ Ĥ₁ (not the expert).
    expected = residual + 0.2 * np.linalg.norm(residual) * head / np.linalg.norm(head)
    out = ref.resmerge((head + residual)[None])
    close(out, expected, atol=1e-12)
    assert not np.allclose(out, head + residual, atol=1e-3)
    # Same with the ramp map (c = 1, A = R).
    close(ref.resmerge((head + residual)[None], score_map="ramp"), expected, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_resmerge_identical_experts(n):
    rng = np.random.default_rng(20 + n)
    head, residual = _head_plus_residual(rng, 4, 6, [5.0], rng.normal(size=(3, 5)) * 0.4)
    # Identical residuals: c_R ≈ 1 > 1/√N, A = c_R^β ‖R‖ q̂ ≈ R; S_H ≈ 1; Δ ≈ R + 0.2‖R‖Ĥ.
    expected = residual + 0.2 * np.linalg.norm(residual) * head / np.linalg.norm(head)
    taus = np.stack([head + residual] * n)
    for score_map in ("affine", "ramp"):
        for family in ("attention", "ffn", "other"):
            _rel_close(ref.resmerge(taus, family=family, score_map=score_map), expected, 1e-7)


def test_resmerge_zero_experts_count_in_n():
    rng = np.random.default_rng(15)
    head, residual = _head_plus_residual(rng, 4, 4, [4.0], rng.normal(size=(3, 3)) * 0.5)
    for n in (2, 3, 5):
        taus = np.zeros((n, 4, 4))
        taus[0] = head + residual
        # q_t = 0 for the zero experts: c_R = 1/N <= 1/√N -> A = mean R = R₁/N. Only head 1 is
        # kept -> S_H = 1, H̄ = H₁/N -> C = 0.2 ‖R₁‖/N Ĥ₁.
        expected = (residual + 0.2 * np.linalg.norm(residual) * head / np.linalg.norm(head)) / n
        close(ref.resmerge(taus), expected, atol=1e-12)


def test_resmerge_head_rank_two():
    rng = np.random.default_rng(16)
    head, residual = _head_plus_residual(rng, 5, 5, [5.0, 4.0], rng.normal(size=(3, 3)) * 0.3)
    # H = 5 p1 q1ᵀ + 4 p2 q2ᵀ, ‖H‖ = √41.
    expected = residual + 0.2 * np.linalg.norm(residual) * head / math.sqrt(41.0)
    close(ref.resmerge((head + residual)[None], head_rank=2), expected, atol=1e-12)
    # With the default rank 1 the 4 p2 q2ᵀ term is residual instead.
    assert not np.allclose(ref.resmerge((head + residual)[None]), expected, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, a_norm",
    [
        ({}, 0.6531),  # v2: ‖A‖ = α_R n̄ = 0.6531 (release notes §1.6)
        ({"score_map": "ramp"}, 1.041 * 0.58878),  # v1 attention: gain 1.041 over c_R
        ({"score_map": "ramp", "family": "ffn"}, 1.010 * 0.58878),
        ({"family": "other"}, 0.58878),  # β = 1: the plain mean residual's norm c_R n̄
    ],
)
def test_resmerge_worked_example_end_to_end(kwargs, a_norm):
    # N = 3 experts: heads σ_t p0 q0ᵀ (σ = 8, 10, 12, one shared direction, so S_H = 1), residuals
    # orthogonal to p0 / q0 with unit norms and pairwise cosine 0.02 (‖R_t‖₂ <= 1 < σ_t).
    rng = np.random.default_rng(17)
    p, q = _orth(rng, 6, 6), _orth(rng, 6, 6)
    blocks = _residual_stack(rng, _equal_cos_gram(3, 0.02), shape=(5, 5))
    head_dir = np.outer(p[:, 0], q[:, 0])
    residuals = np.stack([p[:, 1:] @ b @ q[:, 1:].T for b in blocks])
    taus = np.stack([s * head_dir + r for s, r in zip([8.0, 10.0, 12.0], residuals)])
    out = ref.resmerge(taus, **kwargs)
    # Δ = A + 0.2 ‖A‖ p0 q0ᵀ with A along ΣR_t (A ⊥ the head direction).
    along_head = float(np.sum(out * head_dir))
    backbone = out - along_head * head_dir
    close(np.linalg.norm(backbone), a_norm, atol=5e-4)
    close(along_head, 0.2 * np.linalg.norm(backbone), atol=1e-7)
    total = np.sum(residuals, axis=0)
    close(backbone / np.linalg.norm(backbone), total / np.linalg.norm(total), atol=1e-7)


def test_resmerge_gate_option():
    # Two experts whose heads point in opposite-ish directions (cos −0.6): the gated correction
    # vanishes, the ungated one does not.
    rng = np.random.default_rng(18)
    p, q = _orth(rng, 5, 5), _orth(rng, 5, 5)
    h1 = 6.0 * np.outer(p[:, 0], q[:, 0])
    h2 = 7.0 * np.outer(-0.6 * p[:, 0] + 0.8 * p[:, 1], q[:, 0])
    res = _residual_stack(rng, _equal_cos_gram(2, 0.5), shape=(3, 4)) * 0.5
    residuals = np.stack([p[:, 2:] @ r @ q[:, 1:].T for r in res])
    taus = np.stack([h1 + residuals[0], h2 + residuals[1]])
    gated = ref.resmerge(taus)
    backbone = ref.src_a(residuals)
    close(gated, backbone, atol=1e-12)  # S_H = max(0, −0.6) = 0 -> C = 0
    ungated = ref.resmerge(taus, gate="none")
    h_bar = (h1 + h2) / 2.0
    expected = backbone + 0.2 * np.linalg.norm(backbone) * h_bar / np.linalg.norm(h_bar)
    close(ungated, expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# §3 TSV-Merge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 5), (6, 4), (3, 7)])
def test_tsv_single_expert_returns_tau(shape):
    # N = 1: k = r, U_cat = U and V_cat = Vᵀ have orthonormal columns / rows, polar leaves them
    # unchanged, so Δ = U diag(σ) Vᵀ = τ (any rank).
    rng = np.random.default_rng(30)
    tau = rng.normal(size=shape)
    close(ref.tsv(tau[None]), tau, atol=1e-12)
    rank_one = np.outer(rng.normal(size=shape[0]), rng.normal(size=shape[1]))
    close(ref.tsv(rank_one[None]), rank_one, atol=1e-12)
    close(ref.tsv(tau[None], alpha=0.5), 0.5 * tau, atol=1e-12)


@pytest.mark.parametrize("n, r", [(2, 6), (3, 6), (4, 10), (5, 10)])
def test_tsv_orthogonal_top_spaces_sum_their_truncations(n, r):
    # Global orthonormal bases e_0.., f_0..; task t owns indices [t·k, (t+1)·k) with σ > 1 there,
    # plus a tail 0.5·e_a f_bᵀ on indices of the NEXT task (orthogonal to its own top-k, smaller).
    # The top-k blocks of all tasks are mutually orthonormal, so polar() keeps them and
    # TSV = Σ_t (rank-k truncation of τ_t) = Σ_t (τ_t − tail_t). Leftover slots (r − N·k) are 0.
    rng = np.random.default_rng(31 + n)
    m = r + 2
    k = r // n
    e, f = _orth(rng, m, r), _orth(rng, r, r)
    taus, truncations = [], []
    for t in range(n):
        top = sum(
            (3.0 + t + 0.5 * i) * np.outer(e[:, t * k + i], f[:, t * k + i]) for i in range(k)
        )
        nxt = ((t + 1) % n) * k
        tail = 0.5 * np.outer(e[:, nxt], f[:, nxt + k - 1])
        taus.append(top + tail)
        truncations.append(top)
    expected = np.sum(truncations, axis=0)
    close(ref.tsv(np.stack(taus)), expected, atol=1e-10)
    close(ref.tsv(np.stack(taus), alpha=2.0), 2.0 * expected, atol=1e-10)
    assert not np.allclose(expected, np.sum(taus, axis=0), atol=1e-3)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_tsv_singular_values_are_the_kept_ones(n):
    # polar() gives orthonormal columns / rows whatever the overlap, so Δ = U⊥ diag(s_cat) V⊥ is
    # an SVD: the singular values of Δ are the top-k σ of every task (plus zeros).
    rng = np.random.default_rng(40 + n)
    m, cols = 11, 10
    k = 10 // n
    taus = rng.normal(size=(n, m, cols))
    kept = np.concatenate([_singular_values(t)[:k] for t in taus])
    kept = np.concatenate([kept, np.zeros(10 - kept.size)])
    close(np.sort(_singular_values(ref.tsv(taus))), np.sort(kept), atol=1e-10)


@pytest.mark.parametrize("second", ["zero", "tiny"])
def test_tsv_zero_task_leaves_its_slots_zero(second):
    # τ₂ = 0 (or ‖τ₂‖ <= 1e-8): U_cat = [U₁[:, :k], 0], V_cat = [V₁ᵀ[:k]; 0] -> Δ = the rank-k
    # truncation of τ₁. An unmasked zero task would put an arbitrary SVD basis in its slots and
    # rotate τ₁'s vectors through polar().
    rng = np.random.default_rng(50)
    tau1 = rng.normal(size=(6, 6))
    u, s, vt = np.linalg.svd(tau1)
    tau2 = np.zeros((6, 6)) if second == "zero" else 1e-10 * rng.normal(size=(6, 6))
    expected = (u[:, :3] * s[:3]) @ vt[:3]
    close(ref.tsv(np.stack([tau1, tau2])), expected, atol=1e-10)


def test_tsv_k_zero_and_all_zero():
    # 2×3 with N = 3: r = 2, k = ⌊2/3⌋ = 0 -> Δ = 0.
    rng = np.random.default_rng(51)
    out = ref.tsv(rng.normal(size=(3, 2, 3)))
    assert out.shape == (2, 3) and np.all(out == 0.0)
    assert np.all(ref.tsv(np.zeros((2, 4, 4))) == 0.0)


# ---------------------------------------------------------------------------------------------
# §3 ISO-C / ISO-CTS
# ---------------------------------------------------------------------------------------------


def test_iso_c_closed_form():
    rng = np.random.default_rng(60)
    u, v = _orth(rng, 5, 4), _orth(rng, 4, 4)
    sigma = [4.0, 3.0, 2.0, 1.0]  # mean 2.5
    tau = _from_svd(u, sigma, v)
    close(ref.iso_c(tau[None]), 2.5 * u @ v.T, atol=1e-12)
    close(ref.iso_c(tau[None], alpha=2.0), 5.0 * u @ v.T, atol=1e-12)
    # N = 2: M is the SUM τ₁ + τ₂ (not the mean), so σ̄(M) = 2.5 again.
    other = rng.normal(size=(5, 4))
    close(ref.iso_c(np.stack([tau - other, other])), 2.5 * u @ v.T, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_iso_c_is_isotropic_and_keeps_the_nuclear_norm(n):
    rng = np.random.default_rng(61 + n)
    taus = rng.normal(size=(n, 6, 4))
    taus[0] = np.outer(rng.normal(size=6), rng.normal(size=4))  # rank deficiency is fine
    nuclear = float(np.sum(_singular_values(np.sum(taus, axis=0))))
    out = ref.iso_c(taus, alpha=0.5)
    close(_singular_values(out), np.full(4, 0.5 * nuclear / 4), atol=1e-10)


def test_iso_c_zero_and_rank_deficient():
    assert np.all(ref.iso_c(np.zeros((3, 4, 5))) == 0.0)
    rng = np.random.default_rng(62)
    x = np.outer(rng.normal(size=4), rng.normal(size=5))
    # rank 1: σ̄ = σ₁/4 on all 4 directions.
    out = ref.iso_c(np.stack([x, x]))
    assert np.all(np.isfinite(out))
    close(_singular_values(out), np.full(4, 2.0 * np.linalg.norm(x) / 4.0), atol=1e-10)


def test_round_half_even():
    cases = [(0.5, 0), (1.5, 2), (2.5, 2), (3.5, 4), (2.4, 2), (2.6, 3), (0.25, 0), (7, 7)]
    for x, expected in cases:
        assert ref.round_half_even(x) == expected
    assert ref.round_half_even(Fraction(5, 2)) == 2
    assert ref.round_half_even(Fraction(7, 2)) == 4
    assert ref.round_half_even(Fraction(1, 3)) == 0


def test_iso_cts_sizes():
    # baselines-notes §5: r = 768, f = 0.8, T = 8 -> k₀ = 614, s = round(154/8 = 19.25)·8 = 152.
    assert ref.iso_cts_sizes(768, 8, 0.8) == (616, 19)
    # r = 20, T = 8: k₀ = 16, 4/8 = 0.5 -> 0 (half to even) -> s = 0: plain ISO-C.
    assert ref.iso_cts_sizes(20, 8, 0.8) == (20, 0)
    # r = 10, T = 2, f = 0.5: 5/2 = 2.5 -> 2 (half-up would give 3) -> s = 4.
    assert ref.iso_cts_sizes(10, 2, 0.5) == (6, 2)
    # r = 10, T = 2, f = 0.75: k₀ = 7, 3/2 = 1.5 -> 2 -> s = 4.
    assert ref.iso_cts_sizes(10, 2, 0.75) == (6, 2)
    # r = 28, T = 8: k₀ = 22, 6/8 -> 1 -> s = 8; r = 9, T = 3: k₀ = 7, 2/3 -> 1 -> s = 3.
    assert ref.iso_cts_sizes(28, 8, 0.8) == (20, 1)
    assert ref.iso_cts_sizes(9, 3, 0.8) == (6, 1)
    assert ref.iso_cts_sizes(12, 1, 0.8) == (9, 3)
    with pytest.raises(ValueError):  # r = 2, T = 3, f = 0: 2/3 -> 1 -> s = 3 > r
        ref.iso_cts_sizes(2, 3, 0.0)


@pytest.mark.parametrize("shape, n", [((4, 5), 3), ((20, 20), 8), ((6, 3), 2)])
def test_iso_cts_without_task_blocks_is_iso_c(shape, n):
    r = min(shape)
    assert ref.iso_cts_sizes(r, n, 0.8)[1] == 0
    rng = np.random.default_rng(70 + n)
    taus = rng.normal(size=(n,) + shape)
    close(ref.iso_cts(taus), ref.iso_c(taus), atol=1e-12)
    close(ref.iso_cts(taus, alpha=1.5), ref.iso_c(taus, alpha=1.5), atol=1e-12)


def test_iso_cts_single_expert_is_iso_c():
    # N = 1: k_c = k₀, d = r − k₀. U_c = top k_c of τ and the projected residual is τ's tail, whose
    # top-d triplets are τ's remaining ones: the slots hold a permutation of τ's SVD, so
    # Δ = mean(σ) U Vᵀ = ISO-C.
    rng = np.random.default_rng(71)
    tau = rng.normal(size=(9, 8))
    assert ref.iso_cts_sizes(8, 1, 0.8) == (6, 2)
    close(ref.iso_cts(tau[None]), ref.iso_c(tau[None]), atol=1e-10)


def test_iso_cts_orthogonal_blocks_closed_form():
    # r = 8, N = 2, f = 0.5 -> k_c = 4, d = 2. τ_t = Σ_{i<4} a_ti e_i f_iᵀ + task tails: task 0 on
    # indices 4, 5, task 1 on 6, 7. The common sums (≥ 6) beat every tail (≤ 2), so U_c = e_0..3,
    # the projected residuals are the tails, all slots are orthonormal and
    # Δ = σ̄ Σ_i e_i f_iᵀ with σ̄ = (Σ common sums + Σ tails)/8.
    # A cancelling pair ±1.7 e0 f7ᵀ (absent from M) is removed by the LEFT projection
    # (e0 ∈ U_c); a right-side or two-sided projection would keep it (f7 ∉ V_c) and change Δ.
    rng = np.random.default_rng(72)
    e, f = _orth(rng, 9, 8), _orth(rng, 8, 8)
    a0, a1 = [5.0, 4.0, 3.0, 3.0], [4.0, 3.5, 4.0, 3.0]
    tails0, tails1 = [2.0, 1.0], [1.5, 0.5]
    cancel = 1.7 * np.outer(e[:, 0], f[:, 7])
    tau0 = _from_svd(e[:, :4], a0, f[:, :4]) + _from_svd(e[:, 4:6], tails0, f[:, 4:6]) + cancel
    tau1 = _from_svd(e[:, :4], a1, f[:, :4]) + _from_svd(e[:, 6:8], tails1, f[:, 6:8]) - cancel
    sigma_bar = (sum(a0) + sum(a1) + sum(tails0) + sum(tails1)) / 8.0
    close(ref.iso_cts(np.stack([tau0, tau1]), common_fraction=0.5), sigma_bar * e @ f.T, atol=1e-10)


@pytest.mark.parametrize("tails1, masked", [([4e-9, 3e-9], True), ([1.6e-8, 1.2e-8], False)])
def test_iso_cts_masks_tasks_with_a_tiny_projected_residual(tails1, masked):
    # The orthogonal-blocks construction above, without the cancelling pair, with task 1's tails
    # scaled down: its projected residual is exactly those tails, norm 5e-9 (<= 1e-8: the block
    # stays zero, its σ are not counted) or 2e-8 (> 1e-8: kept). Every singular value of Δ is σ̄.
    rng = np.random.default_rng(73)
    e, f = _orth(rng, 9, 8), _orth(rng, 8, 8)
    a0, a1, tails0 = [5.0, 4.0, 3.0, 3.0], [4.0, 3.5, 4.0, 3.0], [2.0, 1.0]
    tau0 = _from_svd(e[:, :4], a0, f[:, :4]) + _from_svd(e[:, 4:6], tails0, f[:, 4:6])
    tau1 = _from_svd(e[:, :4], a1, f[:, :4]) + _from_svd(e[:, 6:8], tails1, f[:, 6:8])
    kept_tails = 0.0 if masked else sum(tails1)
    sigma_bar = (sum(a0) + sum(a1) + sum(tails0) + kept_tails) / 8.0
    out = ref.iso_cts(np.stack([tau0, tau1]), common_fraction=0.5)
    close(_singular_values(out), np.full(8, sigma_bar), atol=1e-13)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_iso_cts_output_is_isotropic(n):
    # Every singular value of Δ equals α·σ̄ (polar factors are partial isometries), and the task
    # blocks make it differ from ISO-C on generic inputs.
    rng = np.random.default_rng(80 + n)
    taus = rng.normal(size=(n, 13, 12))
    assert ref.iso_cts_sizes(12, n, 0.8)[1] > 0
    out = ref.iso_cts(taus, alpha=2.0)
    sv = _singular_values(out)
    assert sv.shape == (12,) and sv[0] > 0.0
    close(sv, np.full(12, sv[0]), atol=1e-10)
    assert not np.allclose(out, ref.iso_c(taus, alpha=2.0), atol=1e-3)


def test_iso_cts_low_rank_tasks_are_masked_and_finite():
    # Rank-1 tasks: M has rank 2 and U_c (k_c = 4) contains both left vectors, so every projected
    # residual is ~1e-16 <= 1e-8 and its block stays zero. The assembled σ are σ₁(M), σ₂(M) and
    # six zeros: every singular value of Δ is ‖M‖_* / 8 (directions not unique, values finite).
    rng = np.random.default_rng(90)
    taus = np.stack([np.outer(rng.normal(size=9), rng.normal(size=8)) for _ in range(2)])
    nuclear = float(np.sum(_singular_values(np.sum(taus, axis=0))))
    out = ref.iso_cts(taus, common_fraction=0.5)
    assert np.all(np.isfinite(out))
    close(_singular_values(out), np.full(8, nuclear / 8.0), atol=1e-10)
    assert np.all(ref.iso_cts(np.zeros((3, 6, 5))) == 0.0)


# ---------------------------------------------------------------------------------------------
# §3 STAR
# ---------------------------------------------------------------------------------------------


def test_star_rank_threshold_is_greater_or_equal():
    sigma = [4.0, 3.0, 2.0, 1.0]  # Σ = 10, partial sums 4, 7, 9, 10
    assert ref.star_rank(sigma, 40.0) == 1  # 4 >= 4: reaching the target counts
    assert ref.star_rank(sigma, 41.0) == 2
    assert ref.star_rank(sigma, 70.0) == 2  # 7 >= 7
    assert ref.star_rank(sigma, 71.0) == 3
    assert ref.star_rank(sigma, 100.0) == 4
    assert ref.star_rank(sigma, 0.0) == 1
    assert ref.star_rank(sigma, 150.0) == 4
    assert ref.star_rank([5.0, 0.0, 0.0], 100.0) == 1
    assert ref.star_rank([0.0, 0.0], 40.0) == 0


def test_star_closed_form():
    rng = np.random.default_rng(100)
    u, v = _orth(rng, 5, 4), _orth(rng, 4, 4)
    tau = _from_svd(u, [4.0, 3.0, 2.0, 1.0], v)
    # η = 50: target 5 -> q = 2 (4 < 5 <= 7); rescale 10/7 -> (10/7)(4 u1v1ᵀ + 3 u2v2ᵀ).
    expected50 = _from_svd(u[:, :2], [40.0 / 7.0, 30.0 / 7.0], v[:, :2])
    close(ref.star(tau[None], eta=50.0), expected50, atol=1e-12)
    # η = 30: q = 1 -> 10 u1 v1ᵀ.
    expected30 = 10.0 * np.outer(u[:, 0], v[:, 0])
    close(ref.star(tau[None], eta=30.0), expected30, atol=1e-12)
    # Mean over tasks, zero tasks included: (STAR(τ) + 0)/2.
    close(ref.star(np.stack([tau, np.zeros_like(tau)]), eta=30.0), expected30 / 2.0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_star_eta_100_is_the_mean(n):
    rng = np.random.default_rng(110 + n)
    taus = rng.normal(size=(n, 5, 4))
    close(ref.star(taus, eta=100.0), np.mean(taus, axis=0), atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_star_keeps_the_nuclear_norm_and_truncates(shape):
    rng = np.random.default_rng(120)
    tau = rng.normal(size=shape)
    out = ref.star(tau[None], eta=40.0)
    sv_in, sv_out = _singular_values(tau), _singular_values(out)
    close(np.sum(sv_out), np.sum(sv_in), atol=1e-10)
    assert np.sum(sv_out > 1e-10) < 4  # rank actually reduced


def test_star_zero_and_rank_deficient():
    assert np.all(ref.star(np.zeros((2, 3, 3))) == 0.0)
    x = np.outer([1.0, 2.0, 0.0], [0.0, 3.0, 4.0])  # rank 1: kept as is (q = 1, scale 1)
    close(ref.star(x[None]), x, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# §3 SVC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_svc_identical_experts_undo_the_task_arithmetic_sum(n):
    # τ_t = τ, Δ_m = Nτ = U (Nσ) Vᵀ: a^m_j = Nσ_j v_j, a^t_j = σ_j v_j -> s_j^t = N for every t,
    # γ_j = N / (N · max(0.1, N)) = 1/N, σ'_j = σ_j: the calibrated matrix is τ (the mean).
    rng = np.random.default_rng(130 + n)
    tau = rng.normal(size=(5, 4))
    taus = np.stack([tau] * n)
    close(ref.svc(n * tau, taus), tau, atol=1e-12)
    # Δ_m = the mean τ: s = 1, γ = 1 (unchanged); with floor 2: γ = N/(2N) = 1/2.
    close(ref.svc(tau, taus), tau, atol=1e-12)
    close(ref.svc(tau, taus, floor=2.0), tau / 2.0, atol=1e-12)


def test_svc_orthogonal_tasks_closed_form():
    # τ₁ = 3 e0 f0ᵀ, τ₂ = 2 e1 f1ᵀ (3×3). Direction e0: s¹ = 1, s² = 0 -> floor 0.1,
    # γ = 2/1.1; direction e1 likewise. TA (λ = 1) -> calibrated = (2/1.1)(τ₁ + τ₂).
    e = np.eye(3)
    tau1, tau2 = 3.0 * np.outer(e[0], e[0]), 2.0 * np.outer(e[1], e[1])
    taus = np.stack([tau1, tau2])
    close(ref.svc(tau1 + tau2, taus), (2.0 / 1.1) * (tau1 + tau2), atol=1e-12)
    # TA with λ = 0.3: s = 0.3 on each direction, γ = 2/(0.3 + 0.1) = 5 -> 5·0.3 = 1.5 τ.
    close(ref.svc(0.3 * (tau1 + tau2), taus), 1.5 * (tau1 + tau2), atol=1e-12)
    # Rotated bases give the same (the calibration is basis-free).
    rng = np.random.default_rng(140)
    p, q = _orth(rng, 3, 3), _orth(rng, 3, 3)
    rot = np.stack([p @ t @ q.T for t in taus])
    close(ref.svc(rot[0] + rot[1], rot), (2.0 / 1.1) * (rot[0] + rot[1]), atol=1e-12)


def test_svc_zero_inputs():
    rng = np.random.default_rng(141)
    merged = rng.normal(size=(4, 3))
    # Zero task responses: s = 0 -> γ = N/(N·0.1) = 10.
    close(ref.svc(merged, np.zeros((2, 4, 3))), 10.0 * merged, atol=1e-12)
    assert np.all(ref.svc(np.zeros((4, 3)), rng.normal(size=(2, 4, 3))) == 0.0)
    with pytest.raises(ValueError):
        ref.svc(merged, np.zeros((2, 4, 3)), floor=0.0)
    with pytest.raises(ValueError):
        ref.svc(merged, np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# §8: finite in, finite out, for every spectral method
# ---------------------------------------------------------------------------------------------

SPECTRAL_METHODS = {
    "resmerge": lambda taus: ref.resmerge(taus),
    "resmerge_v1_ffn": lambda taus: ref.resmerge(taus, family="ffn", score_map="ramp"),
    "resmerge_other_k2": lambda taus: ref.resmerge(taus, family="other", head_rank=2),
    "tsv": lambda taus: ref.tsv(taus),
    "iso_c": lambda taus: ref.iso_c(taus),
    "iso_cts": lambda taus: ref.iso_cts(taus),
    "iso_cts_half": lambda taus: ref.iso_cts(taus, common_fraction=0.5),
    "star": lambda taus: ref.star(taus),
    "svc_ta": lambda taus: ref.svc(ref.task_arithmetic(taus), taus),
}


def _degenerate_inputs(n, shape):
    rng = np.random.default_rng(150 + n)
    rank_one = np.stack([np.outer(rng.normal(size=shape[0]), rng.normal(size=shape[1]))] * n)
    mixed = rng.normal(size=(n,) + shape)
    mixed[0] = 0.0
    if n > 2:
        mixed[1] = mixed[2]  # duplicate expert
    mixed[-1] = np.outer(rng.normal(size=shape[0]), rng.normal(size=shape[1]))
    return {
        "zeros": np.zeros((n,) + shape),
        "rank_one_identical": rank_one,
        "mixed_rank_deficient": mixed,
        "tiny": 1e-12 * rng.normal(size=(n,) + shape),
    }


@pytest.mark.parametrize("name", sorted(SPECTRAL_METHODS))
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_spectral_methods_finite_on_degenerate_inputs(name, n):
    method = SPECTRAL_METHODS[name]
    for shape in ((6, 5), (4, 7)):
        for kind, taus in _degenerate_inputs(n, shape).items():
            out = method(taus)
            assert out.shape == shape and out.dtype == np.float64, (kind, shape)
            assert np.all(np.isfinite(out)), (kind, shape)
            if kind == "zeros":
                assert np.all(out == 0.0), (kind, shape)


def test_spectral_methods_upcast_float32():
    rng = np.random.default_rng(160)
    taus32 = rng.normal(size=(2, 4, 3)).astype(np.float32)
    for method in SPECTRAL_METHODS.values():
        out = method(taus32)
        assert out.dtype == np.float64
        close(out, method(taus32.astype(np.float64)), atol=0.0)
