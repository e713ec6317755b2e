"""Segments: large leaves of a flat row-wise merge without statistics cut into blocks of
one entry count, so that leaves of different shapes and sizes share one compiled program
(``Executor.segment_entries``), with the bits of merging each leaf whole."""

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
    assert sorted(built) == [(256,), (SEGMENT,)], built  # norms; every large leaf's segments
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
    ("ties", {}), ("ties", {"ties_scope": "global"}), ("dare_ties", {}), ("ram_plus", {}),
])
def test_merges_with_statistics_are_not_segmented(name, hyper):
    """A statistic of the whole leaf (TIES's threshold, DARE-TIES's majority sign) or of
    the whole model (global TIES, RAM+'s ratio): no segments."""
    merge = methods.build(name, hyper)
    base, experts = models(seed=5)
    merged, _, used = run(merge, base, experts)
    assert used.segment_entries is None
    whole, _, _ = run(not_flat(merge), base, experts)
    assert_same_bits(merged, whole)
