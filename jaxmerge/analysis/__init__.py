"""Diagnostics of task vectors: the measurements the RL-merging papers use to explain
why merges fail, computed streaming with the merge executor.

    from jaxmerge import analysis

    measured = analysis.measure_checkpoints("base", ["math", "code"])
    report = analysis.write_report(measured, "report-dir")   # json, csv, png, index.html
    print(analysis.summary_text(report))

Per-tensor statistics live in :mod:`.statistics` (pure jnp, one leaf's stacked task
vectors in), their aggregation per layer / family / model in :mod:`.tables`, the
regime verdict in :mod:`.verdict`, files in :mod:`.report` and figures in :mod:`.plots`.
"""

from jaxmerge.analysis.report import build_report, summary_text, write_report
from jaxmerge.analysis.statistics import (
    ENERGY_RANKS,
    REGIONS,
    UPDATE_EPS,
    cosines,
    mean_retention,
    pair_indices,
    region_stats,
    spectral_statistics,
    spectrum_summary,
    update_statistics,
)
from jaxmerge.analysis.streaming import (
    Measurements,
    TensorMeasurement,
    measure,
    measure_checkpoints,
    measure_sources,
    spectral_pass,
    update_pass,
)
from jaxmerge.analysis.tables import build_tables
from jaxmerge.analysis.verdict import verdict

__all__ = [
    "ENERGY_RANKS",
    "REGIONS",
    "UPDATE_EPS",
    "Measurements",
    "TensorMeasurement",
    "build_report",
    "build_tables",
    "cosines",
    "mean_retention",
    "measure",
    "measure_checkpoints",
    "measure_sources",
    "pair_indices",
    "region_stats",
    "spectral_pass",
    "spectral_statistics",
    "spectrum_summary",
    "summary_text",
    "update_pass",
    "update_statistics",
    "verdict",
    "write_report",
]
