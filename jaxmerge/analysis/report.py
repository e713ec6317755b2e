"""Writes a diagnostics report: report.json, CSV tables, PNG plots and an index.html.

The directory is written atomically (a hidden sibling renamed at the end), like a
merge output, and holds:

- ``report.json``: inputs, settings, the verdict, and every table (model, layers,
  families, tensors);
- ``tensors.csv``, ``layers.csv``, ``families.csv``: the same numbers, one row
  per tensor / layer / module family;
- ``sparsity.png``, ``regions.png``, ``cosine.png``, ``spectral.png``,
  ``head_residual.png`` (unless plots are off);
- ``index.html``: the verdict, the headline table and the plots; a static page
  that opens from the file system.
"""

from __future__ import annotations

import csv
import html
import json
import math
import pathlib

from jaxmerge.analysis import plots as plotting
from jaxmerge.analysis.streaming import Measurements
from jaxmerge.analysis.tables import REGIONS, build_tables
from jaxmerge.analysis.verdict import verdict as make_verdict
from jaxmerge.io import hf
from jaxmerge.version import __version__

PLOTS = ("sparsity", "regions", "cosine", "spectral", "head_residual")


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def flatten_scope(scope: dict, num_experts: int) -> dict:
    """One CSV row: a scope's numbers as flat columns (e1 = expert 1, 1-2 = a pair)."""
    row = {"tensors": scope["tensors"], "entries": scope["entries"]}
    for e in range(num_experts):
        row[f"sparsity_e{e + 1}"] = scope["sparsity"][e]
        row[f"norm_e{e + 1}"] = scope["task_vector_norm"][e]
        row[f"private_share_e{e + 1}"] = scope["private_share"][e]
    for region in REGIONS:
        row[f"{region}_all"] = scope["regions"][region]
    for pair, value in scope["cosine"].items():
        row[f"cos_{pair}"] = value
        for region in REGIONS:
            row[f"{region}_{pair}"] = scope["pair_regions"][pair][region]
    spectral = scope.get("spectral")
    if spectral:
        row["matrices"] = spectral["matrices"]
        for e, expert in enumerate(spectral["experts"]):
            for key, value in expert.items():
                if key != "matrices":
                    row[f"{key}_e{e + 1}"] = value
        geometry = spectral["geometry"]
        for key, value in geometry.items():
            if isinstance(value, dict):
                for pair, pair_value in value.items():
                    row[f"{key}_{pair}"] = pair_value
            else:
                row[key] = value
    return row


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def write_tables(directory: pathlib.Path, tables: dict, num_experts: int) -> list[str]:
    tensor_rows = [{"name": t["name"], "layer": "" if t["layer"] is None else t["layer"],
                    "family": t["family"], "shape": "x".join(map(str, t["shape"])),
                    **flatten_scope(t, num_experts)} for t in tables["tensors"]]
    layer_rows = [{"layer": layer, **flatten_scope(scope, num_experts)}
                  for layer, scope in tables["layers"].items()]
    family_rows = [{"family": family, **flatten_scope(scope, num_experts)}
                   for family, scope in tables["families"].items()]
    _write_csv(directory / "tensors.csv", tensor_rows)
    _write_csv(directory / "layers.csv", layer_rows)
    _write_csv(directory / "families.csv", family_rows)
    return ["tensors.csv", "layers.csv", "families.csv"]


def write_plots(directory: pathlib.Path, measurements: Measurements, tables: dict) -> list[str]:
    n = measurements.num_experts
    matrices = [t for t in measurements.tensors if t.spectral is not None]
    spectra = [{"energy_top1": t.spectral["before"]["energy_share"][:, 0],
                "zero": [t.update["gram"][e, e] <= 0 for e in range(n)]} for t in matrices]
    geometry = [{"head_cos": t.spectral["head_cos"], "residual_cos": t.spectral["residual_cos"]}
                for t in matrices if float(t.update["gram"].trace()) > 0]
    files = [plotting.plot_sparsity(tables, n, directory / "sparsity.png"),
             plotting.plot_regions(tables, n, directory / "regions.png"),
             plotting.plot_cosine(tables, n, directory / "cosine.png")]
    if matrices:
        files.append(plotting.plot_spectral(tables, n, directory / "spectral.png", spectra))
        files.append(plotting.plot_head_residual(tables, n, directory / "head_residual.png",
                                                 geometry, measurements.settings["head_rank"]))
    return files


def _percent(value) -> str:
    """12.3% / 0.042% (small values keep two significant digits) / – for None."""
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 0.01:
        return f"{100 * value:.1f}%"
    return f"{100 * value:.2g}%"


def _number(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def headline_rows(tables: dict, num_experts: int) -> list[tuple[str, list[str]]]:
    """(label, one cell per expert or pair) rows of the terminal and HTML summary."""
    model = tables["model"]
    rows = [("update sparsity", [_percent(v) for v in model["sparsity"]]),
            ("own (private) share of updates", [_percent(v) for v in model["private_share"]]),
            ("‖τ‖", [_number(v, 3) for v in model["task_vector_norm"]])]
    spectral = model["spectral"]
    if spectral:
        experts = spectral["experts"]
        rows += [
            ("top-1 energy share", [_percent(e.get("energy_top1")) for e in experts]),
            ("  × i.i.d. noise", [_number(e["top1_vs_noise"], 1) for e in experts]),
            ("stable rank → head removed",
             [f"{_number(e['stable_rank_before'], 1)} → {_number(e['stable_rank_after'], 1)}"
              for e in experts]),
            ("effective rank → head removed",
             [f"{_number(e['effective_rank_before'], 0)} → "
              f"{_number(e['effective_rank_after'], 0)}" for e in experts]),
        ]
    return rows


def pair_rows(tables: dict) -> list[tuple[str, list[str]]]:
    model = tables["model"]
    pairs = list(model["cosine"])
    if not pairs:
        return []
    rows = [("cosine (whole model)", [f"{model['cosine'][p]:+.3f}" for p in pairs])]
    for region in ("conflict", "overlap", "private"):
        rows.append((f"{region} entries", [_percent(model["pair_regions"][p][region])
                                           for p in pairs]))
    spectral = model["spectral"]
    if spectral:
        geometry = spectral["geometry"]
        rows.append(("head cosine (mean over matrices)",
                     [_number(geometry["head_cos"][p]) for p in pairs]))
        rows.append(("residual cosine (mean)",
                     [_number(geometry["residual_cos"][p]) for p in pairs]))
    return rows


def _table_text(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    width = max([len(header[0])] + [len(label) for label, _ in rows])
    cells = [max([len(h)] + [len(r[1][i]) for r in rows]) for i, h in enumerate(header[1:])]
    lines = ["  ".join([header[0].ljust(width)] + [h.rjust(c) for h, c in
                                                     zip(header[1:], cells)])]
    for label, values in rows:
        lines.append("  ".join([label.ljust(width)] + [v.rjust(c) for v, c in
                                                          zip(values, cells)]))
    return lines


def summary_text(report: dict) -> str:
    """The one-screen terminal summary."""
    tables, verdict, n = report["tables"], report["verdict"], len(report["experts"])
    lines = [f"jaxmerge analyze: {n} expert(s) against {report['base']}"]
    for e, path in enumerate(report["experts"]):
        lines.append(f"  expert {e + 1}: {path}")
    lines.append("")
    lines += _table_text(["per expert"] + [f"expert {e + 1}" for e in range(n)],
                         headline_rows(tables, n))
    pairs = pair_rows(tables)
    if pairs:
        lines.append("")
        lines += _table_text(["per pair"] + [f"experts {p}" for p in tables["model"]["cosine"]],
                             pairs)
    lines += ["", f"regime: {verdict['regime']}; task vectors {verdict['alignment']}; spectrum "
              f"{verdict['concentration']}"]
    lines += [f"  - {reason}" for reason in verdict["reasons"]]
    if verdict["recommended"]:
        lines.append("favoured methods: " + ", ".join(verdict["recommended"]))
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr><td>" + html.escape(label) + "</td>" + "".join(
        f"<td>{html.escape(v)}</td>" for v in values) + "</tr>" for label, values in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PLOT_CAPTIONS = {
    "sparsity.png": "Update sparsity per layer and module family (SAR-Merging Fig. 2).",
    "regions.png": "Conflict / agreeing overlap / private / unchanged entries (SAR-Merging "
                   "Fig. 6–7).",
    "cosine.png": "Layer-wise cosine of task vectors (SAR-Merging Fig. 3).",
    "spectral.png": "Spectral concentration and ranks before/after removing the head "
                    "(ResMerge Fig. 4).",
    "head_residual.png": "Head/residual geometry: c_R vs S_H, mean retention, pairwise cosines "
                         "(ResMerge Fig. 5, 7).",
}


def index_html(report: dict, files: list[str]) -> str:
    tables, verdict, n = report["tables"], report["verdict"], len(report["experts"])
    experts = "".join(f"<li>expert {e + 1}: <code>{html.escape(p)}</code></li>"
                      for e, p in enumerate(report["experts"]))
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in verdict["reasons"])
    pairs = pair_rows(tables)
    pair_table = _html_table(["per pair"] + [f"experts {p}" for p in tables["model"]["cosine"]],
                             pairs) if pairs else ""
    figures = "".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(f)}">'
        f"<figcaption>{html.escape(PLOT_CAPTIONS.get(f, f))}</figcaption></figure>"
        for f in files if f.endswith(".png"))
    links = " · ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>'
                       for f in ["report.json", *[f for f in files if f.endswith(".csv")]])
    recommended = ", ".join(verdict["recommended"]) or "–"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>jaxmerge analyze</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
.verdict {{ background: #f4f8fc; padding: 0.5em 1.5em; border-left: 4px solid #4c9be8; }}
</style></head><body>
<h1>Task-vector diagnostics</h1>
<p>Base <code>{html.escape(report['base'])}</code>, {n} expert(s):</p><ul>{experts}</ul>
<div class="verdict"><h2>Regime: {html.escape(verdict['regime'])}</h2>
<p>Task vectors {html.escape(verdict['alignment'])}; spectrum
{html.escape(verdict['concentration'])}. Favoured methods: <b>{html.escape(recommended)}</b></p>
<ul>{reasons}</ul></div>
{_html_table(["per expert"] + [f"expert {e + 1}" for e in range(n)], headline_rows(tables, n))}
{pair_table}
{figures}
<p>Data: {links}. Settings: <code>{html.escape(json.dumps(report['settings']))}</code>;
jaxmerge {html.escape(report['jaxmerge_version'])}.</p>
</body></html>
"""


def build_report(measurements: Measurements, registry=None) -> dict:
    """The report.json content (tables + verdict) of some measurements.

    ``registry``: method names the verdict may recommend (default: the built-in ones).
    """
    from jaxmerge import methods

    tables = build_tables(measurements)
    registry = methods.REGISTRY if registry is None else registry
    return _clean({
        "jaxmerge_version": __version__,
        "base": measurements.base,
        "experts": measurements.experts,
        "settings": measurements.settings,
        "seconds": round(measurements.seconds, 3),
        "bytes_read": measurements.bytes_read,
        "verdict": make_verdict(tables, measurements.num_experts, registry),
        "tables": tables,
    })


def write_report(measurements: Measurements, output, *, plots: bool = True,
                 overwrite: bool = False, registry=None) -> dict:
    """Writes the report directory atomically; returns the report dict (with ``files``)."""
    output = pathlib.Path(output)
    report = build_report(measurements, registry)
    with hf.atomic_output(output, overwrite) as staging:
        files = write_tables(staging, report["tables"], measurements.num_experts)
        if plots:
            files = write_plots(staging, measurements, report["tables"]) + files
        report["files"] = ["report.json", *files, "index.html"]
        (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (staging / "index.html").write_text(index_html(report, files))
    return report
