"""The executor's pipeline: compiling ahead, one chunk in flight, balanced row blocks."""

import concurrent.futures
import threading
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from jax._src import dispatch

import jaxmerge
from jaxmerge import executor
from jaxmerge.executor import balanced_block_rows
from jaxmerge.plan import build_plan
from jaxmerge.sources import ArraySource

SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (48, 16),
    "model.layers.1.mlp.up_proj.weight": (48, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.embed_tokens.weight": (96, 16),
}


def models(n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    experts = [{k: v + rng.normal(scale=0.1, size=v.shape).astype(np.float32)
                for k, v in base.items()} for _ in range(n)]
    return base, experts


@pytest.mark.parametrize("method", ["ties", "resmerge", "dare_ties"])
def test_every_program_is_compiled_ahead_and_reused(monkeypatch, method):
    """Every distinct call is compiled in the background thread, once, for arguments
    shaped like the real ones: the real calls then compile nothing themselves (a
    mismatch in shape or dtype would make them compile again, in the main thread)."""
    merge = getattr(jaxmerge, method)()
    jaxmerge.merge(merge, *models(seed=1), key=0)  # warm the small helper programs
    submitted, compiling_threads = [], []
    real = executor._compile_quietly

    def recording(fn, structs):
        submitted.append(fn)
        real(fn, structs)

    def on_event(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiling_threads.append(threading.current_thread().name)

    monkeypatch.setattr(executor, "_compile_quietly", recording)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        # A budget that cuts the embedding into row blocks: TIES then runs per-leaf passes.
        # One compute thread: with more, a call may get ahead of the compile thread and
        # compile its (new) program itself, which is as intended but not what this checks.
        jaxmerge.merge(merge, *models(), key=0, chunk_bytes=20_000, compute_threads=1)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert submitted, "nothing was compiled ahead"
    assert len({id(fn) for fn in submitted}) == len(submitted)
    assert len(compiling_threads) >= len(submitted)
    assert all(name.startswith("jaxmerge-compile") for name in compiling_threads), (
        compiling_threads)


@pytest.mark.parametrize("merge, early", [
    (jaxmerge.ties(), True),                       # per-leaf passes (row blocks) only
    (jaxmerge.ties(scope="global"), False),        # a whole-model pass: every call needs it
    (jaxmerge.task_arithmetic(), True),            # no pass at all
])
def test_merge_calls_compile_while_the_statistics_passes_run(monkeypatch, merge, early):
    """Calls that take no statistic are queued for compilation before the first pass;
    those of row-blocked leaves (per-leaf statistics) and, with a whole-model pass,
    all of them are queued only once the statistics are known."""
    queued = []  # merge calls: (statistics known?, the call's statistics arguments)
    known = [False]
    merge_calls = set()
    real_stats = executor.Executor.compute_stats
    real_apply = executor.Executor._compile_apply
    real_pieces = executor._compile_apply_pieces

    def compute_stats(self):
        result = real_stats(self)
        known[0] = True
        return result

    def compile_apply(self, *args):
        fn = real_apply(self, *args)
        merge_calls.add(id(fn))
        return fn

    def compile_pieces(*args):  # the calls of row blocks
        fn = real_pieces(*args)
        merge_calls.add(id(fn))
        return fn

    def recording(fn, structs):
        if id(fn) in merge_calls:  # not a statistics pass's call
            queued.append((known[0], structs[6:8]))  # (global, per-leaf statistics)

    monkeypatch.setattr(executor.Executor, "compute_stats", compute_stats)
    monkeypatch.setattr(executor.Executor, "_compile_apply", compile_apply)
    monkeypatch.setattr(executor, "_compile_apply_pieces", compile_pieces)
    monkeypatch.setattr(executor, "_compile_quietly", recording)
    jaxmerge.merge(merge, *models(), key=0, chunk_bytes=20_000)
    before = [stats for after, stats in queued if not after]
    assert bool(before) == early
    assert all(stats == ({}, {}) for stats in before)  # none of them takes a statistic
    if merge.passes:
        assert any(after for after, _ in queued)


def test_results_do_not_depend_on_the_pipeline(monkeypatch):
    """The same bits with compiling ahead and one chunk in flight, and without either."""
    base, experts = models(seed=4)
    merge = jaxmerge.ties(0.3)
    piped = jaxmerge.merge(merge, base, experts, key=1, chunk_bytes=20_000)

    def in_order(stream, launch, threads, release):
        for chunk, arrays in stream:
            yield chunk, launch(chunk, arrays)  # (buffers not given back: fresh ones)

    monkeypatch.setattr(executor, "_launched", in_order)
    monkeypatch.setattr(executor, "_compile_quietly", lambda fn, structs: None)
    plain = jaxmerge.merge(merge, base, experts, key=1, chunk_bytes=20_000)
    for name in base:
        np.testing.assert_array_equal(np.asarray(piped[name]), np.asarray(plain[name]))


def test_a_failing_compilation_ahead_is_reported_by_the_real_call():
    """An error raised while tracing a leaf function is swallowed by the background
    compilation and raised, unchanged, by the merge's own call."""

    def broken(x, ctx):
        raise ValueError("leaf function failed")

    with pytest.raises(ValueError, match="leaf function failed"):
        jaxmerge.merge(jaxmerge.rowwise(broken), *models())


@pytest.mark.parametrize("rows, max_rows, expected", [
    (49152, 2080, 2048),   # SmolLM2's embedding: 24 equal blocks, not 23 + 1
    (151936, 2000, 1187),  # Qwen2.5's vocabulary: 128 equal blocks
    (32000, 100, 100),
    (7, 3, 3),             # no divisor within 2x the fewest blocks: 3 + 3 + 1
    (5, 5, 5),
    (1, 1, 1),
])
def test_balanced_block_rows(rows, max_rows, expected):
    assert balanced_block_rows(rows, max_rows) == expected


@pytest.mark.parametrize("rows", [2, 3, 97, 1000, 4096, 49152, 151936])
@pytest.mark.parametrize("max_rows", [1, 2, 7, 100, 2080])
def test_balanced_blocks_stay_within_the_budget_and_need_at_most_two_shapes(rows, max_rows):
    size = balanced_block_rows(rows, max_rows)
    assert 1 <= size <= max_rows
    blocks = -(-rows // size)
    shapes = {min(size, rows - start) for start in range(0, rows, size)}
    assert len(shapes) <= 2
    assert blocks <= 2 * -(-rows // max_rows)


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 1536, 576), (4, 0, 3)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int8])
def test_host_zeros_is_aligned_zeroed_and_writable(shape, dtype):
    array = executor.host_zeros(shape, dtype)
    assert array.shape == shape and array.dtype == np.dtype(dtype)
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.size == 0 or array.ctypes.data % executor.HOST_ALIGNMENT == 0
    assert not np.any(array.astype(np.float32))


def test_jax_uses_host_zeros_in_place():
    """Why the read buffers are aligned: JAX's CPU client aliases such an array instead of
    copying it (a change written after the transfer shows through)."""
    aligned = executor.host_zeros((1024, 1024), np.float32)
    on_device = jax.device_put(aligned)
    aligned[0, 0] = 1.0
    assert float(on_device[0, 0]) == 1.0


def test_host_buffers_reuse_memory_of_the_same_size_and_free_other_sizes():
    buffers = executor.HostBuffers()
    first, second = buffers.take([jax.ShapeDtypeStruct((4, 6), np.float32),
                                  jax.ShapeDtypeStruct((3, 8), ml_dtypes.bfloat16)])
    assert first.shape == (4, 6) and first.dtype == np.float32
    assert second.shape == (3, 8) and second.dtype == ml_dtypes.bfloat16
    assert all(a.ctypes.data % executor.HOST_ALIGNMENT == 0 and a.flags.writeable
               for a in (first, second))
    addresses = {first.ctypes.data, second.ctypes.data}
    buffers.give([first, second])
    # Same byte sizes, other shapes and dtypes: the same memory comes back.
    again = buffers.take([jax.ShapeDtypeStruct((96,), np.uint8),
                          jax.ShapeDtypeStruct((12,), np.float32)])
    assert {a.ctypes.data for a in again} == addresses
    assert again[0].shape == (96,) and again[1].dtype == np.float32
    buffers.give(again)
    # A size not seen before: idle buffers of the sizes it does not use are dropped.
    other = buffers.take([jax.ShapeDtypeStruct((96,), np.uint8),
                          jax.ShapeDtypeStruct((5,), np.float32)])
    assert other[0].ctypes.data in addresses
    assert sorted(buffers._idle) == [96]  # the 48-byte buffer went; none of size 96 idle
    assert not buffers._idle[96]


def test_padding_slots_read_as_zeros_from_reused_buffers():
    """The last chunk of a group is padded; its buffers come back from an earlier chunk
    with that chunk's data, so the padding is zeroed (a NaN-free, defined input)."""
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(9)]
    base = {n: rng.normal(size=(6, 4)).astype(np.float32) for n in names}
    experts = [{n: v + rng.normal(size=v.shape).astype(np.float32) for n, v in base.items()}
               for _ in range(2)]
    seen = []
    merge = jaxmerge.Merge(lambda x, ctx: (seen.append(x.shape), x.sum(axis=0))[1])
    leaf_bytes = 6 * 4 * 3 * (4 + 4 * executor._WORK_FACTOR)
    plan = build_plan(ArraySource(base, "base"),
                      [ArraySource(e, f"expert {i}") for i, e in enumerate(experts)])
    run = executor.Executor(merge, plan, ArraySource(base, "base"),
                            [ArraySource(e, f"expert {i}") for i, e in enumerate(experts)],
                            chunk_bytes=2 * leaf_bytes, compute_threads=1)
    reads = []
    real = run._read_chunk

    def recording(chunk):
        arrays, nbytes = real(chunk)
        reads.append((chunk, arrays))
        return arrays, nbytes

    run._read_chunk = recording
    merged = {}
    run.run(lambda name, value, rows=None: merged.__setitem__(name, np.array(value)))
    padded = [(chunk, arrays) for chunk, arrays in reads if None in chunk.slots]
    assert padded and len(reads) == 5  # 4 × 2 + (1 + padding)
    chunk, (_, _, base_in, experts_in, _) = padded[0]
    assert {base_in.ctypes.data, experts_in.ctypes.data} <= {
        a.ctypes.data for _, arrays in reads[:3] for a in arrays[2:4]}  # reused memory
    i = chunk.slots.index(None)
    assert not base_in[i].any() and not experts_in[i].any()
    for name in names:
        np.testing.assert_allclose(merged[name], experts[0][name] + experts[1][name] - base[name],
                                   rtol=1e-6, atol=1e-6)


def test_a_program_not_yet_compiled_ahead_is_compiled_once_for_all_callers(monkeypatch):
    """Two compute threads reach a program whose compilation ahead has not started: the
    first cancels the queued job and compiles it; the second calls it meanwhile, and
    JAX's caches make that call wait for the same compilation instead of compiling the
    program a second time (one backend compile in all)."""
    compiles = []
    real = executor._compile_quietly

    def slow_recording(fn, structs):
        compiles.append(threading.current_thread().name)
        time.sleep(0.2)
        real(fn, structs)

    monkeypatch.setattr(executor, "_compile_quietly", slow_recording)
    fn = jax.jit(lambda x: x * 2.0)
    arrays = np.ones((4, 8), np.float32)

    class Owner:  # what _Ahead needs of its executor
        def _program_key(self, chunk):
            return ("key",)

        def _input_structs(self, chunk):
            return (jax.ShapeDtypeStruct(arrays.shape, arrays.dtype),)

        def _before_call(self):
            pass

    class Chunk:
        strategy, size = None, 1

        def ids(self):
            return ()

    backend_compiles = []

    def on_event(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            backend_compiles.append(threading.current_thread().name)

    busy = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.submit(busy.wait)  # the compile thread is busy: the queued compile never starts
    ahead = executor._Ahead(Owner(), lambda chunk, args: (fn, args), pool)
    ahead.submit([Chunk()])
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as callers:
            results = list(callers.map(lambda _: ahead.launch(Chunk(), (arrays,)), range(2)))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
        busy.set()
        pool.shutdown(wait=True)
    assert len(compiles) == 1 and len(backend_compiles) == 1, (compiles, backend_compiles)
    for result in results:
        np.testing.assert_array_equal(np.asarray(result), arrays * 2)
