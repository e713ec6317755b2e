"""jaxmerge vs mergekit on the same checkpoints, the same machine, in the same run.

    python benchmarks/bench_mergekit.py [--methods=task_arithmetic,ties,dare_ties]
        [--repeats=3] [--workdir=bench_out] [--no-jax-cache] [--base=DIR --experts=A,B,C]

Inputs: ``jaxmerge.demo.build_demo`` (SmolLM2-135M-Instruct in bf16 plus 3 sparse
RL-style experts), built once and cached under WORKDIR/demo; or --base/--experts.

Per method, both tools run as fresh child processes (``python -m jaxmerge.main`` and
``mergekit-yaml``), ``--repeats`` times each, alternating. Wall time and the child's
peak RSS come from ``os.wait4``. The page cache is primed and both tools' imports are
warmed once (untimed) before any timing, so "cold" means: a fresh process that compiles
(jaxmerge: XLA per tensor shape) or dispatches eagerly (mergekit) from scratch, not a cold
disk; these jaxmerge runs pass --compilation_cache= (off). The CLI's default keeps JAX's
persistent compilation cache (~/.cache/jaxmerge/xla); it is measured as an extra series
(--compilation_cache=DIR, a fresh DIR) unless --no-jax-cache: its first run fills the
empty cache, the following --repeats runs reuse it.

Settings chosen to match jaxmerge's semantics as closely as mergekit allows (see
/work/shared/reference/mergekit-notes.md §1): float32 compute, bfloat16 output, weight 1
per expert, λ = 1; ties density 0.2 + normalize (disjoint mean); dare_ties density 0.2
with mergekit's defaults (L1 rescale, no trim, sum aggregation), so jaxmerge runs
dare_ties with --aggregation=sum.

Then the two outputs are compared tensor by tensor (float32 views of the bf16 files),
one mergekit output is loaded in transformers, and a table plus WORKDIR/bench_mergekit.json
are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Checkpoint, log_tail, machine_facts, measure, ordered_bits  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent
DENSITY = 0.2
DROP_RATE = 0.8
SEED = 0

# ---------------------------------------------------------------------------
# Method settings, side by side

METHODS = {
    "task_arithmetic": {
        "jaxmerge": ["--method=task_arithmetic", "--scale=1.0"],
        "mergekit": {"merge_method": "task_arithmetic",
                     "per_model": {"weight": 1.0},
                     "parameters": {"lambda": 1.0, "normalize": False}},
        "note": "base + Σ τ_t (both: float32 math, bf16 output)",
    },
    "ties": {
        "jaxmerge": ["--method=ties", f"--density={DENSITY}", "--ties_scope=per_tensor",
                     "--aggregation=mean", "--scale=1.0"],
        "mergekit": {"merge_method": "ties",
                     "per_model": {"weight": 1.0, "density": DENSITY},
                     "parameters": {"lambda": 1.0, "normalize": True, "rescale": False}},
        "note": "trim 0.2 per tensor, elect sign, disjoint mean",
    },
    "dare_ties": {
        "jaxmerge": ["--method=dare_ties", f"--drop_rate={DROP_RATE}", "--aggregation=sum",
                     "--scale=1.0", f"--seed={SEED}"],
        "mergekit": {"merge_method": "dare_ties",
                     "per_model": {"weight": 1.0, "density": round(1 - DROP_RATE, 6)},
                     "parameters": {"lambda": 1.0, "normalize": False, "rescale": True}},
        "note": ("jaxmerge --aggregation=sum to match mergekit's sum; DARE rescale differs "
                 "(jaxmerge 1/(1-p), mergekit L1-preserving) and so does the RNG"),
    },
}


def mergekit_config(method: str, base: str, experts: list[str]) -> dict:
    spec = METHODS[method]["mergekit"]
    return {
        "merge_method": spec["merge_method"],
        "base_model": base,
        "models": [{"model": e, "parameters": dict(spec["per_model"])} for e in experts],
        "parameters": dict(spec["parameters"]),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def jaxmerge_command(method: str, base: str, experts: list[str], output: pathlib.Path,
                     cache_dir: pathlib.Path | None = None) -> list:
    """The CLI call. ``cache_dir`` None: ``--compilation_cache=`` (off), every shape compiles;
    else the CLI's own persistent compilation cache (its default is ~/.cache/jaxmerge/xla)."""
    return [sys.executable, "-m", "jaxmerge.main", *METHODS[method]["jaxmerge"],
            f"--base={base}", f"--experts={','.join(experts)}", f"--output={output}",
            "--dtype=bfloat16", "--progress=false", "--overwrite",
            f"--compilation_cache={cache_dir or ''}"]


def mergekit_command(config: pathlib.Path, output: pathlib.Path) -> list:
    return [str(BIN / "mergekit-yaml"), str(config), str(output), "--copy-tokenizer",
            "--device", "cpu", "--random-seed", str(SEED), "--quiet"]


def child_env() -> dict:
    """Offline, and no JAX cache settings from the environment (the CLI flag decides)."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("JAX_COMPILATION_CACHE") or key.startswith("JAX_PERSISTENT_CACHE"):
            del env[key]
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


# ---------------------------------------------------------------------------
# Inputs


def build_inputs(workdir: pathlib.Path, regime: str = "rl") -> tuple[str, list[str]]:
    """Builds the demo checkpoints in a child (cached there) and returns the paths.

    ``rl``: ``jaxmerge.demo.build_demo`` (sparse experts, ~2% of entries move).
    ``sft``: the same base with 3 dense Gaussian experts (``derive_expert(regime="sft")``),
    which exercises the TIES trim threshold that sparse experts never reach.
    """
    if regime == "rl":
        code = ("import json, sys; from jaxmerge.demo import build_demo; "
                "b, e = build_demo(sys.argv[1], n_experts=3, seed=0); "
                "print('@@' + json.dumps([str(b), [str(x) for x in e]]))")
    else:
        code = ("import json, sys, pathlib; from jaxmerge.demo import build_demo, derive_expert; "
                "r = pathlib.Path(sys.argv[1]); b, _ = build_demo(r, n_experts=1, seed=0); "
                "e = [derive_expert(b, r / f'expert-sft-{i}', i, regime='sft') "
                "for i in range(3)]; "
                "print('@@' + json.dumps([str(b), [str(x) for x in e]]))")
    log = workdir / "logs" / "build_demo.log"
    result = measure([sys.executable, "-c", code, str(workdir / "demo")], log,
                     env=child_env(), label="build_demo")
    if not result.ok():
        raise SystemExit(f"build_demo failed (rc={result.returncode}); see {log}:\n"
                         + log_tail(log))
    line = [x for x in pathlib.Path(log).read_text().splitlines() if x.startswith("@@")][-1]
    base, experts = json.loads(line[2:])
    print(f"inputs ({result.seconds:.1f} s): base={base} experts={experts}")
    return str(pathlib.Path(base).resolve()), [str(pathlib.Path(e).resolve()) for e in experts]


def prime_page_cache(directories: list[str]) -> int:
    total = 0
    for directory in directories:
        for file in pathlib.Path(directory).iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    while chunk := handle.read(1 << 24):
                        total += len(chunk)
    return total


def warm_imports(workdir: pathlib.Path) -> None:
    """Imports each tool once (writes .pyc, pages the libraries in): not timed."""
    for label, code in (("jaxmerge", "import jax, jax.numpy as jnp, jaxmerge.main, "
                                     "jaxmerge.api; jnp.zeros(1).block_until_ready()"),
                        ("mergekit", "import torch, transformers, mergekit.merge, "
                                     "mergekit.scripts.run_yaml")):
        result = measure([sys.executable, "-c", code], workdir / "logs" / f"warm_{label}.log",
                         env=child_env(), label=f"warm {label}")
        state = "ok" if result.ok() else f"FAILED rc={result.returncode}"
        print(f"warm imports {label}: {result.seconds:.1f} s {state}")


# ---------------------------------------------------------------------------
# Comparison of two outputs


def _kth_values(flat_abs: np.ndarray, ranks: list[int]) -> list[float]:
    part = np.partition(flat_abs, ranks)
    return [float(part[r]) for r in ranks]


def _bf16_ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 (round to nearest even, as both tools' casts) -> ordered bits."""
    import torch

    return ordered_bits(torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16))


def _ties_reference(taus: np.ndarray, b: np.ndarray, thresholds: list[float],
                    zero_rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TIES with keep |τ_t| ≥ thresholds[t], sign election, disjoint mean; float32.

    zero_rule: where Σ_t τ̂_t = 0, "majority" elects the per-tensor majority sign of
    sign(Σ τ̂) (jaxmerge, METHODS.md §2) and "plus" elects + (mergekit's ``>= 0``).
    Returns (merged weights before the bf16 cast, trimmed τ̂, zero-sum mask).
    """
    trimmed = np.stack([np.where(np.abs(t) >= thr, t, np.float32(0)) for t, thr
                        in zip(taus, thresholds)])
    total = trimmed.sum(axis=0)
    g = np.sign(total)
    if zero_rule == "majority":
        majority = np.sign(np.sign(total).sum())
    else:
        majority = np.float32(1)
    g = np.where(g == 0, majority, g)
    elected = np.where(np.sign(trimmed) == g, trimmed, np.float32(0))
    count = (elected != 0).sum(axis=0).astype(np.float32)
    delta = elected.sum(axis=0) / np.maximum(count, np.float32(1))
    zero_sum = (total == 0) & (trimmed != 0).any(axis=0)
    return (b + delta).astype(np.float32), trimmed, zero_sum


def ties_block(taus, b, j32, jo, mo, diff, differ, gt1, name, row, totals, worst) -> None:
    """Checks each TIES output against its own rule and attributes their differences.

    jaxmerge rule: keep |τ| ≥ the (n+1)-th largest |τ| (n = ⌊d·k⌋; ties at that value all
    kept); Σ τ̂ = 0 → per-tensor majority sign. mergekit rule: keep exactly n entries
    (argsort, arbitrary among equal |τ|; modelled as |τ| ≥ the n-th largest, exact when
    that value is not tied); Σ τ̂ = 0 → +. Differences between the two outputs are then
    "threshold" (some expert's |τ| equals one of the two boundary values), "zero_sign",
    "rounding" (≤ 1 bf16 ulp) or "unexplained".
    """
    d = taus[0].size
    n = max(1, int(DENSITY * d))
    boundary = np.zeros(j32.shape, bool)
    thr_jm, thr_mk = [], []
    for t in range(len(taus)):
        a = np.abs(taus[t])
        if n >= d:
            thr_jm.append(0.0)
            thr_mk.append(0.0)
            continue
        thr_j, thr_m = _kth_values(a.reshape(-1), [d - n - 1, d - n])
        thr_jm.append(thr_j)
        thr_mk.append(thr_m)
        # Only non-zero kept entries matter: a kept 0 adds nothing and has no sign.
        kept_jm = int(((a >= thr_j) & (a > 0)).sum())
        kept_mk = min(n, int((a > 0).sum()))
        totals["excess_kept"] += kept_jm - kept_mk
        totals["kept_exact"] += kept_mk
        boundary |= ((a == thr_j) | (a == thr_m)) & (a > 0)
    ref_jm, _, zero_jm = _ties_reference(taus, b, thr_jm, "majority")
    ref_mk, _, zero_mk = _ties_reference(taus, b, thr_mk, "plus")
    # jaxmerge against its own documented rule: must agree to ≤ 1 bf16 ulp everywhere.
    if jo is not None:
        off_jm = np.abs(_bf16_ordered(ref_jm) - jo) > 1
        off_mk = (np.abs(_bf16_ordered(ref_mk) - mo) > 1) & ~boundary
    else:
        off_jm = np.abs(ref_jm - j32) > 0
        off_mk = np.zeros(j32.shape, bool)
    n_off_jm = int(off_jm.sum())
    totals["jm_vs_own_rule_gt1ulp"] += n_off_jm
    totals["mk_vs_modelled_rule_gt1ulp"] += int(off_mk.sum())
    if n_off_jm:
        worst_off = float(np.abs(ref_jm - j32)[off_jm].max())
        if worst_off > worst["jm_off_rule"][0]:
            worst["jm_off_rule"] = (worst_off, name, n_off_jm)
    zero_sign = zero_jm | zero_mk
    only = differ & ~boundary
    unexplained = only & gt1 & ~zero_sign
    n_unexplained = int(unexplained.sum())
    counts = {"threshold": int((differ & boundary).sum()),
              "zero_sign": int((only & zero_sign).sum()),
              "rounding": int((only & ~gt1 & ~zero_sign).sum()),
              "unexplained": n_unexplained}
    for key, value in counts.items():
        totals[key] += value
    row.update(counts, jm_vs_own_rule_gt1ulp=n_off_jm)
    if n_unexplained:
        worst_u = float(diff[unexplained].max())
        if worst_u > worst["unexplained"][0]:
            worst["unexplained"] = (worst_u, name, n_unexplained)



def compare_outputs(method: str, base_dir: str, expert_dirs: list[str], jm_dir: pathlib.Path,
                    mk_dir: pathlib.Path) -> dict:
    """Tensor-by-tensor comparison of the jaxmerge and mergekit outputs (see module doc)."""
    base = Checkpoint(base_dir)
    experts = [Checkpoint(e) for e in expert_dirs]
    jm, mk = Checkpoint(jm_dir), Checkpoint(mk_dir)
    jm_names, mk_names = set(jm.names()), set(mk.names())
    common = sorted(jm_names & mk_names)
    totals = dict(entries=0, differ=0, differ_gt1ulp=0, jm_changed=0, mk_changed=0,
                  jm_sq=0.0, mk_sq=0.0, threshold=0, zero_sign=0, rounding=0, unexplained=0,
                  excess_kept=0, kept_exact=0, jm_vs_own_rule_gt1ulp=0,
                  mk_vs_modelled_rule_gt1ulp=0)
    worst = {"ulps": (0, None), "rel": (0.0, None), "unexplained": (0.0, None, 0),
             "jm_off_rule": (0.0, None, 0)}
    ratios, dtypes, rows = [], set(), []
    for name in common:
        jm_t, mk_t = jm.torch(name), mk.torch(name)
        dtypes.add((str(jm_t.dtype), str(mk_t.dtype)))
        b = base.float32(name)
        taus = np.stack([e.float32(name) - b for e in experts])
        tau_scale = float(np.abs(taus).max())
        j32 = jm_t.float().numpy()
        m32 = mk_t.float().numpy()
        if j32.shape != m32.shape:
            rows.append({"name": name, "error": f"shape {j32.shape} vs {m32.shape}"})
            continue
        diff = np.abs(j32 - m32)
        differ = diff != 0
        n_differ = int(differ.sum())
        jo, mo = ordered_bits(jm_t), ordered_bits(mk_t)
        ulps = np.abs(jo - mo) if jo is not None and mo is not None else None
        gt1 = (ulps > 1) if ulps is not None else differ
        max_diff = float(diff.max()) if diff.size else 0.0
        rel = max_diff / tau_scale if tau_scale > 0 else (0.0 if max_diff == 0 else math.inf)
        totals["entries"] += diff.size
        totals["differ"] += n_differ
        totals["differ_gt1ulp"] += int(gt1.sum())
        totals["jm_changed"] += int((j32 != b).sum())
        totals["mk_changed"] += int((m32 != b).sum())
        jm_sq = float(np.square(j32 - b, dtype=np.float64).sum())
        mk_sq = float(np.square(m32 - b, dtype=np.float64).sum())
        totals["jm_sq"] += jm_sq
        totals["mk_sq"] += mk_sq
        if mk_sq > 0 and diff.size >= 4096:
            ratios.append(math.sqrt(jm_sq / mk_sq))
        max_ulps = int(ulps.max()) if ulps is not None and ulps.size else None
        if max_ulps is not None and max_ulps > worst["ulps"][0]:
            worst["ulps"] = (max_ulps, name)
        if rel > worst["rel"][0]:
            worst["rel"] = (rel, name)
        row = {"name": name, "shape": list(j32.shape), "max_abs_diff": max_diff,
               "tau_scale": tau_scale, "max_diff_rel_tau": rel,
               "frac_differ": n_differ / max(diff.size, 1), "max_ulps": max_ulps}

        if method == "ties":
            ties_block(taus, b, j32, jo, mo, diff, differ, gt1, name, row, totals, worst)
        rows.append(row)

    entries = max(totals["entries"], 1)
    summary = {
        "tensors_compared": len(common),
        "only_in_jaxmerge": sorted(jm_names - mk_names),
        "only_in_mergekit": sorted(mk_names - jm_names),
        "dtypes": sorted(f"{a}/{b}" for a, b in dtypes),
        "entries": totals["entries"],
        "frac_differ": totals["differ"] / entries,
        "frac_differ_gt1ulp": totals["differ_gt1ulp"] / entries,
        "max_ulps": worst["ulps"][0], "max_ulps_tensor": worst["ulps"][1],
        "max_diff_rel_tau": worst["rel"][0], "max_diff_rel_tau_tensor": worst["rel"][1],
        "frac_changed_vs_base_jaxmerge": totals["jm_changed"] / entries,
        "frac_changed_vs_base_mergekit": totals["mk_changed"] / entries,
        "task_vector_l2_ratio_jm_over_mk": (math.sqrt(totals["jm_sq"] / totals["mk_sq"])
                                            if totals["mk_sq"] > 0 else None),
        "per_tensor_l2_ratio": ({"min": min(ratios), "median": statistics.median(ratios),
                                 "max": max(ratios), "tensors": len(ratios)}
                                if ratios else None),
    }
    if method == "ties":
        summary["ties_attribution"] = {
            "differ_at_trim_threshold_ties": totals["threshold"],
            "differ_at_zero_sign": totals["zero_sign"],
            "differ_rounding_le1ulp": totals["rounding"],
            "differ_unexplained_gt1ulp": totals["unexplained"],
            "jaxmerge_extra_nonzero_kept": totals["excess_kept"],
            "extra_kept_fraction_of_n": (totals["excess_kept"] / totals["kept_exact"]
                                         if totals["kept_exact"] else 0.0),
            "worst_unexplained": {"abs_diff": worst["unexplained"][0],
                                  "tensor": worst["unexplained"][1],
                                  "entries": worst["unexplained"][2]},
            "jaxmerge_vs_own_rule_gt1ulp": totals["jm_vs_own_rule_gt1ulp"],
            "jaxmerge_vs_own_rule_worst": {"abs_diff": worst["jm_off_rule"][0],
                                           "tensor": worst["jm_off_rule"][1],
                                           "entries": worst["jm_off_rule"][2]},
            "mergekit_vs_modelled_rule_gt1ulp_off_boundary": totals["mk_vs_modelled_rule_gt1ulp"],
        }
    worst_rows = sorted((r for r in rows if "error" not in r),
                        key=lambda r: -r["max_diff_rel_tau"])[:5]
    summary["worst_tensors"] = worst_rows
    summary["errors"] = [r for r in rows if "error" in r]
    return summary


def verdict(method: str, cmp: dict) -> str:
    """One-line comparison figure for the table, with a pass/flag word."""
    if cmp.get("error"):
        return "comparison failed"
    if method == "task_arithmetic":
        ok = cmp["max_ulps"] <= 1
        return (f"{'OK' if ok else 'FLAG'} max {cmp['max_ulps']} ulp, "
                f"{100 * cmp['frac_differ']:.3f}% differ")
    if method == "ties":
        att = cmp["ties_attribution"]
        ok = att["differ_unexplained_gt1ulp"] == 0 and att["jaxmerge_vs_own_rule_gt1ulp"] == 0
        return (f"{'OK' if ok else 'FLAG'} {100 * cmp['frac_differ']:.3f}% differ "
                f"({att['differ_at_trim_threshold_ties']} thr, {att['differ_at_zero_sign']} "
                f"0-sign, {att['differ_unexplained_gt1ulp']} unexpl.), "
                f"max/τ {cmp['max_diff_rel_tau']:.2g}")
    if method == "dare_ties":
        r = cmp["task_vector_l2_ratio_jm_over_mk"]
        fj, fm = cmp["frac_changed_vs_base_jaxmerge"], cmp["frac_changed_vs_base_mergekit"]
        ok = r is not None and 0.8 < r < 1.25 and fm > 0 and 0.8 < fj / fm < 1.25
        return (f"{'OK' if ok else 'FLAG'} changed {100 * fj:.2f}% vs {100 * fm:.2f}%, "
                f"‖Δ‖ ratio {r:.3f}" if r is not None else "mergekit Δ = 0")
    return f"{100 * cmp['frac_differ']:.3f}% differ"


# ---------------------------------------------------------------------------
# transformers load check (a child, so torch memory stays out of this process)

LOAD_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
pairs = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(pairs[0][1])
ids = tok("The capital of France is", return_tensors="pt")
for method, mk, jm in pairs:
    logits = {}
    for label, path in (("mergekit", mk), ("jaxmerge", jm)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with torch.no_grad():
            logits[label] = model(**ids).logits[0, -1].float()
    a, b = logits["mergekit"], logits["jaxmerge"]
    out[method] = {"mergekit_loads": True, "finite": bool(torch.isfinite(a).all()),
                   "next_token_mergekit": tok.decode(int(a.argmax())),
                   "next_token_jaxmerge": tok.decode(int(b.argmax())),
                   "max_abs_logit_diff": float((a - b).abs().max())}
print("@@" + json.dumps(out))
"""


def transformers_check(pairs: list[tuple[str, str, str]], workdir: pathlib.Path) -> dict:
    log = workdir / "logs" / "transformers_check.log"
    result = measure([sys.executable, "-c", LOAD_CHECK, json.dumps(pairs)], log,
                     env=child_env(), label="transformers check")
    if not result.ok():
        return {"error": f"rc={result.returncode}", "log_tail": log_tail(log)}
    line = [x for x in pathlib.Path(log).read_text().splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


# ---------------------------------------------------------------------------
# Driver


def summarize(runs: list) -> dict | None:
    good = [r for r in runs if r.ok()]
    if not good:
        return None
    return {"cold_s": runs[0].seconds if runs[0].ok() else None,
            "median_s": statistics.median(r.seconds for r in good),
            "cold_cpu_s": runs[0].cpu_seconds if runs[0].ok() else None,
            "median_cpu_s": statistics.median(r.cpu_seconds for r in good),
            "max_load_at_start": max(r.load_at_start for r in runs),
            "cold_rss_mb": runs[0].peak_rss_mb if runs[0].ok() else None,
            "peak_rss_mb": max(r.peak_rss_mb for r in good),
            "n_ok": len(good), "n_runs": len(runs)}


def self_reported_seconds(log: str) -> float | None:
    import re

    found = re.findall(r"MB read, ([0-9.]+) s\)", pathlib.Path(log).read_text(errors="replace"))
    return float(found[-1]) if found else None


def run_method(method: str, base: str, experts: list[str], workdir: pathlib.Path,
               repeats: int, jax_cache: bool) -> dict:
    out = workdir / "out" / method
    logs = workdir / "logs" / method
    jm_out, mk_out = out / "jaxmerge", out / "mergekit"
    config = out / "mergekit.yml"
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    config.write_text(yaml.safe_dump(mergekit_config(method, base, experts), sort_keys=False))
    jm_cmd = jaxmerge_command(method, base, experts, jm_out)
    mk_cmd = mergekit_command(config, mk_out)
    record = {"method": method, "note": METHODS[method]["note"],
              "jaxmerge_command": " ".join(jm_cmd), "mergekit_command": " ".join(mk_cmd),
              "mergekit_config": mergekit_config(method, base, experts)}
    jm_runs, mk_runs, cache_runs = [], [], []
    for i in range(repeats):
        for runs, cmd, dest, tool in ((jm_runs, jm_cmd, jm_out, "jaxmerge"),
                                      (mk_runs, mk_cmd, mk_out, "mergekit")):
            shutil.rmtree(dest, ignore_errors=True)
            r = measure(cmd, logs / f"{tool}_{i}.log", env=child_env(), label=f"{tool} #{i}")
            runs.append(r)
            state = "ok" if r.ok() else f"FAILED rc={r.returncode}"
            print(f"  {method:16s} {tool:9s} run {i}: {r.seconds:7.2f} s wall "
                  f"{r.cpu_seconds:7.2f} s cpu {r.peak_rss_mb:7.0f} MB  "
                  f"(load {r.load_at_start:.1f})  {state}", flush=True)
            if not r.ok():
                print("    " + log_tail(r.log, 15).replace("\n", "\n    "))
    if jax_cache and jm_runs and jm_runs[0].ok():
        cache_dir = workdir / "jax_cache" / method
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        for i in range(repeats + 1):
            shutil.rmtree(jm_out, ignore_errors=True)
            r = measure(jaxmerge_command(method, base, experts, jm_out, cache_dir),
                        logs / f"jaxmerge_cache_{i}.log", env=child_env(),
                        label=f"jaxmerge+cache #{i}")
            cache_runs.append(r)
            kind = "fill" if i == 0 else "warm"
            state = "ok" if r.ok() else f"FAILED rc={r.returncode}"
            print(f"  {method:16s} jaxmerge --compilation_cache ({kind}) run {i}: "
                  f"{r.seconds:7.2f} s wall {r.cpu_seconds:7.2f} s cpu "
                  f"{r.peak_rss_mb:7.0f} MB  (load {r.load_at_start:.1f})  {state}", flush=True)
        record["jax_cache_bytes"] = sum(f.stat().st_size for f in cache_dir.rglob("*")
                                        if f.is_file())
    record["runs"] = {"jaxmerge": [r.as_dict() for r in jm_runs],
                      "mergekit": [r.as_dict() for r in mk_runs],
                      "jaxmerge_jax_cache": [r.as_dict() for r in cache_runs]}
    record["jaxmerge"] = summarize(jm_runs)
    record["mergekit"] = summarize(mk_runs)
    if record["jaxmerge"]:
        record["jaxmerge"]["self_reported_s"] = [self_reported_seconds(r.log) for r in jm_runs
                                                 if r.ok()]
    warm = [r for r in cache_runs[1:] if r.ok()]
    record["jaxmerge_jax_cache"] = ({
        "fill_s": cache_runs[0].seconds if cache_runs[0].ok() else None,
        "warm_median_s": statistics.median(r.seconds for r in warm),
        "warm_median_cpu_s": statistics.median(r.cpu_seconds for r in warm),
        "warm_peak_rss_mb": max(r.peak_rss_mb for r in warm),
    } if warm else None)
    if record["jaxmerge"] and record["mergekit"]:
        t0 = time.perf_counter()
        try:
            record["comparison"] = compare_outputs(method, base, experts, jm_out, mk_out)
        except Exception as error:  # report, keep benchmarking the other methods
            record["comparison"] = {"error": f"{type(error).__name__}: {error}"}
        record["comparison_seconds"] = time.perf_counter() - t0
    return record


def fmt(value, spec=".2f", none="—"):
    return none if value is None else format(value, spec)


def print_tables(records: list[dict], facts: dict, load: dict | None) -> None:
    v = facts["versions"]
    print("\nmachine: {cpu_model}; {usable_cores}/{logical_cores} usable cores; {memory_gb} GB "
          "RAM; {platform}; python {python}".format(**facts))
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    header = ["method", "jm cold s", "jm med s", "jm warm-cache s", "mk cold s", "mk med s",
              "mk/jm med", "mk/jm cold", "mk/jm warm", "jm CPU s", "mk CPU s", "jm RSS MB",
              "mk RSS MB", "RSS mk/jm", "comparison"]
    rows = []
    for rec in records:
        jm, mk, jc = rec.get("jaxmerge"), rec.get("mergekit"), rec.get("jaxmerge_jax_cache")
        speed_med = mk["median_s"] / jm["median_s"] if jm and mk else None
        speed_cold = (mk["cold_s"] / jm["cold_s"] if jm and mk and jm["cold_s"]
                      and mk["cold_s"] else None)
        speed_warm = (mk["median_s"] / jc["warm_median_s"] if mk and jc else None)
        rss = mk["peak_rss_mb"] / jm["peak_rss_mb"] if jm and mk else None
        cmp = rec.get("comparison")
        rows.append([rec["method"], fmt(jm and jm["cold_s"]), fmt(jm and jm["median_s"]),
                     fmt(jc and jc["warm_median_s"]), fmt(mk and mk["cold_s"]),
                     fmt(mk and mk["median_s"]), fmt(speed_med), fmt(speed_cold),
                     fmt(speed_warm), fmt(jm and jm["median_cpu_s"], ".1f"),
                     fmt(mk and mk["median_cpu_s"], ".1f"),
                     fmt(jm and jm["peak_rss_mb"], ".0f"), fmt(mk and mk["peak_rss_mb"], ".0f"),
                     fmt(rss), verdict(rec["method"], cmp) if cmp else "not compared"])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("jm = jaxmerge, mk = mergekit; cold = first run (fresh process, XLA compiles every "
          "shape); med = median of all runs (wall); CPU s = median user+sys of the child; "
          "ratios > 1 favour jaxmerge. RSS = max child ru_maxrss over runs.")
    loads = [r[k]["max_load_at_start"] for r in records for k in ("jaxmerge", "mergekit")
             if r.get(k)]
    cores = facts["usable_cores"] or 1
    if loads and max(loads) > 0.5 * cores:
        print(f"WARNING: the machine was busy (1-min load average up to {max(loads):.1f} on "
              f"{cores} cores at the start of a timed run): wall times are noisy; compare the "
              "CPU seconds too.")
    print("jm warm-cache = jaxmerge with its --compilation_cache=DIR (JAX's persistent "
          "compilation cache; on by default in the CLI), median of the runs after the one "
          "that filled an empty DIR (mk/jm warm = mk med / jm warm-cache). jm cold/med use "
          "--compilation_cache= (off).")
    for rec in records:
        cmp = rec.get("comparison") or {}
        print(f"\n[{rec['method']}] {rec['note']}")
        if cmp.get("error"):
            print(f"  comparison error: {cmp['error']}")
            continue
        if not cmp:
            continue
        print(f"  tensors {cmp['tensors_compared']} (only jaxmerge: {cmp['only_in_jaxmerge']}, "
              f"only mergekit: {cmp['only_in_mergekit']}), dtypes {cmp['dtypes']}")
        print(f"  entries differing: {100 * cmp['frac_differ']:.4f}%  (>1 bf16 ulp: "
              f"{100 * cmp['frac_differ_gt1ulp']:.4f}%); max {cmp['max_ulps']} ulp in "
              f"{cmp['max_ulps_tensor']}; max |diff|/max|τ| {cmp['max_diff_rel_tau']:.3g} in "
              f"{cmp['max_diff_rel_tau_tensor']}")
        ptr = cmp["per_tensor_l2_ratio"]
        print(f"  changed vs base: jaxmerge {100 * cmp['frac_changed_vs_base_jaxmerge']:.3f}%, "
              f"mergekit {100 * cmp['frac_changed_vs_base_mergekit']:.3f}%; ‖Δ_jm‖/‖Δ_mk‖ = "
              f"{fmt(cmp['task_vector_l2_ratio_jm_over_mk'], '.4f')}"
              + (f" (per tensor min {ptr['min']:.3f} median {ptr['median']:.3f} max "
                 f"{ptr['max']:.3f})" if ptr else ""))
        if "ties_attribution" in cmp:
            a = cmp["ties_attribution"]
            print(f"  ties: differing entries at trim-threshold ties "
                  f"{a['differ_at_trim_threshold_ties']}, at zero-sign "
                  f"{a['differ_at_zero_sign']}, rounding ≤1 ulp {a['differ_rounding_le1ulp']}, "
                  f"UNEXPLAINED >1 ulp {a['differ_unexplained_gt1ulp']} (worst "
                  f"{a['worst_unexplained']}); jaxmerge kept "
                  f"{a['jaxmerge_extra_nonzero_kept']} non-zero τ entries more than mergekit's "
                  f"min(n, nnz) ({100 * a['extra_kept_fraction_of_n']:.3f}%)")
            print(f"  ties: jaxmerge vs a numpy reference of its own rule: "
                  f"{a['jaxmerge_vs_own_rule_gt1ulp']} entries off by > 1 ulp (worst "
                  f"{a['jaxmerge_vs_own_rule_worst']}); mergekit vs the modelled mergekit rule "
                  f"(off the trim boundary): {a['mergekit_vs_modelled_rule_gt1ulp_off_boundary']}")
        for w in cmp["worst_tensors"][:3]:
            print(f"    worst: {w['name']} {w['shape']} max|diff| {w['max_abs_diff']:.3g} "
                  f"(/max|τ| {w['max_diff_rel_tau']:.3g}, {w['max_ulps']} ulp), "
                  f"{100 * w['frac_differ']:.3f}% differ")
        jm = rec.get("jaxmerge") or {}
        if jm.get("self_reported_s"):
            print(f"  jaxmerge self-reported merge seconds: {jm['self_reported_s']}")
        if rec.get("jax_cache_bytes") is not None:
            jc = rec.get("jaxmerge_jax_cache") or {}
            print(f"  compilation cache: {rec['jax_cache_bytes'] / 1e6:.1f} MB; fill run "
                  f"{fmt(jc.get('fill_s'))} s")
    if load is not None:
        print("\ntransformers load check (bf16, prompt 'The capital of France is'):")
        print("  " + json.dumps(load))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--jax-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also time jaxmerge with its --compilation_cache (warm)")
    parser.add_argument("--load-check", action=argparse.BooleanOptionalAction, default=True,
                        help="load the outputs in transformers")
    parser.add_argument("--regime", choices=["rl", "sft"], default="rl",
                        help="demo experts: rl = build_demo's sparse experts (default); sft = "
                             "dense Gaussian experts (exercises the TIES trim threshold)")
    parser.add_argument("--base", help="base model dir (default: build the demo)")
    parser.add_argument("--experts", help="comma-separated expert dirs (with --base)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print(f"machine: {facts['cpu_model']}, {facts['usable_cores']} cores, "
          f"{facts['memory_gb']} GB; versions {facts['versions']}")
    if args.base:
        base = str(pathlib.Path(args.base).resolve())
        experts = [str(pathlib.Path(e).resolve()) for e in (args.experts or "").split(",") if e]
        if not experts:
            parser.error("--base needs --experts")
    else:
        base, experts = build_inputs(workdir, args.regime)
    primed = prime_page_cache([base, *experts])
    print(f"page cache primed: {primed / 1e6:.0f} MB of inputs")
    warm_imports(workdir)
    records = []
    for method in methods:
        print(f"\n== {method}", flush=True)
        records.append(run_method(method, base, experts, workdir, args.repeats, args.jax_cache))
        with open(workdir / "bench_mergekit.json", "w") as f:  # partial results survive
            json.dump({"machine": facts, "records": records}, f, indent=2, default=str)
    load = None
    pairs = [(r["method"], str(workdir / "out" / r["method"] / "mergekit"),
              str(workdir / "out" / r["method"] / "jaxmerge")) for r in records
             if r.get("mergekit") and r.get("jaxmerge")]
    if args.load_check and pairs:
        load = transformers_check(pairs, workdir)
    result = {"machine": facts, "repeats": args.repeats, "base": base, "experts": experts,
              "regime": None if args.base else args.regime,
              "settings": {"density": DENSITY, "drop_rate": DROP_RATE, "seed": SEED,
                           "compute_dtype": "float32", "out_dtype": "bfloat16"},
              "records": records, "transformers_check": load}
    with open(workdir / "bench_mergekit.json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    print_tables(records, facts, load)
    print(f"\nwrote {workdir / 'bench_mergekit.json'}")
    failed = [r["method"] for r in records if not (r.get("jaxmerge") and r.get("mergekit"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
