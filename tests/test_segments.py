"""Segments: large leaves of a flat row-wise merge without statistics cut into blocks of
one entry count, so that leaves of different shapes and sizes share one compiled program
(``Executor.segment_entries``), with the bits of merging each leaf whole. A per-leaf
statistic that the call can sum over a leaf's pieces (DARE-TIES's majority sign,
``StatsPass.in_call``) does not stop them: a leaf's segments go to one call, or, for a
leaf larger than a call, a pass gives each call the part of the sum outside it. Small
leaves of such merges are padded with zeros into a segment, so one program serves all."""

import math

import numpy as np
import pytest

import jaxmerge
from jaxmerge import executor, methods
from jaxmerge.plan import build_plan
from jaxmerge.sources import ArraySource
from tests.test_flat import models as flat_models
from tests.test_flat import not_flat

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


def models(seed=0):
    return flat_models(seed=seed, shapes=SHAPES, density=0.3)


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
    segmented, _, _ = run(jaxmerge.task_arithmetic(), base, experts)
    assert built == [(SEGMENT,)], built  # every large leaf's segments, the norms padded
    built.clear()
    whole, _, _ = run(not_flat(jaxmerge.task_arithmetic()), base, experts)
    assert sorted(built) == sorted(set(SHAPES.values())), built  # one program per shape
    assert_same_bits(segmented, whole)


@pytest.mark.parametrize("name", ["task_arithmetic", "linear", "dare_linear", "ram"])
@pytest.mark.parametrize("compute_threads", [1, 2])
def test_segmented_merges_have_the_bits_of_whole_leaf_merges(name, compute_threads):
    """DARE's masks follow each entry's flat position in its whole leaf: segments change
    nothing."""
    merge = methods.build(name, {})
    base, experts = models(seed=2)
    segmented, _, used = run(merge, base, experts, compute_threads=compute_threads)
    assert used.segment_entries == SEGMENT
    whole, _, _ = run(not_flat(merge), base, experts, compute_threads=compute_threads)
    assert_same_bits(segmented, whole)


@pytest.mark.parametrize("name, hyper", [
    ("ties", {}), ("ties", {"ties_scope": "global"}), ("ram_plus", {}),
])
def test_merges_with_statistics_are_not_segmented(name, hyper):
    """A statistic of the whole leaf that a call cannot sum over pieces (TIES's threshold)
    or of the whole model (global TIES, RAM+'s ratio): no segments."""
    merge = methods.build(name, hyper)
    base, experts = models(seed=5)
    merged, _, used = run(merge, base, experts)
    assert used.segment_entries is None
    whole, _, _ = run(not_flat(merge), base, experts)
    assert_same_bits(merged, whole)


PER_SLOT = SEGMENT * 4 * (4 + 4 * executor._WORK_FACTOR)  # one float32 segment, 3 experts


def counting_programs(monkeypatch) -> dict:
    """{kind: [entries of a leaf (or piece) per compiled program]} of the executor's."""
    built: dict = {"apply": [], "pieces": [], "pass": []}
    for kind, name in [("apply", "_compile_apply"), ("pieces", "_compile_apply_pieces"),
                       ("pass", "_compile_pass")]:
        real = getattr(executor, name)

        def recording(*args, real=real, kind=kind):
            built[kind].append(math.prod(args[1].shape))
            return real(*args)

        monkeypatch.setattr(executor, name, recording)
    return built


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
@pytest.mark.parametrize("compute_threads", [1, 2])
def test_dare_ties_is_segmented_with_the_bits_of_whole_leaf_merges(aggregation, compute_threads,
                                                                   monkeypatch):
    """Each leaf's segments share one call that sums its majority sign over them: one
    program for every large leaf, no statistics pass, the bits of whole-leaf merges (the
    test's task vectors cancel often, so the majority sign decides many entries)."""
    merge = methods.build("dare_ties", {"drop_rate": 0.3, "aggregation": aggregation})
    base, experts = models(seed=7)
    built = counting_programs(monkeypatch)
    segmented, report, used = run(merge, base, experts, compute_threads=compute_threads)
    assert used.segment_entries == SEGMENT
    assert built == {"apply": [], "pieces": [SEGMENT], "pass": []}, built  # norms padded
    assert report.in_call_leaves == 7  # every leaf, its segments in one call
    whole, _, _ = run(not_flat(merge), base, experts, compute_threads=compute_threads)
    assert_same_bits(segmented, whole)


def test_leaves_larger_than_a_call_get_the_rest_of_their_sum_from_a_pass(monkeypatch):
    """Calls of two segments: the embedding (four segments) spans two calls, each given
    the majority-sign count of the other's segments by one pass over it alone."""
    merge = methods.build("dare_ties", {"drop_rate": 0.3})
    base, experts = models(seed=8)
    built = counting_programs(monkeypatch)
    segmented, report, used = run(merge, base, experts, chunk_bytes=2 * PER_SLOT)
    assert used.segment_entries == SEGMENT
    assert built["pieces"] == [SEGMENT] and built["pass"] == [SEGMENT], built
    assert report.in_call_leaves == 6  # all but the embedding
    whole, _, _ = run(not_flat(merge), base, experts)
    assert_same_bits(segmented, whole)


def test_the_majority_sign_of_a_leaf_counts_every_segment():
    """A leaf whose first segments lean negative and whose others lean positive more: its
    entries with cancelling signs take the whole leaf's majority, +, in every segment."""
    name = "model.layers.0.mlp.up_proj.weight"  # (1024, 256): two segments
    base, experts = models(seed=9)
    tau = np.zeros((1024, 256), np.float32)
    tau[:400] = -1.0  # 400 rows lean negative, 512 + 112 rows positive
    tau[400:] = 1.0
    tau[::8] = 0.0  # a row in eight: +0.5 and -0.5 cancel there, majority decides
    base[name] = np.ones_like(tau)  # (θ_t − θ₀ exact)
    experts[0][name] = base[name] + np.where(tau == 0, 0.5, tau)
    experts[1][name] = base[name] + np.where(tau == 0, -0.5, tau)
    experts[2][name] = base[name].copy()
    merge = methods.build("dare_ties", {"drop_rate": 0.0, "aggregation": "sum"})
    for budget in [executor.DEFAULT_CHUNK_BYTES, PER_SLOT]:  # one call, or one per segment
        merged, _, _ = run(merge, base, experts, chunk_bytes=budget)
        delta = merged[name] - base[name]
        np.testing.assert_array_equal(delta[::8], 0.5, err_msg=str(budget))


def test_small_leaves_are_padded_into_segments_while_that_is_cheap():
    """The norms (2 × 256 entries) take a segment each, zero-padded: 2 × 2¹⁷ padded
    entries against 5 × 2¹⁸ segmented (at most a quarter). Eight more small leaves would
    cost more than a quarter: they keep a program of their own size."""
    base, experts = models(seed=10)
    _, report, used = run(jaxmerge.task_arithmetic(), base, experts)
    assert used._padded_leaves == {"model.layers.0.input_layernorm.weight", "model.norm.weight"}
    assert report.bytes_read == 4 * 4 * sum(math.prod(shape) for shape in SHAPES.values())
    shapes = {**SHAPES, **{f"model.layers.{i}.post_attention_layernorm.weight": (256,)
                           for i in range(8)}}
    base, experts = flat_models(seed=10, shapes=shapes, density=0.3)
    _, _, used = run(jaxmerge.task_arithmetic(), base, experts)
    assert used.segment_entries == SEGMENT and not used._padded_leaves


@pytest.mark.parametrize("name", ["dare_ties", "task_arithmetic", "ram"])
def test_padded_leaves_have_the_bits_of_whole_leaf_merges(name):
    """Reused read buffers hold a segment's values where a padded leaf's zeros go: they
    are zeroed (else DARE-TIES's majority count of a norm would count them)."""
    merge = methods.build(name, {"drop_rate": 0.3} if name == "dare_ties" else {})
    base, experts = models(seed=11)
    for norm in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
        base[norm] = np.ones(256, np.float32)  # (exact task vectors)
        experts[0][norm] = base[norm] + 0.25
        experts[1][norm] = base[norm] + np.where(np.arange(256) % 2, 0.25, -0.25).astype(np.float32)
        experts[2][norm] = base[norm].copy()  # even entries: +0.25 - 0.25, majority +
    whole, _, _ = run(not_flat(merge), base, experts, compute_threads=1)
    for budget in [executor.DEFAULT_CHUNK_BYTES, 3 * PER_SLOT]:  # 2 calls, or 6 (reuse)
        padded, _, used = run(merge, base, experts, chunk_bytes=budget, compute_threads=1)
        assert used._padded_leaves
        assert_same_bits(padded, whole)
