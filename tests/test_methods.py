"""Golden-value and property tests of every method against the float64 NumPy reference.

Inputs are built so that the task vectors jaxmerge computes in float32
(expert − base) are exact: the base lies on a coarse grid, so the reference gets
the very same τ in float64 and every discrete decision (thresholds, signs,
masks) must agree; the continuous parts agree to float32 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge import executor, ops
from jaxmerge.executor import leaf_keys
from tests import numpy_reference as ref


def masks_for(key, name, n, probabilities, label):
    """The keep-masks the executor draws for leaf ``name`` (jitted: eager threefry is slow)."""
    keys = leaf_keys(key, name, n)
    return np.asarray(jax.jit(ops.keep_masks, static_argnums=2)(keys, probabilities, label))

NAMES = {
    "model.layers.0.self_attn.q_proj.weight": (6, 5),
    "model.layers.0.input_layernorm.weight": (5,),
    "model.embed_tokens.weight": (9, 5),
}
ONE = "model.layers.0.self_attn.q_proj.weight"


def make_models(n, seed=0, names=NAMES, spread=0.05, sparse=0.0):
    """Base on a 2⁻⁸ grid plus N float32 experts; returns (base, experts, taus64)."""
    rng = np.random.default_rng(seed)
    base, experts, taus = {}, [{} for _ in range(n)], {}
    for name, shape in names.items():
        b = (rng.integers(-256, 257, size=shape) / 256.0).astype(np.float32)
        base[name] = b
        stack = []
        for t in range(n):
            tau = rng.normal(scale=spread, size=shape)
            if sparse:
                tau = tau * (rng.random(shape) > sparse)
            e = (b + tau.astype(np.float32)).astype(np.float32)
            experts[t][name] = e
            stack.append(e.astype(np.float64) - b.astype(np.float64))
        taus[name] = np.stack(stack)
    return base, experts, taus


def run(method, base, experts, key=0):
    merged = jaxmerge.merge(method, base, experts, key=key)
    return {name: np.asarray(value) for name, value in merged.items()}


def assert_merge(merged, base, deltas, rtol=2e-5, atol=2e-6):
    for name, delta in deltas.items():
        expected = base[name].astype(np.float64) + delta
        np.testing.assert_allclose(merged[name], expected, rtol=rtol, atol=atol, err_msg=name)


def per_tensor(fn, taus, **kwargs):
    return {name: fn(stack, **kwargs) for name, stack in taus.items()}


NS = [1, 2, 3, 5]


@pytest.mark.parametrize("n", NS)
def test_linear(n):
    base, experts, taus = make_models(n, seed=n)
    weights = list(np.linspace(0.5, 2.0, n))
    assert_merge(run(jaxmerge.linear(), base, experts), base, per_tensor(ref.linear, taus))
    assert_merge(run(jaxmerge.linear(weights), base, experts), base,
                 per_tensor(ref.linear, taus, weights=weights))


@pytest.mark.parametrize("n", NS)
def test_task_arithmetic(n):
    base, experts, taus = make_models(n, seed=10 + n)
    weights = list(np.linspace(0.5, 1.5, n))
    merged = run(jaxmerge.task_arithmetic(0.7, weights), base, experts)
    assert_merge(merged, base, per_tensor(ref.task_arithmetic, taus, scale=0.7, weights=weights))


@pytest.mark.parametrize("n,density,aggregation", [(n, 0.2, "mean") for n in NS] + [
    (3, 0.5, "sum"), (3, 1.0, "mean"), (2, 0.05, "mean")])
def test_ties_per_tensor(n, density, aggregation):
    base, experts, taus = make_models(n, seed=20 + n)
    merged = run(jaxmerge.ties(density, 1.3, "per_tensor", aggregation), base, experts)
    expected = per_tensor(ref.ties, taus, density=density, scale=1.3, aggregation=aggregation,
                          scope="per_tensor")
    assert_merge(merged, base, expected)


@pytest.mark.parametrize("n", NS)
def test_ties_global(n):
    base, experts, taus = make_models(n, seed=30 + n)
    merged = run(jaxmerge.ties(0.3, 1.0, "global"), base, experts)
    names = list(taus)
    deltas = ref.ties_global([taus[k] for k in names], density=0.3, scale=1.0)
    assert_merge(merged, base, dict(zip(names, deltas)))


def test_ties_global_differs_from_per_tensor_when_scales_differ():
    # One tensor with large updates: a global threshold keeps most of it, per tensor keeps 30 %.
    base, experts, taus = make_models(2, seed=3)
    for e in experts:
        e[ONE] = (base[ONE] + (e[ONE] - base[ONE]) * 8).astype(np.float32)
    global_merge = run(jaxmerge.ties(0.3, scope="global"), base, experts)
    local_merge = run(jaxmerge.ties(0.3, scope="per_tensor"), base, experts)
    changed_global = np.mean(global_merge[ONE] != base[ONE])
    changed_local = np.mean(local_merge[ONE] != base[ONE])
    assert changed_global > changed_local + 0.2


@pytest.mark.parametrize("n", NS)
def test_dare_linear_and_ties_given_masks(n):
    base, experts, taus = make_models(n, seed=40 + n)
    key = jax.random.key(7)
    p = 0.6
    masks = {name: masks_for(key, name, n, np.full(stack.shape, 1 - p, np.float32), "dare")
             for name, stack in taus.items()}
    merged = run(jaxmerge.dare_linear(p, 0.9), base, experts, key=key)
    assert_merge(merged, base, {k: ref.dare_linear(taus[k], masks[k], p=p, scale=0.9)
                                for k in taus}, rtol=1e-5)
    merged = run(jaxmerge.dare_ties(p, 1.0), base, experts, key=key)
    assert_merge(merged, base, {k: ref.dare_ties(taus[k], masks[k], p=p, scale=1.0)
                                for k in taus}, rtol=1e-5)
    merged = run(jaxmerge.dare_ties(p, 1.0, trim_density=0.5), base, experts, key=key)
    assert_merge(merged, base, {k: ref.dare_ties(taus[k], masks[k], p=p, scale=1.0,
                                                 trim_density=0.5) for k in taus}, rtol=1e-5)


@pytest.mark.parametrize("n,density,gamma", [(n, 0.2, 0.1) for n in NS] + [
    (3, 0.5, 0.01), (3, 0.9, 0.0), (2, 1.0, 0.2)])
def test_breadcrumbs(n, density, gamma):
    base, experts, taus = make_models(n, seed=50 + n)
    merged = run(jaxmerge.breadcrumbs(density, gamma, 1.0), base, experts)
    assert_merge(merged, base, per_tensor(ref.breadcrumbs, taus, density=density, gamma=gamma,
                                          scale=1.0))
    merged = run(jaxmerge.breadcrumbs_ties(density, gamma, 1.0), base, experts)
    assert_merge(merged, base, per_tensor(ref.breadcrumbs, taus, density=density, gamma=gamma,
                                          scale=1.0, ties=True))


@pytest.mark.parametrize("n", NS)
def test_della_given_masks(n):
    base, experts, taus = make_models(n, seed=60 + n)
    key = jax.random.key(3)
    density, epsilon = 0.4, 0.15
    deltas = {}
    for name, stack in taus.items():
        probabilities = np.stack([ref.della_keep_probs(t, density=density, epsilon=epsilon)
                                  for t in stack])
        jax_probabilities = np.asarray(jax.jit(jax.vmap(
            lambda x: ops.della_keep_probabilities(x, density, epsilon)))(stack.astype(np.float32)))
        np.testing.assert_allclose(jax_probabilities, probabilities, rtol=1e-6)
        masks = masks_for(key, name, n, jax_probabilities, "della")
        deltas[name] = ref.della(stack, masks, density=density, epsilon=epsilon, scale=1.0)
    merged = run(jaxmerge.della(density, epsilon, 1.0), base, experts, key=key)
    assert_merge(merged, base, deltas, rtol=1e-5)


def test_della_ranks_break_ties_by_position():
    """Many equal magnitudes (bf16-like task vectors, zeros): the ranks behind DELLA's keep
    probabilities are those of a stable sort, as in the reference."""
    rng = np.random.default_rng(61)
    tau = (np.round(rng.normal(size=(7, 40)) * 2) / 4 * (rng.random((7, 40)) < 0.5))
    got = np.asarray(jax.jit(lambda x: ops.della_keep_probabilities(x, 0.4, 0.15))(
        tau.astype(np.float32)))
    np.testing.assert_allclose(got, ref.della_keep_probs(tau, density=0.4, epsilon=0.15),
                               rtol=1e-6)


@pytest.mark.parametrize("n,t", [(1, 0.3), (2, 0.5), (2, 0.0), (1, 1.0)])
def test_slerp(n, t):
    base, experts, taus = make_models(n, seed=70 + n, spread=0.5)
    merged = run(jaxmerge.slerp(t), base, experts)
    deltas = {k: ref.slerp(base[k].astype(np.float64), taus[k], t=t) for k in taus}
    assert_merge(merged, base, deltas, rtol=1e-5, atol=1e-5)


def test_slerp_nearly_parallel_falls_back_to_lerp():
    base, experts, taus = make_models(1, seed=71, spread=1e-4)
    merged = run(jaxmerge.slerp(0.25), base, experts)
    deltas = {k: 0.25 * taus[k][0] for k in taus}
    assert_merge(merged, base, deltas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", NS)
def test_model_stock(n):
    base, experts, taus = make_models(n, seed=80 + n)
    # Correlated experts so that cos θ is positive and τ strictly between 0 and 1.
    shared = {k: np.random.default_rng(1).normal(scale=0.05, size=s).astype(np.float32)
              for k, s in NAMES.items()}
    for e in experts:
        for k in e:
            e[k] = (e[k] + shared[k]).astype(np.float32)
    taus = {k: np.stack([e[k].astype(np.float64) - base[k] for e in experts]) for k in NAMES}
    merged = run(jaxmerge.model_stock(), base, experts)
    assert_merge(merged, base, per_tensor(ref.model_stock, taus), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", NS)
def test_ram(n):
    base, experts, taus = make_models(n, seed=90 + n, sparse=0.5)
    # Some entries just below and just above ε.
    experts[0][ONE][0, :2] = base[ONE][0, :2] + np.float32(4e-6)
    experts[0][ONE][1, :2] = base[ONE][1, :2] + np.float32(3e-5)
    taus = {k: np.stack([e[k].astype(np.float64) - base[k] for e in experts]) for k in NAMES}
    merged = run(jaxmerge.ram(), base, experts)
    assert_merge(merged, base, per_tensor(ref.ram, taus, eps=1e-5))


@pytest.mark.parametrize("n,r,alpha", [(n, 0.1, 2.0) for n in NS] + [(3, 0.2, 1.0)])
def test_ram_plus(n, r, alpha):
    base, experts, taus = make_models(n, seed=100 + n, sparse=0.6)
    names = list(taus)
    merged = run(jaxmerge.ram_plus(1e-5, r, alpha, "global"), base, experts)
    deltas = ref.ram_plus([taus[k] for k in names], eps=1e-5, r=r, alpha=alpha)
    assert_merge(merged, base, dict(zip(names, deltas)))
    merged = run(jaxmerge.ram_plus(1e-5, r, alpha, "per_tensor"), base, experts)
    deltas = {k: ref.ram_plus([taus[k]], eps=1e-5, r=r, alpha=alpha)[0] for k in names}
    assert_merge(merged, base, deltas)


# ---------------------------------------------------------------------------
# Properties: N = 1, identical experts, zero task vectors, finite in -> finite out.

ALL_METHODS = {
    "linear": jaxmerge.linear,
    "task_arithmetic": jaxmerge.task_arithmetic,
    "ties": jaxmerge.ties,
    "ties_global": lambda: jaxmerge.ties(scope="global"),
    "dare_linear": jaxmerge.dare_linear,
    "dare_ties": jaxmerge.dare_ties,
    "breadcrumbs": jaxmerge.breadcrumbs,
    "breadcrumbs_ties": jaxmerge.breadcrumbs_ties,
    "della": jaxmerge.della,
    "slerp": jaxmerge.slerp,
    "model_stock": jaxmerge.model_stock,
    "ram": jaxmerge.ram,
    "ram_plus": jaxmerge.ram_plus,
}


@pytest.mark.parametrize("method,n", [(m, n) for m in ALL_METHODS for n in (1, 2, 3)
                                      if not (m == "slerp" and n == 3)])  # slerp: 1 or 2 experts
def test_zero_task_vectors_give_the_base(method, n):
    base, _, _ = make_models(1, seed=5)
    experts = [dict(base) for _ in range(n)]
    merged = run(ALL_METHODS[method](), base, experts)
    for name in base:
        np.testing.assert_array_equal(merged[name], base[name], err_msg=f"{method} {name}")


def test_single_expert_closed_forms():
    base, experts, taus = make_models(1, seed=6)
    expert_only = [jaxmerge.linear(), jaxmerge.task_arithmetic(), jaxmerge.model_stock(),
                   jaxmerge.ties(density=1.0), jaxmerge.slerp(1.0)]
    for method in expert_only:
        merged = run(method, base, experts)
        for name in base:
            np.testing.assert_allclose(merged[name], experts[0][name], rtol=1e-6, atol=1e-7)
    # RAM+ with one expert: nothing is shared, ρ = 0, λ = 1: identical to RAM.
    a = run(jaxmerge.ram_plus(), base, experts)
    b = run(jaxmerge.ram(), base, experts)
    for name in base:
        np.testing.assert_array_equal(a[name], b[name])


def test_identical_experts():
    base, experts, taus = make_models(1, seed=8)
    copies = [experts[0]] * 3
    same = {"linear": jaxmerge.linear(), "ties_full": jaxmerge.ties(density=1.0),
            "model_stock": jaxmerge.model_stock(), "slerp": jaxmerge.slerp(0.4)}
    for label, method in same.items():
        experts_in = copies[:2] if label == "slerp" else copies
        merged = run(method, base, experts_in)
        for name in base:
            np.testing.assert_allclose(merged[name], experts[0][name], rtol=2e-6, atol=1e-6,
                                       err_msg=label)
    # RAM and RAM+ (all entries shared, so no boost): the expert's deltas above ε only.
    for method in (jaxmerge.ram(), jaxmerge.ram_plus()):
        merged = run(method, base, copies)
        for name in base:
            tau = taus[name][0]
            expected = base[name] + np.where(np.abs(tau) > 1e-5, tau, 0.0)
            np.testing.assert_allclose(merged[name], expected, rtol=2e-6, atol=1e-7)
    merged = run(jaxmerge.task_arithmetic(), base, copies)
    for name in base:
        np.testing.assert_allclose(merged[name], base[name] + 3 * taus[name][0], rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_finite_in_finite_out(method):
    # One tensor per magnitude, from denormal-scale to near float32 overflow, in one merge.
    magnitudes = [1e-38, 1e-30, 1e-3, 1e3, 1e30]
    names = {f"model.layers.{i}.mlp.up_proj.weight": (7, 5) for i in range(len(magnitudes))}
    base, experts, _ = make_models(2, seed=9, names=names)
    rng = np.random.default_rng(4)
    for e in experts:
        for magnitude, (name, value) in zip(magnitudes, e.items()):
            e[name] = (base[name] + rng.normal(size=value.shape) * magnitude).astype(np.float32)
    merged = run(ALL_METHODS[method](), base, experts)
    for name, value in merged.items():
        assert np.all(np.isfinite(value)), (method, name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties_global", "ram", "ram_plus",
                                    "ties", "dare_ties", "della", "breadcrumbs"])
def test_row_blocks_and_batching_do_not_change_results(method):
    """A 1-byte budget merges row-wise methods one row at a time; others one leaf at a time."""
    base, experts, _ = make_models(3, seed=12)
    merge = ALL_METHODS[method]()
    whole = jaxmerge.merge(merge, base, experts, key=3)
    tiny_chunks = jaxmerge.merge(merge, base, experts, key=3, chunk_bytes=1)
    for name in base:
        np.testing.assert_array_equal(np.asarray(whole[name]), np.asarray(tiny_chunks[name]),
                                      err_msg=f"{method} {name}")


def _swept_leaves(monkeypatch) -> list[tuple[str, set]]:
    """Records (pass description, leaves read) for every statistics pass that streams."""
    swept = []
    real = executor.Executor._pass_totals

    def recording(self, stats_pass, chunks, label, stats, **options):
        swept.append((stats_pass.description, {leaf.name for c in chunks for leaf in c.leaves}))
        return real(self, stats_pass, chunks, label, stats, **options)

    monkeypatch.setattr(executor.Executor, "_pass_totals", recording)
    return swept


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_sparse_task_vectors_settle_the_ties_threshold_in_one_pass(monkeypatch, scope):
    """With more than d − ⌊d·k⌋ of the entries exactly zero (RL updates) the count of
    zeros settles the threshold at 0: neither radix pass reads anything."""
    base, experts, taus = make_models(3, seed=14, sparse=0.9)
    swept = _swept_leaves(monkeypatch)
    merged = jaxmerge.merge(jaxmerge.ties(0.2, scope=scope), base, experts, chunk_bytes=1)
    descriptions = [description for description, _ in swept]
    assert any("threshold" in d and "(zeros)" in d for d in descriptions), descriptions
    assert not any("(1/2)" in d or "(2/2)" in d for d in descriptions), descriptions
    if scope == "global":
        names = list(taus)
        expected = dict(zip(names, ref.ties_global([taus[k] for k in names], density=0.2,
                                                   scale=1.0)))
    else:
        expected = per_tensor(ref.ties, taus, density=0.2, scale=1.0, aggregation="mean",
                              scope="per_tensor")
    assert_merge({k: np.asarray(v) for k, v in merged.items()}, base, expected)


def test_only_unsettled_leaves_are_read_by_the_radix_passes(monkeypatch):
    """One leaf sparse in every expert (threshold 0, settled by the count of zeros), one
    sparse in one expert only (not settled: every expert's threshold must be 0), the
    others dense: the radix passes read all but the first, and all equal the reference."""
    base, experts, taus = make_models(2, seed=15)
    sparse_name, half_name = "model.embed_tokens.weight", ONE
    rng = np.random.default_rng(0)
    for name, sparse_experts in [(sparse_name, (0, 1)), (half_name, (0,))]:
        for t in sparse_experts:
            keep = rng.random(base[name].shape) < 0.1
            experts[t][name] = np.where(keep, experts[t][name], base[name])
            taus[name][t] = experts[t][name].astype(np.float64) - base[name]
    swept = _swept_leaves(monkeypatch)
    merged = jaxmerge.merge(jaxmerge.ties(0.2), base, experts, chunk_bytes=1)
    for radix_pass in ("(1/2)", "(2/2)"):
        read = [leaves for description, leaves in swept if radix_pass in description]
        assert read == [set(base) - {sparse_name}], swept
    expected = per_tensor(ref.ties, taus, density=0.2, scale=1.0, aggregation="mean",
                          scope="per_tensor")
    assert_merge({k: np.asarray(v) for k, v in merged.items()}, base, expected)


def test_radix_bins_keep_the_order_and_give_exact_zero_its_own_bin():
    values = np.array([0.0, 1e-45, 1e-40, 1e-38, 0.1, 0.1000001, 1.0, 3e38, np.inf], np.float32)
    bins = np.asarray(ops.high_bin_counts(jnp.asarray(values)))
    occupied = np.flatnonzero(bins)
    assert occupied[0] == 0 and bins[0] == 1  # exact zero alone in bin 0
    assert bins.sum() == len(values)
    high = np.array([np.flatnonzero(np.asarray(ops.high_bin_counts(jnp.asarray([v]))))[0]
                     for v in values])
    assert np.all(np.diff(high) >= 0)
    low = values.view(np.uint32) & 0xFFFF
    np.testing.assert_array_equal(ops.radix_value(high, low), values)
    # The second level only counts the entries of the chosen first-level bin.
    inside = np.asarray(ops.low_bin_counts(jnp.asarray(values), int(high[4])))
    assert inside.sum() == np.sum(high == high[4]) and inside[low[4]] == 1


def test_rowwise_property_of_methods():
    info = jaxmerge.LeafInfo.from_name("model.layers.0.mlp.up_proj.weight", (4, 4))
    assert jaxmerge.task_arithmetic().rowwise(info)
    assert jaxmerge.ram_plus().rowwise(info)
    assert jaxmerge.ties(scope="global").rowwise(info)
    assert jaxmerge.ties().rowwise(info)  # per-tensor quantities come from per-leaf passes
    assert jaxmerge.dare_ties().rowwise(info)  # masks are keyed by row
    assert jaxmerge.della().rowwise(info)  # ranks are per row
    assert not jaxmerge.breadcrumbs().rowwise(info)  # whole-tensor ranks
    assert not jaxmerge.model_stock().rowwise(info)
    assert not jaxmerge.slerp().rowwise(info)
