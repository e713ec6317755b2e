"""Spectral methods (METHODS.md §3, §4) against the float64 NumPy oracle, plus §4's properties.

Golden values are compared where the math is well defined (distinct singular
values at the truncation points); where it is not (near-degenerate heads,
rank-deficient polar factors) the tests check the invariants and finiteness.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge import ops, spectral
from jaxmerge.algebra import LeafContext, chain, matrix, route
from jaxmerge.errors import ConfigError
from jaxmerge.executor import leaf_keys
from jaxmerge.leaves import LeafInfo
from tests import numpy_reference as ref

NAMES = {
    "attention": "model.layers.0.self_attn.q_proj.weight",
    "ffn": "model.layers.0.mlp.up_proj.weight",
    "other": "model.layers.0.adapter.proj.weight",
}
SHAPE = (40, 24)
RTOL = 5e-5  # float32 SVDs and products vs float64
RANDOMIZED_RTOL = 5e-4  # the randomised head is certified to a 1e-4 subspace angle


def orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def task_matrices(rng, n, spectrum="gap", shape=SHAPE, shared=0.5):
    """[N, m, n] float32 task matrices with a controlled spectrum each.

    ``gap``: a clear leading singular value, then a decaying tail; ``near_degenerate``:
    σ₁ = σ₂ to 1e-7; ``rank_deficient``: rank 4 of min(m, n); ``zero``: all zero.
    A shared component (weight ``shared``) makes the residuals agree partly.
    """
    m, k = shape
    r = min(shape)
    common = orthonormal(rng, m, r) @ np.diag(np.linspace(1.0, 0.1, r)) @ orthonormal(rng, k, r).T
    taus = []
    for _ in range(n):
        if spectrum == "gap":
            s = np.concatenate([[6.0 + rng.random()], 1.5 * 0.85 ** np.arange(r - 1)])
        elif spectrum == "near_degenerate":
            s = np.concatenate([[4.0, 4.0 * (1 - 1e-7)], 0.5 * 0.9 ** np.arange(r - 2)])
        elif spectrum == "rank_deficient":
            s = np.concatenate([[5.0, 2.0, 1.0, 0.5], np.zeros(r - 4)])
        elif spectrum == "zero":
            taus.append(np.zeros(shape))
            continue
        else:
            raise ValueError(spectrum)
        tau = orthonormal(rng, m, r) @ np.diag(s) @ orthonormal(rng, k, r).T
        if spectrum == "gap":
            tau = tau + shared * common
        taus.append(tau)
    return np.stack(taus).astype(np.float32)


def context(taus, family="attention", seed=0):
    name = NAMES[family]
    info = LeafInfo.from_name(name, taus.shape[1:])
    keys = leaf_keys(jax.random.PRNGKey(seed), name, taus.shape[0])
    return LeafContext(jnp.asarray(taus), jnp.zeros(taus.shape[1:], jnp.float32), keys, {}, {},
                       jnp.int32(0), info)


def run(merge, taus, family="attention"):
    ctx = context(taus, family)
    return np.asarray(jax.jit(lambda x: merge.apply(x, ctx._replace(taus=x)))(jnp.asarray(taus)))


def assert_close(got, want, rtol=RTOL):
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)


# ---------------------------------------------------------------------------------------------
# ResMerge golden values


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("family", ["attention", "ffn", "other"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_resmerge_matches_reference(n, family, svd):
    taus = task_matrices(np.random.default_rng(n), n)
    got = run(jaxmerge.resmerge(svd=svd), taus, family)
    assert_close(got, ref.resmerge(taus, family=family),
                 RTOL if svd == "exact" else RANDOMIZED_RTOL)


@pytest.mark.parametrize("options", [
    dict(score_map="ramp"),
    dict(ffn_score_scale=1.0),
    dict(head_rank=2),
    dict(rho_max=0.5, beta_min=0.5, beta_max=0.9),
    dict(gate="none"),
    dict(gate="mean"),
    dict(attention_score_scale=0.5, other_score_scale=0.3),
])
@pytest.mark.parametrize("n", [2, 3])
def test_resmerge_options_match_reference(options, n):
    taus = task_matrices(np.random.default_rng(10 + n), n)
    for family in ("attention", "ffn"):
        got = run(jaxmerge.resmerge(**options), taus, family)
        assert_close(got, ref.resmerge(taus, family=family, **options))


def test_resmerge_rank_deficient_tasks_match_reference():
    for n in (1, 2, 3, 5):
        taus = task_matrices(np.random.default_rng(20 + n), n, "rank_deficient")
        for svd in ("exact", "randomized"):
            assert_close(run(jaxmerge.resmerge(svd=svd), taus), ref.resmerge(taus),
                         RTOL if svd == "exact" else RANDOMIZED_RTOL)


def test_resmerge_near_degenerate_head_is_finite_and_falls_back_to_exact():
    taus = task_matrices(np.random.default_rng(30), 3, "near_degenerate", shape=(160, 128))
    ctx = context(taus)
    split = spectral.split_task_matrices(jnp.asarray(taus), 1, ctx.keys, svd="randomized")
    assert np.all(np.asarray(split.head.used_exact))  # σ₁ ≈ σ₂: the check cannot certify
    delta = run(jaxmerge.resmerge(svd="randomized"), taus)
    assert np.all(np.isfinite(delta))
    # The head direction is arbitrary inside the degenerate pair, but H + R = τ exactly.
    np.testing.assert_allclose(np.asarray(split.residual) + np.asarray(split.heads()), taus,
                               atol=1e-5)


def test_resmerge_zero_task_vectors():
    for n in (1, 3):
        zero = task_matrices(np.random.default_rng(0), n, "zero")
        assert np.all(run(jaxmerge.resmerge(), zero) == 0)
    taus = task_matrices(np.random.default_rng(31), 3)
    taus[1] = 0
    assert_close(run(jaxmerge.resmerge(), taus), ref.resmerge(taus))


# ---------------------------------------------------------------------------------------------
# METHODS.md §4 property checks


def split_one(tau):
    head, residual = ref.spectral_split(tau, 1)
    return head, residual


def test_single_expert_gives_residual_plus_fifth_of_its_norm_along_the_head():
    tau = task_matrices(np.random.default_rng(40), 1)
    head, residual = split_one(tau[0])
    expected = residual + 0.2 * np.linalg.norm(residual) * head / np.linalg.norm(head)
    assert_close(run(jaxmerge.resmerge(), tau), expected)
    assert not np.allclose(run(jaxmerge.resmerge(), tau), tau[0], atol=1e-3)  # not the expert


def test_identical_experts_give_residual_plus_fifth_of_its_norm_along_the_head():
    tau = task_matrices(np.random.default_rng(41), 1)
    head, residual = split_one(tau[0])
    expected = residual + 0.2 * np.linalg.norm(residual) * head / np.linalg.norm(head)
    for n in (2, 3, 5):
        assert_close(run(jaxmerge.resmerge(), np.repeat(tau, n, axis=0)), expected)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_mean_residual_fallback_fires_exactly_when_mean_residual_cosine_is_not_positive(sign):
    rng = np.random.default_rng(42)
    m, n = SHAPE
    a = rng.standard_normal((m - 1, n - 1))
    b = rng.standard_normal((m - 1, n - 1))
    b -= (a * b).sum() / (a * a).sum() * a  # b ⟂ a
    b += sign * 0.02 * a * np.linalg.norm(b) / np.linalg.norm(a)  # cos(a, b) = ±0.02
    taus = np.zeros((2, m, n))
    taus[:, 0, 0] = 100.0  # the head: a dominant block of its own, so R_t is exactly a or b
    taus[0, 1:, 1:] = a
    taus[1, 1:, 1:] = b
    taus = taus.astype(np.float32)
    residuals = np.stack([split_one(t)[1] for t in taus])
    assert np.sign(ref.cos(residuals[0], residuals[1])) == sign
    _, info = ref.src_a_details(residuals)
    assert (info["case"] == "fallback") == (sign < 0)
    assert_close(run(jaxmerge.resmerge(), taus), ref.resmerge(taus))
    gram = jnp.asarray(residuals.reshape(2, -1) @ residuals.reshape(2, -1).T, jnp.float32)
    weights = np.asarray(spectral.src_a_weights(gram, 1.0))
    assert np.allclose(weights, 0.5) == (sign < 0)  # the mean residual, or SRC-A's own weights


def test_head_correction_is_bounded_by_rho_max_times_backbone():
    taus = task_matrices(np.random.default_rng(43), 3)
    split = spectral.split_task_matrices(jnp.asarray(taus), 1, context(taus).keys)
    backbone = spectral.src_a_backbone(split.residual, 1.0)
    correction = spectral.head_correction(split.heads(), backbone, 0.2)
    assert float(jnp.linalg.norm(correction)) <= 0.2 * float(jnp.linalg.norm(backbone)) * 1.0001


# ---------------------------------------------------------------------------------------------
# Paper ablations as recipes


def test_ablation_recipes_match_their_definitions():
    rng = np.random.default_rng(50)
    taus = task_matrices(rng, 3)
    parts = [split_one(t) for t in taus]
    heads = np.stack([p[0] for p in parts])
    residuals = np.stack([p[1] for p in parts])
    split = spectral.spectral_split()
    recipes = {
        "head-only mean": (chain(split, spectral.head(), ops.mean()), heads.mean(0)),
        "residual-only mean": (chain(split, spectral.residual(), ops.mean()),
                               residuals.mean(0)),
        "SRC-A w/o head": (chain(split, spectral.residual(), spectral.src_a()),
                           ref.src_a(residuals)),
        "SRC-A w/ ungated head": (
            chain(split, spectral.lhc(spectral.src_a(), gate="none")),
            ref.src_a(residuals) + ref.lhc(heads, ref.src_a(residuals), gate="none")),
        "mean residual + gated head": (
            chain(split, spectral.lhc(ops.mean())),
            residuals.mean(0) + ref.lhc(heads, residuals.mean(0))),
    }
    for label, (merge, expected) in recipes.items():
        assert_close(run(merge, taus), expected), label


def test_pieces_reject_the_wrong_input_with_a_readable_error():
    taus = task_matrices(np.random.default_rng(51), 2)
    with pytest.raises(ConfigError, match="residual"):
        run(chain(spectral.spectral_split(), spectral.src_a()), taus)
    with pytest.raises(ConfigError, match="Split"):
        run(spectral.lhc(spectral.src_a()), taus)
    with pytest.raises(ConfigError, match="matrices"):
        run(spectral.spectral_split(), taus[:, 0])
    for bad in (dict(head_rank=0), dict(beta_min=0.9, beta_max=0.8), dict(rho_max=-1.0),
                dict(score_map="linear"), dict(gate="max"), dict(svd="fast"),
                dict(ffn_score_scale=-0.1)):
        with pytest.raises(ConfigError):
            jaxmerge.resmerge(**bad)


# ---------------------------------------------------------------------------------------------
# TSV, ISO-C, ISO-CTS, STAR, SVC golden values


BASELINES = {
    "tsv": (lambda: jaxmerge.tsv(), ref.tsv),
    "tsv exact": (lambda: jaxmerge.tsv(svd="exact"), ref.tsv),
    "iso_c": (lambda: jaxmerge.iso_c(), ref.iso_c),
    "iso_cts": (lambda: jaxmerge.iso_cts(), ref.iso_cts),
    "iso_cts f=0.5": (lambda: jaxmerge.iso_cts(common_fraction=0.5),
                      lambda t: ref.iso_cts(t, common_fraction=0.5)),
    "star": (lambda: jaxmerge.star(), ref.star),
    "star eta=70": (lambda: jaxmerge.star(eta=70.0), lambda t: ref.star(t, eta=70.0)),
}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("method", list(BASELINES))
def test_spectral_baselines_match_reference(method, n):
    build, oracle = BASELINES[method]
    taus = task_matrices(np.random.default_rng(60 + n), n, shared=0.0)
    assert_close(run(build(), taus), oracle(taus), rtol=2e-4)


def test_scale_is_alpha():
    taus = task_matrices(np.random.default_rng(70), 3, shared=0.0)
    assert_close(run(jaxmerge.tsv(scale_factor=0.5), taus), ref.tsv(taus, alpha=0.5), 2e-4)
    assert_close(run(jaxmerge.iso_cts(scale_factor=1.5), taus), ref.iso_cts(taus, alpha=1.5),
                 2e-4)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts", "star"])
def test_zero_and_rank_deficient_tasks_stay_finite_with_the_right_spectrum(method):
    rng = np.random.default_rng(71)
    build = {"tsv": jaxmerge.tsv, "iso_c": jaxmerge.iso_c, "iso_cts": jaxmerge.iso_cts,
             "star": jaxmerge.star}[method]
    assert np.all(run(build(), task_matrices(rng, 3, "zero")) == 0)
    low = task_matrices(rng, 3, "rank_deficient")
    low[1] = 0
    delta = run(build(), low)
    assert np.all(np.isfinite(delta))
    singular = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    if method == "tsv":  # polar factors keep σ(Δ) = the assembled s_cat
        k = min(SHAPE) // 3
        s_cat = np.concatenate([np.linalg.svd(t.astype(np.float64), compute_uv=False)[:k]
                                for t in low])
        np.testing.assert_allclose(np.sort(singular), np.sort(np.pad(s_cat, (0, min(
            SHAPE) - s_cat.size))), atol=1e-4)
    elif method == "iso_c":  # every direction gets mean(σ)
        sigma = np.linalg.svd(low.sum(0).astype(np.float64), compute_uv=False)
        np.testing.assert_allclose(singular, sigma.mean(), rtol=1e-4)
    elif method == "iso_cts":
        assert np.ptp(singular) <= 1e-4 * singular.max()  # isotropic
    else:
        assert_close(delta, ref.star(low), rtol=2e-4)


def test_tsv_with_more_experts_than_rank_warns_and_gives_zero():
    taus = task_matrices(np.random.default_rng(72), 5, shape=(3, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = run(jaxmerge.tsv(), taus)
    assert np.all(delta == 0)
    assert any("k = 0" in str(w.message) for w in caught)


def test_iso_cts_rank_split_matches_reference_sizes():
    for r in (3, 8, 24, 576):
        for n in (1, 2, 3, 5):
            for f in (0.0, 0.5, 0.8, 1.0):
                try:
                    expected = ref.iso_cts_sizes(r, n, f)
                except ValueError:
                    with pytest.raises(ConfigError):
                        spectral.iso_cts_ranks(r, n, f)
                    continue
                assert spectral.iso_cts_ranks(r, n, f) == expected, (r, n, f)


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties", "linear"])
def test_svc_calibrates_any_merge(inner):
    # (Not ISO-C or TSV here: their Δ have repeated singular values on these inputs,
    # where SVC's per-direction rescaling depends on the SVD's basis choice.)
    taus = task_matrices(np.random.default_rng(80), 3, shared=0.0)
    merge = {"task_arithmetic": jaxmerge.task_arithmetic(0.3), "ties": jaxmerge.ties(0.5),
             "linear": jaxmerge.linear()}[inner]
    uncalibrated = run(merge, taus)
    got = run(jaxmerge.calibrate(merge, "svc", 0.1), taus)
    assert_close(got, ref.svc(uncalibrated, taus, floor=0.1), rtol=2e-4)
    vector = np.random.default_rng(81).standard_normal((3, 7)).astype(np.float32)
    ctx = context(vector)._replace(info=LeafInfo.from_name("model.norm.weight", (7,)))
    calibrated = spectral.svc(ops.mean()).apply(jnp.asarray(vector), ctx)
    np.testing.assert_allclose(np.asarray(calibrated), vector.mean(0), rtol=1e-6)  # non-matrix


# ---------------------------------------------------------------------------------------------
# Whole models: routing, batching, library path


def model_params(rng, n):
    """A small Llama-like pytree: base + n expert task vectors."""
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.layers.1.self_attn.q_proj.weight": (32, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 48),
        "model.layers.1.mlp.down_proj.weight": (32, 48),
        "model.layers.0.input_layernorm.weight": (32,),
        "model.embed_tokens.weight": (50, 32),
    }
    base = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    experts = []
    for t in range(n):
        expert = {}
        for name, shape in shapes.items():
            if len(shape) == 2 and "embed" not in name:
                delta = task_matrices(np.random.default_rng(100 + t), 1, shape=shape)[0]
            else:
                delta = 0.01 * rng.standard_normal(shape).astype(np.float32)
            expert[name] = base[name] + delta
        experts.append(expert)
    return base, experts


@pytest.mark.parametrize("method,oracle,nonmatrix", [
    ("resmerge", lambda t, family: ref.resmerge(t, family=family), ref.resmerge_nonmatrix),
    ("tsv", lambda t, family: ref.tsv(t), ref.spectral_nonmatrix),
    ("iso_cts", lambda t, family: ref.iso_cts(t), ref.spectral_nonmatrix),
])
def test_library_merge_on_a_pytree_routes_matrices_and_batches_layers(method, oracle, nonmatrix):
    base, experts = model_params(np.random.default_rng(90), 3)
    merged = jaxmerge.merge(jaxmerge.methods.build(method, {}), base, experts)
    for name, value in base.items():
        taus = np.stack([e[name].astype(np.float64) - value for e in experts])
        info = LeafInfo.from_name(name, value.shape)
        expected = oracle(taus, info.family) if info.is_matrix else nonmatrix(taus)
        assert_close(np.asarray(merged[name], np.float64) - value, expected, rtol=3e-4)


def test_batched_over_layers_equals_one_leaf_at_a_time():
    rng = np.random.default_rng(91)
    stack = np.stack([task_matrices(rng, 3) for _ in range(4)])
    merge = jaxmerge.resmerge()
    ctx = context(stack[0])

    def one(x, keys):
        return merge.apply(x, ctx._replace(taus=x, keys=keys))

    keys = jnp.stack([leaf_keys(jax.random.PRNGKey(0), f"leaf{i}", 3) for i in range(4)])
    batched = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(stack), keys))
    for i in range(4):
        single = np.asarray(jax.jit(one)(jnp.asarray(stack[i]), keys[i]))
        np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-6 * np.abs(single).max())


def test_matrix_route_sends_only_matrices_to_the_spectral_piece():
    merge = route({matrix: spectral.iso_c()}, default=ops.mean())
    vector = np.ones((2, 5), np.float32)
    ctx = context(vector)._replace(info=LeafInfo.from_name("model.norm.weight", (5,)))
    np.testing.assert_array_equal(np.asarray(merge.apply(jnp.asarray(vector), ctx)), np.ones(5))
