"""Diagnostics (jaxmerge.analysis, python -m jaxmerge.analyze) against direct NumPy computations.

Every statistic is checked against ``tests/numpy_reference.py`` (float64, from the papers'
definitions) or a closed form on constructed arrays: disjoint sparse supports, prescribed
spectra, shared rank-1 heads plus noise.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import analysis
from jaxmerge.analysis import statistics
from jaxmerge.analysis.tables import REGIONS, noise_top1_share
from tests import numpy_reference as ref
from tests.checkpoints import load_state
from tests.subprocesses import run_module


def sparse_taus(rng, n, shape, density=0.3, tiny=0.3):
    """Sparse task vectors with shared supports (so every region occurs) and sub-ε entries."""
    taus = rng.normal(size=(n, *shape)) * (rng.random((n, *shape)) < density)
    shared = rng.random(shape) < density / 2
    taus[:, shared] = rng.normal(size=(n, int(shared.sum())))
    taus = np.where(rng.random((n, *shape)) < tiny * 0.1, 1e-6 * np.sign(taus + 1e-30), taus)
    return taus.astype(np.float32)


def pair_list(n):
    return statistics.pair_indices(n)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_update_statistics_match_numpy(n):
    rng = np.random.default_rng(n)
    taus = sparse_taus(rng, n, (13, 11))
    got = jax.tree.map(np.asarray, jax.jit(statistics.update_statistics)(jnp.asarray(taus)))
    entries = taus[0].size
    assert int(got["entries"]) == entries
    for t in range(n):
        np.testing.assert_allclose(1 - got["updated"][t] / entries, ref.update_sparsity(taus[t]))
    for i, (s, t) in enumerate(pair_list(n)):
        expected = ref.pair_regions(taus[s], taus[t])
        assert got["pair_conflict"][i] / entries == pytest.approx(expected["conflict"])
        assert got["pair_overlap"][i] / entries == pytest.approx(expected["overlap"])
    expected_all = ref.all_regions(taus)
    for region, count in zip(REGIONS, got["regions"]):
        assert count / entries == pytest.approx(expected_all[region]), region
    flat = taus.reshape(n, -1).astype(np.float64)
    np.testing.assert_allclose(got["gram"], flat @ flat.T, rtol=1e-5, atol=1e-6)
    active = np.abs(flat) > ref.UPDATE_EPS
    count = active.sum(0)
    np.testing.assert_array_equal(got["private"], (active & (count == 1)).sum(1))
    np.testing.assert_array_equal(got["shared_by"], [(count == c).sum() for c in range(n + 1)])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_region_stats_are_the_numpy_fractions(n):
    taus = sparse_taus(np.random.default_rng(10 + n), n, (17, 9))
    got = jax.jit(statistics.region_stats)(jnp.asarray(taus))
    expected = ref.all_regions(taus)
    assert set(got) == set(statistics.REGIONS)
    for region in statistics.REGIONS:
        assert float(got[region]) == pytest.approx(expected[region], abs=1e-7), region
    assert sum(float(v) for v in got.values()) == pytest.approx(1.0)
    zero = statistics.region_stats(jnp.zeros((n, 5, 3)))
    assert float(zero["unchanged"]) == 1.0 and float(zero["private"]) == 0.0


def test_disjoint_supports_are_private_and_orthogonal():
    n, size = 3, 600
    taus = np.zeros((n, size), np.float32)
    supports = [np.arange(0, 50), np.arange(100, 180), np.arange(300, 310)]
    for t, support in enumerate(supports):
        taus[t, support] = np.random.default_rng(t).normal(size=support.size) + 3.0
    got = jax.tree.map(np.asarray, statistics.update_statistics(jnp.asarray(taus)))
    assert got["pair_conflict"].sum() == 0 and got["pair_overlap"].sum() == 0
    np.testing.assert_array_equal(got["private"], [50, 80, 10])
    np.testing.assert_array_equal(got["regions"], [size - 140, 140, 0, 0])
    np.testing.assert_allclose(analysis.cosines(got["gram"]) - np.diag(np.diag(
        analysis.cosines(got["gram"]))), 0.0, atol=1e-7)


def test_update_statistics_of_row_blocks_add_up():
    taus = jnp.asarray(sparse_taus(np.random.default_rng(3), 3, (20, 7)))
    whole = statistics.update_statistics(taus)
    parts = [statistics.update_statistics(taus[:, :8]), statistics.update_statistics(taus[:, 8:])]
    summed = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), *parts)
    for key in whole:
        np.testing.assert_allclose(summed[key], np.asarray(whole[key]), rtol=1e-6, err_msg=key)


def matrix_with_spectrum(rng, shape, sigma):
    m, n = shape
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.zeros(min(m, n))
    s[: len(sigma)] = sigma
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def test_spectrum_summary_closed_form_and_zero():
    sigma = np.array([4.0, 2.0, 1.0, 1.0, 0.5])
    got = jax.tree.map(np.asarray, statistics.spectrum_summary(jnp.asarray(
        np.concatenate([sigma, np.zeros(3)]), jnp.float32), (1, 2, 16)))
    energy = sigma**2
    np.testing.assert_allclose(got["energy_share"], [16 / energy.sum(), 20 / energy.sum(), 1.0],
                               rtol=1e-6)
    np.testing.assert_allclose(got["stable_rank"], energy.sum() / 16, rtol=1e-6)
    p = sigma / sigma.sum()
    np.testing.assert_allclose(got["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    # A flat spectrum of r values has effective rank r and stable rank r.
    flat = jax.tree.map(np.asarray, statistics.spectrum_summary(jnp.ones(7)))
    np.testing.assert_allclose([flat["stable_rank"], flat["effective_rank"]], [7, 7], rtol=1e-6)
    zero = jax.tree.map(np.asarray, statistics.spectrum_summary(jnp.zeros(5)))
    assert all(np.all(v == 0) for v in zero.values())
    empty = jax.tree.map(np.asarray, statistics.spectrum_summary(jnp.zeros(0)))
    assert all(np.all(v == 0) for v in empty.values())


def spectral_case(rng, n, kind, shape=(24, 18)):
    if kind == "shared_head":  # one rank-1 head (positive multiples) + independent noise
        u, v = rng.normal(size=shape[0]), rng.normal(size=shape[1])
        head = np.outer(u, v) / np.linalg.norm(u) / np.linalg.norm(v)
        taus = [(3.0 + t) * head + 0.02 * rng.normal(size=shape) for t in range(n)]
    elif kind == "prescribed":
        taus = [matrix_with_spectrum(rng, shape, [5.0, 2.0, 1.5, 1.0, 0.3 * t])
                for t in range(n)]
    elif kind == "with_zero":
        taus = [rng.normal(size=shape) * (t > 0) for t in range(n)]
    else:
        taus = [rng.normal(size=shape) for _ in range(n)]
    return np.stack(taus).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("kind", ["shared_head", "prescribed", "with_zero", "noise"])
def test_spectral_statistics_match_numpy(n, kind):
    rng = np.random.default_rng(10 * n + len(kind))
    taus = spectral_case(rng, n, kind)
    keys = jax.random.split(jax.random.key(0), n)
    got = jax.tree.map(np.asarray, jax.jit(
        lambda x, k: statistics.spectral_statistics(x, k, svd="exact"))(jnp.asarray(taus), keys))
    for t in range(n):
        sigma = np.linalg.svd(taus[t].astype(np.float64), compute_uv=False)
        for when, spectrum in (("before", sigma), ("after", sigma[1:])):
            shares, stable, effective = ref.spectrum_stats(spectrum)
            np.testing.assert_allclose(got[when]["energy_share"][t], shares, rtol=1e-4,
                                       atol=1e-6)
            np.testing.assert_allclose(got[when]["stable_rank"][t], stable, rtol=1e-4)
            np.testing.assert_allclose(got[when]["effective_rank"][t], effective, rtol=1e-4)
    expected = ref.head_residual_geometry(taus)
    np.testing.assert_allclose(got["head_cos"], expected["head_cos"], atol=1e-4)
    np.testing.assert_allclose(got["residual_cos"], expected["residual_cos"], atol=1e-4)
    for key in ("head_agreement", "residual_coherence", "head_retention", "residual_retention"):
        np.testing.assert_allclose(got[key], expected[key], atol=1e-4, err_msg=key)
    if kind == "shared_head" and n > 1:
        assert got["head_agreement"] > 0.99 and got["head_retention"] > 0.99
        # Independent noise residuals: retention about 1/√N.
        assert abs(got["residual_retention"] - 1 / np.sqrt(n)) < 0.1


def test_randomized_heads_agree_with_exact():
    taus = jnp.asarray(spectral_case(np.random.default_rng(5), 3, "prescribed", (96, 64)))
    keys = jax.random.split(jax.random.key(1), 3)
    exact = statistics.spectral_statistics(taus, keys, svd="exact")
    randomized = statistics.spectral_statistics(taus, keys, svd="randomized")
    for key in ("head_cos", "residual_cos", "head_agreement", "residual_coherence",
                "head_retention", "residual_retention"):
        np.testing.assert_allclose(randomized[key], exact[key], atol=1e-3, err_msg=key)


def test_spectral_statistics_of_zero_matrices_are_finite():
    got = statistics.spectral_statistics(jnp.zeros((3, 8, 6)), jax.random.split(
        jax.random.key(0), 3))
    leaves = jax.tree.leaves(got)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert all(np.all(np.asarray(x) == 0) for x in leaves)


def test_noise_reference_share_matches_gaussian_matrices():
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(5):
        s = np.linalg.svd(rng.normal(size=(300, 200)), compute_uv=False)
        shares.append(s[0] ** 2 / np.sum(s**2))
    assert np.mean(shares) == pytest.approx(noise_top1_share((300, 200)), rel=0.05)


# ---------------------------------------------------------------------------
# Streaming over checkpoints, tables, verdict, CLI


def layer_arrays(state, layer):
    names = sorted(n for n in state if f"layers.{layer}." in n)
    return np.concatenate([state[n].astype(np.float64).ravel() for n in names])


def test_measured_checkpoints_match_numpy(tiny):
    base, experts = tiny
    measured = analysis.measure_checkpoints(base, experts, svd="exact")
    tables = analysis.build_tables(measured)
    b = load_state(base)
    states = [load_state(e) for e in experts]
    all_names = sorted(b)
    model = [np.concatenate([s[n].astype(np.float64).ravel() - b[n].ravel()
                             for n in all_names]) for s in states]
    for t in range(3):
        assert tables["model"]["sparsity"][t] == pytest.approx(ref.update_sparsity(model[t]))
    for layer in (0, 1):
        taus = [layer_arrays(s, layer) - layer_arrays(b, layer) for s in states]
        scope = tables["layers"][str(layer)]
        for s, t in pair_list(3):
            assert scope["cosine"][f"{s + 1}-{t + 1}"] == pytest.approx(
                ref.cos(taus[s], taus[t]), abs=1e-5)
            expected = ref.pair_regions(taus[s], taus[t])
            for region in REGIONS:
                assert scope["pair_regions"][f"{s + 1}-{t + 1}"][region] == pytest.approx(
                    expected[region]), region
        expected_all = ref.all_regions(np.stack(taus))
        for region in REGIONS:
            assert scope["regions"][region] == pytest.approx(expected_all[region])
    name = "model.layers.1.self_attn.q_proj.weight"
    row = next(r for r in tables["tensors"] if r["name"] == name)
    matrix_taus = np.stack([s[name].astype(np.float64) - b[name] for s in states])
    geometry = ref.head_residual_geometry(matrix_taus)
    assert row["spectral"]["geometry"]["residual_coherence"] == pytest.approx(
        geometry["residual_coherence"], abs=1e-4)
    assert row["spectral"]["geometry"]["head_agreement"] == pytest.approx(
        geometry["head_agreement"], abs=1e-4)
    shares, stable, _ = ref.spectrum_stats(np.linalg.svd(matrix_taus[2], compute_uv=False))
    assert row["spectral"]["experts"][2]["energy_top1"] == pytest.approx(shares[0], rel=1e-4)
    assert row["spectral"]["experts"][2]["stable_rank_before"] == pytest.approx(stable, rel=1e-4)
    # Non-matrix tensors have no spectral statistics; matrices all do.
    assert all((r["spectral"] is not None) == ("proj" in r["name"]) for r in tables["tensors"])


def test_row_blocks_and_chunking_do_not_change_the_numbers(tiny):
    base, experts = tiny
    whole = analysis.measure_checkpoints(base, experts, spectral=False)
    blocks = analysis.measure_checkpoints(base, experts, spectral=False, chunk_bytes=1)
    for a, b in zip(whole.tensors, blocks.tensors):
        assert a.info.name == b.info.name
        for key in a.update:
            np.testing.assert_allclose(a.update[key], b.update[key], rtol=1e-5, err_msg=key)


def synthetic_measurements(regime, n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {f"model.layers.{i}.mlp.up_proj.weight": rng.normal(size=(32, 24)).astype(np.float32)
            for i in range(2)}
    shared = {k: rng.normal(size=v.shape) for k, v in base.items()}
    experts = []
    for _ in range(n):
        expert = {}
        for k, v in base.items():
            if regime == "sparse":
                delta = rng.normal(size=v.shape) * (rng.random(v.shape) < 0.05)
            else:  # dense, sharing one direction
                delta = shared[k] + 0.3 * rng.normal(size=v.shape)
            expert[k] = (v + 0.01 * delta).astype(np.float32)
        experts.append(expert)
    return analysis.measure(base, experts)


def test_verdict_reads_the_regime():
    sparse = analysis.build_report(synthetic_measurements("sparse"))["verdict"]
    assert sparse["regime"] == "RL-like sparse" and sparse["alignment"] == "near-orthogonal"
    assert sparse["recommended"][0] == "resmerge"
    dense = analysis.build_report(synthetic_measurements("dense"))["verdict"]
    assert dense["regime"] == "SFT-like dense" and dense["alignment"] == "aligned"
    assert "task_arithmetic" in dense["recommended"]
    assert dense["numbers"]["sparsity"] < 0.01
    single = analysis.build_report(synthetic_measurements("sparse", n=1))["verdict"]
    assert single["recommended"] == [] and single["alignment"].startswith("n/a")
    # Only methods that exist are recommended.
    limited = analysis.build_report(synthetic_measurements("sparse"), registry={"ram"})
    assert limited["verdict"]["recommended"] == ["ram"]


def run_analyze(*args):
    return run_module("jaxmerge.analyze", *args)


def test_cli_writes_a_complete_report(tiny, tmp_path):
    base, experts = tiny
    out = tmp_path / "report"
    result = run_analyze(f"--base={base}", "--experts=" + ",".join(map(str, experts[:2])),
                         f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "regime:" in result.stdout and "favoured methods:" in result.stdout
    report = json.loads((out / "report.json").read_text())
    for name in report["files"]:
        assert (out / name).is_file(), name
    for plot in ("sparsity", "regions", "cosine", "spectral", "head_residual"):
        png = (out / f"{plot}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (out / "index.html").read_text()
    assert all(f'src="{p}.png"' in page for p in ("sparsity", "spectral"))
    assert report["verdict"]["regime"] in ("RL-like sparse", "intermediate", "SFT-like dense")
    b, e = load_state(base), load_state(experts[1])
    total = sum(v.size for v in b.values())
    updated = sum(int((np.abs(e[n].astype(np.float64) - b[n]) > 1e-5).sum()) for n in b)
    assert report["tables"]["model"]["sparsity"][1] == pytest.approx(1 - updated / total)
    layers = (out / "layers.csv").read_text().splitlines()
    assert layers[0].startswith("layer,") and len(layers) == 3  # header + 2 layers
    assert not list(tmp_path.glob(".report*")), "staging directory left behind"


def test_cli_errors_name_the_problem(tiny, tmp_path):
    base, experts = tiny
    result = run_analyze(f"--base={base}", f"--output={tmp_path / 'x'}")
    assert result.returncode == 2 and "--experts" in result.stderr
    (tmp_path / "exists").mkdir()
    result = run_analyze(f"--base={base}", f"--experts={experts[0]}",
                         f"--output={tmp_path / 'exists'}")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    result = run_analyze(f"--base={base}", f"--experts={experts[0]},{tmp_path / 'missing'}",
                         f"--output={tmp_path / 'y'}")
    assert result.returncode == 2 and "missing" in result.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.smollm2
def test_smollm2_analysis_streams_and_matches_numpy(smollm2, tmp_path):
    out = tmp_path / "report"
    experts = ",".join(map(str, smollm2["experts"]))
    result = run_analyze(f"--base={smollm2['base']}", f"--experts={experts}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    print(f"SmolLM2 + 3 experts analysed in {report['seconds']:.1f} s "
          f"({report['bytes_read'] / 1e6:.0f} MB read)")
    b = load_state(smollm2["base"])
    e = load_state(smollm2["experts"][0])
    name = "model.layers.7.mlp.down_proj.weight"
    tau = e[name].astype(np.float64) - b[name]
    row = next(r for r in report["tables"]["tensors"] if r["name"] == name)
    assert row["sparsity"][0] == pytest.approx(ref.update_sparsity(tau))
    shares, stable, effective = ref.spectrum_stats(np.linalg.svd(tau, compute_uv=False))
    expert = row["spectral"]["experts"][0]
    assert expert["energy_top1"] == pytest.approx(shares[0], rel=1e-3)
    assert expert["stable_rank_before"] == pytest.approx(stable, rel=1e-3)
    assert expert["effective_rank_before"] == pytest.approx(effective, rel=1e-3)
    assert report["verdict"]["regime"] == "RL-like sparse"
