"""Flat merges (Merge.flat): leaves of one size merged flattened, one compiled call per size."""

import numpy as np
import pytest

import jaxmerge
from jaxmerge import executor, methods, ops
from jaxmerge.algebra import Merge, chain, matrix, route
from jaxmerge.leaves import LeafInfo

SHAPES = {  # three sizes; 768 and 16 each in several shapes and module families
    "model.layers.0.mlp.up_proj.weight": (48, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 48),
    "model.layers.0.self_attn.q_proj.weight": (24, 32),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.post_attention_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "model.embed_tokens.weight": (96, 16),
}
SIZES = {int(np.prod(shape)) for shape in SHAPES.values()}


def models(n=3, seed=0, shapes=SHAPES, density=0.4):
    """bf16-like sparse task vectors: many equal magnitudes (ties' tie-breaks matter)."""
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    experts = [{k: v + (np.round(rng.normal(size=v.shape) * 8) / 64
                        * (rng.random(v.shape) < density)).astype(np.float32)
                for k, v in base.items()} for _ in range(n)]
    return base, experts


def not_flat(merge: Merge) -> Merge:
    return merge._replace(flat=lambda info: False)


def counting_compiles(monkeypatch) -> list:
    """The shapes of the leaves each new apply program was built for."""
    built = []
    real = executor._compile_apply

    def recording(merge, info, out_dtype):
        built.append(info.shape)
        return real(merge, info, out_dtype)

    monkeypatch.setattr(executor, "_compile_apply", recording)
    return built


FLAT_METHODS = ["task_arithmetic", "ties", "linear", "ram", "ram_plus", "breadcrumbs",
                "breadcrumbs_ties", "dare_linear", "dare_ties"]


@pytest.mark.parametrize("name", FLAT_METHODS)
def test_flat_methods_merge_each_size_in_one_program_with_the_same_bits(monkeypatch, name):
    merge = methods.build(name, {})
    info = LeafInfo.from_name("model.layers.0.mlp.up_proj.weight", (48, 16))
    assert merge.flat(info)
    base, experts = models(seed=1)
    built = counting_compiles(monkeypatch)
    flat = jaxmerge.merge(merge, base, experts, key=3, compute_threads=1)
    assert len(built) == len(SIZES), built
    built.clear()
    shaped = jaxmerge.merge(not_flat(merge), base, experts, key=3, compute_threads=1)
    assert len(built) > len(SIZES)
    for name_ in SHAPES:
        assert flat[name_].shape == SHAPES[name_]
        np.testing.assert_array_equal(np.asarray(flat[name_]), np.asarray(shaped[name_]))


@pytest.mark.parametrize("name", ["della", "model_stock", "slerp"])
def test_methods_that_depend_on_the_shape_are_not_flat(name):
    merge = methods.build(name, {})
    for leaf, shape in SHAPES.items():
        assert not merge.flat(LeafInfo.from_name(leaf, shape)), leaf


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "resmerge"])
def test_spectral_methods_are_flat_only_off_the_matrices(name):
    """Their matrix branch needs the matrix; the other leaves get an entrywise merge."""
    merge = methods.build(name, {})
    for leaf, shape in SHAPES.items():
        info = LeafInfo.from_name(leaf, shape)
        if info.is_matrix:
            assert not merge.flat(info), leaf


def test_combinators_keep_flat_only_where_every_piece_is():
    up = LeafInfo.from_name("model.layers.0.mlp.up_proj.weight", (48, 16))
    norm = LeafInfo.from_name("model.norm.weight", (16,))
    assert chain(ops.trim(), ops.elect_sign(), ops.disjoint_mean()).flat(up)
    assert chain(ops.dare(), ops.sum_experts()).flat(up)
    assert not chain(ops.della_mask(), ops.sum_experts()).flat(up)
    routed = route({matrix: methods.build("tsv", {})}, ops.mean())
    assert not routed.flat(up) and routed.flat(norm)
    assert jaxmerge.add(ops.mean(), ops.sum_experts()).flat(up)
    assert not jaxmerge.add(ops.mean(), Merge(lambda x, ctx: x[0])).flat(up)


def test_a_routed_flat_merge_keeps_each_branch_on_its_leaves(monkeypatch):
    """Leaves of one size routed to different branches never share a call."""
    merge = route({matrix: ops.sum_experts()}, ops.mean())
    base, experts = models(seed=2)
    merged = jaxmerge.merge(merge, base, experts)
    for name, shape in SHAPES.items():
        taus = np.stack([e[name] - base[name] for e in experts])
        info = LeafInfo.from_name(name, shape)
        expected = base[name] + (taus.sum(0) if info.is_matrix else taus.mean(0))
        np.testing.assert_allclose(np.asarray(merged[name]), expected, rtol=1e-6, atol=1e-6)


def test_leaves_over_the_budget_keep_their_shape_in_row_blocks(monkeypatch):
    """A budget that cuts only the embedding into row blocks: its blocks keep their 2-D
    shape (and TIES's per-leaf passes), the other leaves are merged flat, bits unchanged."""
    merge = jaxmerge.ties()
    base, experts = models(seed=3)
    calls = []
    real = executor.Executor._compiled_fn

    def recording(self, kind, chunk, factory):  # merge programs (the blocks': "pieces")
        if kind in ("apply", "pieces") and (kind, *self._program_key(chunk)) not in self._compiled:
            calls.append((chunk.flat, chunk.shape))
        return real(self, kind, chunk, factory)

    monkeypatch.setattr(executor.Executor, "_compiled_fn", recording)
    budget = 60_000  # a 768-entry leaf with 3 experts needs ~49 kB, the embedding ~98 kB
    flat = jaxmerge.merge(merge, base, experts, chunk_bytes=budget, compute_threads=1)
    assert sorted(shape for is_flat, shape in calls if is_flat) == [(16,), (768,)]
    blocks = [shape for is_flat, shape in calls if not is_flat]
    assert blocks and all(len(shape) == 2 and shape[1] == 16 and shape[0] < 96
                          for shape in blocks), blocks
    shaped = jaxmerge.merge(not_flat(merge), base, experts, chunk_bytes=budget,
                            compute_threads=1)
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(shaped[name]))


def test_diagnostics_are_measured_on_the_real_shapes():
    """Executor.measure never flattens: a diagnostic may depend on the shape."""
    from jaxmerge.algebra import stats_pass
    from jaxmerge.plan import build_plan
    from jaxmerge.sources import ArraySource

    base, experts = models(seed=4)
    shape_pass = stats_pass(lambda x, ctx: np.float32(x.shape[-1]) + 0 * x.sum(),
                            lambda total, stats: float(total), "last dim", per_leaf=True)
    base_source = ArraySource(base, "base")
    sources = [ArraySource(e, f"expert {i}") for i, e in enumerate(experts)]
    plan = build_plan(base_source, sources, {})
    run = executor.Executor(jaxmerge.task_arithmetic(), plan, base_source, sources, {},
                            key=np.zeros(2, np.uint32))
    measured = run.measure(shape_pass)
    for name, shape in SHAPES.items():
        assert measured[name] == shape[-1]
