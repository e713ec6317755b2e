"""SAR-Merging and Fisher merging (METHODS.md §6–§7) against the float64 NumPy reference.

The resolve step and Fisher merging are deterministic and compared entry by entry; SAR's
private-region dropout is random, so its deterministic part (which entries are candidates,
what survivors become) is compared exactly and its randomness statistically.
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

import jaxmerge
from jaxmerge import sensitivity
from jaxmerge.errors import ConfigError
from tests import numpy_reference as ref
from tests.checkpoints import load_state, make_tiny_expert, make_tiny_llama
from tests.test_cli import experts_flag, run_cli

NAME = "model.layers.0.mlp.up_proj.weight"


def sparse_case(rng, n, shape=(40, 30), density=0.4, fisher_ties=False):
    """Sparse task vectors with overlaps, conflicts, sub-ε deltas; positive Fisher values."""
    taus = rng.normal(size=(n, *shape)) * (rng.random((n, *shape)) < density)
    taus[:, rng.random(shape) < 0.2] *= -1
    small = rng.random((n, *shape)) < 0.05
    taus[small] = 3e-6 * np.sign(rng.normal(size=int(small.sum())))
    fisher = rng.random((n, *shape)) ** 3
    if fisher_ties:
        fisher[:, rng.random(shape) < 0.3] = 0.5
    return taus.astype(np.float32), fisher.astype(np.float32)


def merge_arrays(method, taus, fisher, seed=0, **options):
    base = {NAME: np.zeros(taus.shape[1:], np.float32)}
    experts = [{NAME: t} for t in taus]
    fishers = [{NAME: f} for f in fisher]
    merged = jaxmerge.merge(method, base, experts, extras={"fisher": fishers}, key=seed,
                            **options)
    return np.asarray(merged[NAME], np.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("arbitration", ["hard", "fisher_weighted"])
def test_resolve_matches_reference(n, arbitration):
    taus, fisher = sparse_case(np.random.default_rng(n), n, fisher_ties=True)
    got = merge_arrays(jaxmerge.sar(arbitration=arbitration, drop_rate=0.0), taus, fisher)
    np.testing.assert_allclose(got, ref.sar_resolve(taus, fisher, arbitration), rtol=1e-6,
                               atol=1e-7)


def test_pair_rule_sums_agreements_and_keeps_the_more_sensitive_conflict():
    taus = np.array([[1.0, -2.0, 3.0, 0.5, 0.0, -1.0],
                     [2.0, 1.0, -1.0, 0.5, 4.0, 1.0]], np.float32)
    fisher = np.array([[1.0, 5.0, 0.1, 1.0, 1.0, 2.0],
                       [1.0, 1.0, 0.2, 1.0, 1.0, 2.0]], np.float32)
    resolved = np.asarray(sensitivity.resolve_pair(taus, fisher))
    # agree -> sum; conflict -> larger S (A, then B); zero counts as agreeing; S tie -> B.
    np.testing.assert_array_equal(resolved, [3.0, -2.0, -1.0, 1.0, 4.0, 1.0])


@pytest.mark.parametrize("count", [1, 2, 7, 8])
def test_private_median_is_numpys_median(count):
    rng = np.random.default_rng(count)
    values = rng.normal(size=(6, 5)).astype(np.float32)
    values[0, 0] = values[0, 1]  # a tie
    private = np.zeros(values.shape, bool)
    private.ravel()[rng.choice(values.size, count, replace=False)] = True
    median, any_private = sensitivity.private_median(values, private)
    assert bool(any_private)
    assert float(median) == pytest.approx(np.median(np.abs(values[private])), rel=1e-6)
    _, none = sensitivity.private_median(values, np.zeros_like(private))
    assert not bool(none)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sar_drops_only_small_private_entries_and_rescales_survivors(n):
    p = 0.2
    taus, fisher = sparse_case(np.random.default_rng(10 + n), n, shape=(200, 150))
    got = merge_arrays(jaxmerge.sar(drop_rate=p, scale_factor=0.7), taus, fisher)
    resolved = ref.sar_resolve(taus, fisher)
    candidates = ref.sar_drop_candidates(resolved, ref.sar_private(taus))
    np.testing.assert_allclose(got[~candidates], 0.7 * resolved[~candidates], rtol=1e-6,
                               atol=1e-8)
    kept = got[candidates] != 0
    np.testing.assert_allclose(got[candidates][kept], 0.7 * resolved[candidates][kept] / (1 - p),
                               rtol=1e-6)
    # The mask is the reference's rule with this keep mask.
    keep_mask = np.zeros(taus.shape[1:], bool)
    keep_mask[candidates] = kept
    np.testing.assert_allclose(got, ref.sar(taus, fisher, keep_mask, p, scale=0.7), rtol=1e-6,
                               atol=1e-8)
    # Drop rate: binomial, 5 standard deviations.
    m = int(candidates.sum())
    assert m > 1000
    assert abs((m - kept.sum()) / m - p) < 5 * np.sqrt(p * (1 - p) / m)
    # Unbiased: the candidates' total is preserved in expectation.
    total = np.abs(resolved[candidates]).sum()
    assert abs(np.abs(got[candidates]).sum() / 0.7 - total) < 5 * np.sqrt(
        p / (1 - p) * (resolved[candidates] ** 2).sum())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sar_in_row_blocks_equals_whole_tensor(n):
    """A tensor over the chunk budget is merged in row blocks; the private median then
    comes from two statistics passes and must give the same bytes."""
    taus, fisher = sparse_case(np.random.default_rng(30 + n), n, shape=(64, 48))
    for method in (jaxmerge.sar(), jaxmerge.sar("fisher_weighted"), jaxmerge.fisher_merging()):
        whole = merge_arrays(method, taus, fisher, seed=2)
        blocks = merge_arrays(method, taus, fisher, seed=2, chunk_bytes=4096)
        np.testing.assert_array_equal(blocks, whole)


def test_sar_mask_depends_on_seed_and_name_only():
    taus, fisher = sparse_case(np.random.default_rng(3), 2, shape=(60, 50))
    method = jaxmerge.sar()
    first, again = merge_arrays(method, taus, fisher, 5), merge_arrays(method, taus, fisher, 5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, merge_arrays(method, taus, fisher, 6))


def test_sar_properties():
    rng = np.random.default_rng(4)
    tau = (rng.normal(size=(30, 20)) * (rng.random((30, 20)) < 0.3)).astype(np.float32)
    fisher = rng.random((2, 30, 20)).astype(np.float32)
    # Identical experts: every update is shared, nothing private: Δ = 2τ (a sum).
    np.testing.assert_allclose(merge_arrays(jaxmerge.sar(), np.stack([tau, tau]), fisher),
                               2 * tau, rtol=1e-6)
    # Zero task vectors -> 0; finite in, finite out (zero Fisher included).
    zeros = np.zeros((3, 30, 20), np.float32)
    assert np.all(merge_arrays(jaxmerge.sar(), zeros, np.zeros_like(zeros)) == 0)
    taus, big = sparse_case(rng, 3)
    assert np.all(np.isfinite(merge_arrays(jaxmerge.sar("fisher_weighted"), taus, 0 * big)))
    # N = 1: every update is private; above-median entries are kept as they are.
    single = merge_arrays(jaxmerge.sar(), tau[None], fisher[:1])
    big_entries = np.abs(tau) >= np.median(np.abs(tau[np.abs(tau) > 1e-5]))
    np.testing.assert_array_equal(single[big_entries], tau[big_entries])


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fisher_merging_matches_reference(n):
    taus, fisher = sparse_case(np.random.default_rng(20 + n), n)
    got = merge_arrays(jaxmerge.fisher_merging(), taus, fisher)
    np.testing.assert_allclose(got, ref.fisher_merge(taus, fisher), rtol=1e-5, atol=1e-7)
    # Zero Fisher everywhere: the plain mean.
    np.testing.assert_allclose(merge_arrays(jaxmerge.fisher_merging(), taus, 0 * fisher),
                               taus.mean(0), rtol=1e-5, atol=1e-7)


def test_bad_options_are_rejected():
    for build in (lambda: jaxmerge.sar(arbitration="soft"), lambda: jaxmerge.sar(drop_rate=1.0),
                  lambda: jaxmerge.sar(epsilon=-1.0), lambda: jaxmerge.fisher_merging(floor=0.0)):
        with pytest.raises(ConfigError):
            build()
    with pytest.raises(Exception, match="fisher"):
        jaxmerge.merge(jaxmerge.sar(), {NAME: np.zeros((2, 2), np.float32)},
                       [{NAME: np.ones((2, 2), np.float32)}])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sar")
    base = make_tiny_llama(root / "base", seed=0, dtype="bfloat16")
    return base, [make_tiny_expert(base, root / f"expert-{i}", seed=i + 1) for i in range(2)]


def write_fisher(directory, expert_dir, seed):
    """A synthetic Fisher checkpoint with the expert's names and shapes (positive values)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    state = load_state(expert_dir)
    safetensors.numpy.save_file({k: (rng.random(v.shape) ** 2).astype(np.float32)
                                 for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def test_cli_sar_and_fisher_with_fisher_checkpoints(tiny, tmp_path):
    base, experts = tiny
    experts = experts[:2]
    fishers = [write_fisher(tmp_path / f"fisher-{i}", e, i) for i, e in enumerate(experts)]
    fisher_flag = "--fisher=" + ",".join(map(str, fishers))
    b = load_state(base)
    states = [load_state(e) for e in experts]
    fisher_states = [load_state(f) for f in fishers]
    for method, args, oracle in (
            ("sar", ["--sar_drop_rate=0"], lambda t, f: ref.sar_resolve(t, f)),
            ("fisher", [], ref.fisher_merge)):
        out = tmp_path / method
        assert run_cli(f"--method={method}", f"--base={base}", experts_flag(experts),
                       f"--output={out}", fisher_flag, "--dtype=float32", *args) == 0
        merged = load_state(out)
        for name, value in b.items():
            taus = np.stack([s[name].astype(np.float64) - value for s in states])
            fisher = np.stack([f[name] for f in fisher_states])
            np.testing.assert_allclose(merged[name], value + oracle(taus, fisher), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{method} {name}")


def test_cli_fisher_errors(tiny, tmp_path, capsys):
    base, experts = tiny
    common = [f"--base={base}", experts_flag(experts[:2])]
    assert run_cli("--method=sar", *common, f"--output={tmp_path / 'a'}") == 2
    assert "--fisher" in capsys.readouterr().err
    fisher = write_fisher(tmp_path / "f0", experts[0], 0)
    assert run_cli("--method=sar", *common, f"--output={tmp_path / 'b'}",
                   f"--fisher={fisher}") == 2
    assert "one per expert" in capsys.readouterr().err
    assert run_cli("--method=ties", *common, f"--output={tmp_path / 'c'}",
                   f"--fisher={fisher},{fisher}") == 2
    assert "only read by" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abc")
