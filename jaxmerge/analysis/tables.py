"""From per-tensor measurements to the papers' tables: whole model, per layer, per family.

Counts and inner products are summed over the tensors of a scope before any
ratio is taken, so a layer's update sparsity is that of all its entries and a
layer's cosine is that of its concatenated task vectors (SAR-Merging Fig. 2–3).
Spectral and head/residual quantities are per matrix; a scope reports their mean
over its matrices (ResMerge Fig. 4–5), leaving out an expert's zero matrices
(no spectrum) and, for the geometry, matrices where every expert's update is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from jaxmerge.analysis.statistics import REGIONS, pair_indices
from jaxmerge.analysis.streaming import Measurements, TensorMeasurement
from jaxmerge.linalg import COS_EPS

GEOMETRY = ("head_agreement", "residual_coherence", "residual_pair_cos", "head_retention",
            "residual_retention")


def pair_label(s: int, t: int) -> str:
    """'1-2' for experts s = 0 and t = 1 (1-based, as the CLI lists them)."""
    return f"{s + 1}-{t + 1}"


def _fractions(counts, entries: int) -> dict[str, float]:
    return {region: float(count) / max(entries, 1) for region, count in zip(REGIONS, counts)}


def _mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def update_scope(tensors: Iterable[TensorMeasurement], num_experts: int) -> dict:
    """Update sparsity, regions and cosines of a set of tensors taken together."""
    tensors = list(tensors)
    n = num_experts
    pairs = pair_indices(n)
    entries = sum(int(t.update["entries"]) for t in tensors)
    updated = np.sum([t.update["updated"] for t in tensors], axis=0, dtype=np.int64)
    gram = np.sum([t.update["gram"] for t in tensors], axis=0, dtype=np.float64)
    conflict = np.sum([t.update["pair_conflict"] for t in tensors], axis=0, dtype=np.int64)
    overlap = np.sum([t.update["pair_overlap"] for t in tensors], axis=0, dtype=np.int64)
    regions = np.sum([t.update["regions"] for t in tensors], axis=0, dtype=np.int64)
    private = np.sum([t.update["private"] for t in tensors], axis=0, dtype=np.int64)
    shared_by = np.sum([t.update["shared_by"] for t in tensors], axis=0, dtype=np.int64)
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    pair_regions = {}
    cosine = {}
    for index, (s, t) in enumerate(pairs):
        both = int(conflict[index] + overlap[index])
        counts = (entries - int(updated[s]) - int(updated[t]) + both,
                  int(updated[s]) + int(updated[t]) - 2 * both,
                  int(overlap[index]), int(conflict[index]))
        pair_regions[pair_label(s, t)] = _fractions(counts, entries)
        cosine[pair_label(s, t)] = float(gram[s, t] / (norms[s] * norms[t] + COS_EPS))
    return {
        "tensors": len(tensors),
        "entries": entries,
        "sparsity": [1.0 - float(u) / max(entries, 1) for u in updated],
        "task_vector_norm": [float(x) for x in norms],
        "regions": _fractions(regions, entries),
        "pair_regions": pair_regions,
        "cosine": cosine,
        "private_share": [float(p) / max(int(u), 1) for p, u in zip(private, updated)],
        "shared_by": [float(c) / max(entries, 1) for c in shared_by],
    }


def noise_top1_share(shape) -> float:
    """Top-1 energy share of an i.i.d. Gaussian m × n matrix, (√m + √n)² / (m n)
    (Marchenko–Pastur edge): the reference for "spectrally concentrated"."""
    m, n = shape
    return min(1.0, (np.sqrt(m) + np.sqrt(n)) ** 2 / (m * n))


def spectral_scope(tensors: Iterable[TensorMeasurement], num_experts: int,
                   energy_ranks: list[int]) -> dict | None:
    """Mean spectral statistics and head/residual geometry over a set's matrices."""
    matrices = [t for t in tensors if t.spectral is not None]
    if not matrices:
        return None
    n = num_experts
    per_expert = []
    for e in range(n):
        kept = [m.spectral for m in matrices if m.update["gram"][e, e] > 0]
        row = {"matrices": len(kept)}
        for when in ("before", "after"):
            row[f"stable_rank_{when}"] = _mean_or_none(
                [float(k[when]["stable_rank"][e]) for k in kept])
            row[f"effective_rank_{when}"] = _mean_or_none(
                [float(k[when]["effective_rank"][e]) for k in kept])
        for i, k in enumerate(energy_ranks):
            row[f"energy_top{k}"] = _mean_or_none(
                [float(m["before"]["energy_share"][e][i]) for m in kept])
        kept_matrices = [m for m in matrices if m.update["gram"][e, e] > 0]
        row["top1_vs_noise"] = _mean_or_none(
            [float(m.spectral["before"]["energy_share"][e][0]) / noise_top1_share(m.info.shape)
             for m in kept_matrices])
        per_expert.append(row)
    moving = [m.spectral for m in matrices if np.trace(m.update["gram"]) > 0]
    geometry = {name: _mean_or_none([float(m[name]) for m in moving]) for name in GEOMETRY}
    pairs = pair_indices(n)
    geometry["head_cos"] = {pair_label(s, t): _mean_or_none([float(m["head_cos"][i])
                                                             for m in moving])
                            for i, (s, t) in enumerate(pairs)}
    geometry["residual_cos"] = {pair_label(s, t): _mean_or_none([float(m["residual_cos"][i])
                                                                 for m in moving])
                                for i, (s, t) in enumerate(pairs)}
    return {"matrices": len(matrices), "experts": per_expert, "geometry": geometry}


def scope(tensors: list[TensorMeasurement], measurements: Measurements) -> dict:
    """:func:`update_scope` and :func:`spectral_scope` of one set of tensors."""
    result = update_scope(tensors, measurements.num_experts)
    result["spectral"] = spectral_scope(tensors, measurements.num_experts,
                                        measurements.settings["energy_ranks"])
    return result


def grouped(measurements: Measurements, key: Callable[[TensorMeasurement], object]) -> dict:
    """{key value: :func:`scope`} for the tensors grouped by ``key`` (None keys skipped)."""
    groups: dict = {}
    for tensor in measurements.tensors:
        value = key(tensor)
        if value is not None:
            groups.setdefault(value, []).append(tensor)
    return {value: scope(members, measurements) for value, members in groups.items()}


def layer_of(tensor: TensorMeasurement) -> int | None:
    return tensor.info.layer


def family_of(tensor: TensorMeasurement) -> str:
    return tensor.info.family


def tensor_row(tensor: TensorMeasurement, measurements: Measurements) -> dict:
    """One tensor's scope, with its name, layer, family and shape."""
    return {"name": tensor.info.name, "layer": tensor.info.layer,
            "family": tensor.info.family, "shape": list(tensor.info.shape),
            **scope([tensor], measurements)}


def build_tables(measurements: Measurements) -> dict:
    """The whole report's numbers: model, per layer (sorted), per family, per tensor."""
    by_layer = grouped(measurements, layer_of)
    return {
        "model": scope(measurements.tensors, measurements),
        "layers": {str(k): by_layer[k] for k in sorted(by_layer)},
        "families": grouped(measurements, family_of),
        "tensors": [tensor_row(t, measurements) for t in measurements.tensors],
    }
