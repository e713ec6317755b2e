"""Segments: large leaves of a flat row-wise merge cut into blocks of one entry count, so
that leaves of different shapes and sizes share one compiled program
(``Executor.segment_entries``), and a per-leaf majority sign deferred where segments
need it (``StatsPass.depends``): bits as merging each leaf whole."""

import numpy as np
import pytest

import jaxmerge
from jaxmerge import executor, methods, ops
from jaxmerge.algebra import Merge, chain
from jaxmerge.plan import build_plan
from jaxmerge.sources import ArraySource
from tests import numpy_reference as ref

SHAPES = {  # large sizes 2**18 and 2**17 (gcd 2**17), in five shapes; rows of 256 or 1024
    "model.embed_tokens.weight": (2048, 256),
    "model.layers.0.mlp.up_proj.weight": (1024, 256),
    "model.layers.0.mlp.down_proj.weight": (256, 1024),
    "model.layers.0.self_attn.q_proj.weight": (512, 256),
    "model.layers.0.self_attn.k_proj.weight": (128, 1024),
    "model.layers.0.input_layernorm.weight": (256,),
    "model.norm.weight": (256,),
}
SEGMENT = 2**17
EMBED_ROWS_PER_SEGMENT = SEGMENT // 256


def models(n=3, seed=0, density=0.3):
    """Sparse bf16-like task vectors (many equal magnitudes, some exact cancellations)."""
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    experts = [{k: v + (np.round(rng.normal(size=v.shape) * 8) / 64
                        * (rng.random(v.shape) < density)).astype(np.float32)
                for k, v in base.items()} for _ in range(n)]
    return base, experts


def not_flat(merge: Merge) -> Merge:
    """The same merge, each leaf merged whole in its own shape (no flat groups, no segments)."""
    return merge._replace(flat=lambda info: False)


def run(merge, base, experts, chunk_bytes=executor.DEFAULT_CHUNK_BYTES, compute_threads=1):
    """(merged arrays, run report, executor) of an in-memory merge."""
    base_source = ArraySource(base, "base")
    sources = [ArraySource(e, f"expert {i}") for i, e in enumerate(experts)]
    plan = build_plan(base_source, sources, {})
    run_ = executor.Executor(merge, plan, base_source, sources, {}, key=np.zeros(2, np.uint32),
                             chunk_bytes=chunk_bytes, compute_threads=compute_threads)
    out = {leaf.name: np.empty(leaf.out_shape, leaf.out_dtype) for leaf in plan.leaves}

    def write(name, value, rows=None):
        out[name][slice(None) if rows is None else slice(*rows)] = value

    report = run_.run(write)
    return out, report, run_


def assert_same_bits(got: dict, expected: dict) -> None:
    for name in SHAPES:
        assert got[name].shape == SHAPES[name]
        np.testing.assert_array_equal(got[name].view(np.uint32), expected[name].view(np.uint32),
                                      err_msg=name)


def test_segment_entries_is_the_common_divisor_that_fits_the_budget():
    base, experts = models()
    per_entry = (1 + len(experts)) * (4 + 4 * executor._WORK_FACTOR)  # f32 inputs + work
    for budget, expected in [(executor.DEFAULT_CHUNK_BYTES, SEGMENT),
                             (SEGMENT * per_entry - 1, SEGMENT // 2),  # halved to fit
                             (SEGMENT // 2 * per_entry - 1, None)]:  # below the minimum
        plan_run = run(jaxmerge.task_arithmetic(), base, experts, chunk_bytes=budget)[2]
        assert plan_run.segment_entries == expected, budget


def test_segments_share_one_program_across_shapes(monkeypatch):
    built = []
    real = executor.Executor._compile_apply

    def recording(self, info, out_dtype, chunk):
        built.append(chunk.shape)
        return real(self, info, out_dtype, chunk)

    monkeypatch.setattr(executor.Executor, "_compile_apply", recording)
    base, experts = models(seed=1)
    segmented, report, _ = run(jaxmerge.task_arithmetic(), base, experts)
    assert sorted(built) == [(256,), (SEGMENT,)], built  # norms; every large leaf's segments
    built.clear()
    whole, _, _ = run(not_flat(jaxmerge.task_arithmetic()), base, experts)
    assert sorted(built) == sorted(set(SHAPES.values())), built  # one program per shape
    assert_same_bits(segmented, whole)
    assert report.redone_segments == 0


@pytest.mark.parametrize("name, hyper", [
    ("task_arithmetic", {}), ("linear", {}), ("dare_linear", {}), ("ram", {}),
    ("dare_ties", {}), ("dare_ties", {"aggregation": "sum"}),
])
@pytest.mark.parametrize("compute_threads", [1, 2])
def test_segmented_merges_have_the_bits_of_whole_leaf_merges(name, hyper, compute_threads):
    """DARE's masks follow each entry's flat position in its whole leaf, and DARE-TIES's
    majority sign is the whole leaf's: segments change nothing."""
    merge = methods.build(name, hyper)
    base, experts = models(seed=2)
    segmented, _, used = run(merge, base, experts, compute_threads=compute_threads)
    assert used.segment_entries == SEGMENT
    whole, _, _ = run(not_flat(merge), base, experts, compute_threads=compute_threads)
    assert_same_bits(segmented, whole)


def elect_disjoint_mean() -> Merge:
    """TIES without the trim: the per-tensor majority sign is the merge's only pass."""
    return chain(ops.elect_sign("per_tensor"), ops.disjoint_mean())


def coarse_models(taus: dict, seed: int):
    """Base and experts with dyadic values, so that (base + τ) - base is exactly τ."""
    rng = np.random.default_rng(seed)
    base = {k: (np.round(rng.normal(size=s) * 8) / 8).astype(np.float32)
            for k, s in SHAPES.items()}
    return base, [{k: base[k] + taus[k][t] for k in SHAPES} for t in range(3)]


def test_a_deferred_majority_redoes_only_the_segments_whose_signs_cancel():
    """The embedding's four segments are merged before its majority sign is known; only
    the one with exactly cancelling task vectors is merged again, with the whole leaf's
    majority, which differs from that segment's own."""
    rng = np.random.default_rng(3)
    taus = {k: ((np.round(np.abs(rng.normal(size=(3, *s))) * 8) + 1) / 64).astype(np.float32)
            for k, s in SHAPES.items()}  # positive
    embed = taus["model.embed_tokens.weight"]
    lo, hi = EMBED_ROWS_PER_SEGMENT, 2 * EMBED_ROWS_PER_SEGMENT  # the second segment:
    embed[:, lo:hi] *= -1  # its own majority is negative, the leaf's positive,
    embed[1, lo:lo + 5] = -embed[0, lo:lo + 5]  # and 5 of its rows cancel exactly
    embed[2, lo:lo + 5] = 0.0
    base, experts = coarse_models(taus, seed=3)
    merge = elect_disjoint_mean()

    merged, report, used = run(merge, base, experts)
    assert used.segment_entries == SEGMENT
    assert report.redone_segments == 1
    for name in SHAPES:
        expected = base[name] + ref.elect_disjoint(taus[name].astype(np.float64), "mean")
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    # Where the signs cancel, the leaf's majority (+) keeps expert 1's positive entries.
    np.testing.assert_array_equal(
        merged["model.embed_tokens.weight"][lo:lo + 5],
        base["model.embed_tokens.weight"][lo:lo + 5] + embed[1, lo:lo + 5])
    whole, _, _ = run(not_flat(merge), base, experts)
    assert_same_bits(merged, whole)


def test_without_cancellations_one_sweep_merges_everything():
    """No entry whose signs cancel: nothing is merged again and nothing is read twice
    (the majority pass is not run either)."""
    rng = np.random.default_rng(4)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    experts = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
               for _ in range(3)]
    merged, report, _ = run(elect_disjoint_mean(), base, experts)
    assert report.redone_segments == 0
    entries = sum(int(np.prod(s)) for s in SHAPES.values())
    assert report.bytes_read == entries * 4 * (1 + len(experts))
    whole, _, _ = run(not_flat(elect_disjoint_mean()), base, experts)
    assert_same_bits(merged, whole)


def test_merges_with_other_statistics_are_not_segmented():
    """TIES's trim needs each leaf's order statistic (per tensor or over the model): no
    segments."""
    base, experts = models(seed=5)
    for merge in (jaxmerge.ties(), jaxmerge.ties(scope="global")):
        merged, _, used = run(merge, base, experts)
        assert used.segment_entries is None
        whole, _, _ = run(not_flat(merge), base, experts)
        assert_same_bits(merged, whole)
