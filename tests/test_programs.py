"""The traced-program cache (jaxmerge.programs): same bits, no tracing, safe keys."""

import pathlib
import subprocess
import sys

import jax
import pytest

import jaxmerge
from jaxmerge import executor, programs
from jaxmerge.api import merge_checkpoints
from jaxmerge.io import Checkpoint
from jaxmerge.programs import ProgramCache


def merged_bytes(directory) -> dict[str, bytes]:
    with Checkpoint.open(directory) as checkpoint:
        return {name: checkpoint.read(name).tobytes() for name in checkpoint.tensors}


def run(tiny, out, method, programs_cache=None):
    base, experts = tiny
    merge_checkpoints(getattr(jaxmerge, method)(), base, experts, out, seed=3,
                      programs=programs_cache)
    return merged_bytes(out)


def entries(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob("*" + programs.SUFFIX)) if directory.exists() else []


def count_traced(monkeypatch) -> list:
    """Records every merge program the executor builds (and so traces)."""
    built = []
    real = executor._compile_apply

    def counting(*args):
        built.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(executor, "_compile_apply", counting)
    return built


@pytest.mark.parametrize("method", ["ties", "dare_ties", "resmerge"])
def test_loaded_programs_give_the_same_bits_without_tracing(tiny, tmp_path, monkeypatch,
                                                            method):
    expected = run(tiny, tmp_path / "plain", method)
    cache = ProgramCache(tmp_path / "programs", identity=method)
    built = count_traced(monkeypatch)
    assert run(tiny, tmp_path / "fill", method, cache) == expected
    stored = entries(cache.directory)
    assert stored and built  # the first run traced and stored every program
    built.clear()
    assert run(tiny, tmp_path / "reuse", method, cache) == expected
    assert built == []  # nothing traced: every program came from the cache
    assert entries(cache.directory) == stored


def test_another_identity_does_not_reuse_programs(tiny, tmp_path, monkeypatch):
    directory = tmp_path / "programs"
    run(tiny, tmp_path / "a", "ties", ProgramCache(directory, "ties density=0.2"))
    count = len(entries(directory))
    built = count_traced(monkeypatch)
    run(tiny, tmp_path / "b", "ties", ProgramCache(directory, "ties density=0.3"))
    assert built and len(entries(directory)) == 2 * count


def test_unreadable_entries_are_traced_again_and_rewritten(tiny, tmp_path, monkeypatch):
    expected = run(tiny, tmp_path / "plain", "resmerge")
    cache = ProgramCache(tmp_path / "programs", identity="resmerge")
    run(tiny, tmp_path / "fill", "resmerge", cache)
    for entry in entries(cache.directory):
        entry.write_bytes(b"not a program")
    built = count_traced(monkeypatch)
    assert run(tiny, tmp_path / "again", "resmerge", cache) == expected
    assert built
    for entry in entries(cache.directory):
        assert cache.load(entry.name.removesuffix(programs.SUFFIX)) is not None


def test_a_program_that_cannot_be_exported_is_traced_as_usual(tiny, tmp_path, monkeypatch):
    expected = run(tiny, tmp_path / "plain", "ties")

    def refuse(*args, **kwargs):
        raise ValueError("cannot export")

    monkeypatch.setattr(programs.export, "export", refuse)
    cache = ProgramCache(tmp_path / "programs", identity="ties")
    assert run(tiny, tmp_path / "out", "ties", cache) == expected
    assert entries(cache.directory) == []


def test_key_covers_identity_label_arguments_and_environment(monkeypatch):
    structs = (jax.ShapeDtypeStruct((2, 3), "float32"), {"s": jax.ShapeDtypeStruct((), "int32")})
    cache = ProgramCache("/unused", identity="ties")
    key = cache.key("apply", structs)
    assert key == ProgramCache("/elsewhere", identity="ties").key("apply", structs)
    others = [
        ProgramCache("/unused", identity="ties 0.3").key("apply", structs),
        cache.key("pass", structs),
        cache.key("apply", (jax.ShapeDtypeStruct((3, 2), "float32"), structs[1])),
        cache.key("apply", (jax.ShapeDtypeStruct((2, 3), "bfloat16"), structs[1])),
        cache.key("apply", (structs[0], {"t": structs[1]["s"]})),
    ]
    monkeypatch.setattr(programs, "environment", lambda: ("another jax",))
    others.append(cache.key("apply", structs))
    assert len({key, *others}) == len(others) + 1
    monkeypatch.setattr(programs, "environment", lambda: None)
    assert cache.key("apply", structs) is None  # no stable environment: no cache


def test_environment_hashes_jaxmerge_source(tmp_path, monkeypatch):
    package = tmp_path / "jaxmerge"
    (package / "io").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "io" / "b.py").write_text("y = 2\n")
    monkeypatch.setattr(programs, "_PACKAGE", package)
    first = programs.environment.__wrapped__()
    assert first == programs.environment.__wrapped__()
    (package / "io" / "b.py").write_text("y = 3\n")
    changed = programs.environment.__wrapped__()
    assert changed[0] != first[0] and changed[1:] == first[1:]


_LAPACK_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jaxmerge.programs import ProgramCache

cache = ProgramCache(sys.argv[1], "lapack")
double = cache.program(lambda: jax.jit(lambda x: 2 * x), "double")
assert float(double(jnp.ones(3))[0]) == 2.0
print("after double:", "scipy.linalg" in sys.modules)
values = cache.program(lambda: jax.jit(lambda a: jnp.linalg.svd(a, compute_uv=False)), "svd")
a = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
print("singular values:", np.asarray(values(jnp.asarray(a))).tolist())
"""


def test_exported_programs_without_lapack_calls_do_not_load_it(tmp_path):
    """Lowering an exported module initialises JAX's CPU LAPACK kernels (importing
    scipy.linalg, ~0.1 s) only when the module calls one: a fresh process that runs a
    cached elementwise program never loads it; a cached SVD still runs."""
    from tests.subprocesses import ROOT, subprocess_env

    def fresh_process():
        done = subprocess.run([sys.executable, "-c", _LAPACK_SCRIPT, str(tmp_path)],
                              capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    fresh_process()  # exports and stores both programs
    assert len(entries(tmp_path)) == 2
    assert fresh_process() == ["after double: False", "singular values: [3.0, 2.0, 1.0]"]
