"""jaxmerge's spectral merges vs the papers' kind of PyTorch script, same checkpoints, same run.

    python benchmarks/bench_spectral.py [--methods=resmerge,tsv,iso_c,iso_cts] [--repeats=3]
        [--workdir=bench_out] [--tools=jaxmerge,torch] [--exact-methods=resmerge]
        [--threads=N] [--no-jax-cache] [--float64-reference] [--base=DIR --experts=A,B,C]

    python benchmarks/bench_spectral.py --repeats=1 --methods=resmerge      # quick
    python benchmarks/bench_spectral.py --tools=torch --base=B --experts=A,B  # torch side only

Inputs: ``jaxmerge.demo.build_demo`` (SmolLM2-135M-Instruct in bf16 plus 3 sparse RL-style
experts), built once and cached under WORKDIR/demo (as in bench_mergekit.py); or
--base/--experts.

The baseline is ``benchmarks/torch_spectral.py``: a faithful PyTorch re-implementation of
METHODS.md §3/§4 that works like the released scripts (one tensor at a time, float32, a full
``torch.linalg.svd(full_matrices=False)`` per expert per matrix leaf). It does not import
jaxmerge.

Per method, these series run as fresh child processes through ``common.measure`` (wall time,
user+sys CPU, the child's peak RSS from os.wait4), alternating, --repeats times each:

* ``jaxmerge``: ``python -m jaxmerge.main --method=M --dtype=float32 --overwrite
  --progress=false --compilation_cache=`` (the cache off: every run compiles from scratch);
* ``torch``: ``python benchmarks/torch_spectral.py --method=M --dtype=float32 [--threads]``;
* ``jaxmerge svd=exact`` (methods in --exact-methods, default resmerge): the jaxmerge command
  with ``--svd=exact``, cache off;

then, unless --no-jax-cache, ``jaxmerge warm-cache``: the default command with
``--compilation_cache=DIR`` (a fresh DIR), --repeats + 1 runs; the first fills the cache and
is not in the median. The page cache is primed and each tool's imports are warmed (untimed)
before any timing. A jaxmerge method the CLI does not know yet (or a missing ``--svd`` flag) is
reported and skipped, so the torch side and the comparison still run.

Comparison, tensor by tensor, of each jaxmerge output against the torch output on the merged
task vector Δ = θ − θ₀ (float32 views): per-tensor relative error
‖Δ_jax − Δ_torch‖_F / ‖Δ_torch‖_F (0/0 counts as 0), reported as max and median with the
worst tensor (also split into matrix and non-matrix leaves), plus max |θ_jax − θ_torch|.
With --float64-reference, torch_spectral.py also runs once per method in float64 (untimed)
and every output's error against it is reported too: that is the float32 noise floor of
each tool. With --tools=torch only, the torch output is compared with itself (a check of the
comparison code; every error must be 0).

Caveat when reading the errors: TSV and ISO-CTS are not well defined when a task matrix has
fewer non-zero singular values than the slots it fills (k = ⌊r/N⌋ for TSV, d for ISO-CTS):
the missing singular vectors are arbitrary, and they rotate every other slot through the
polar factor. Two correct implementations can then differ by O(1) on that tensor.

Prints a table (method, tool, cold and median wall s, CPU s, speedup torch/jax, peak RSS,
errors, worst tensor) and writes WORKDIR/bench_spectral.json with every run, the commands
and the machine facts (``common.machine_facts``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_mergekit import build_inputs, child_env, prime_page_cache  # noqa: E402
from common import Checkpoint, log_tail, machine_facts, measure  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
TORCH_SCRIPT = REPO / "benchmarks" / "torch_spectral.py"
METHODS = {
    "resmerge": "ResMerge (METHODS.md §4): head rank 1, β 0.7–1.0, ρ_max 0.2, φ attn 1 / ffn "
                "0.25 / other 0; non-matrix leaves: mean τ",
    "tsv": "TSV-Merge (§3): top ⌊r/N⌋ per task, polar of the concatenations, α = 1",
    "iso_c": "ISO-C (§3): mean(σ)·U Vᵀ of Σ τ_t, α = 1",
    "iso_cts": "ISO-CTS (§3): common fraction 0.8, task blocks then common block, polars, "
               "σ̄, α = 1",
}
EMBEDDING_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head")
NORM_MARKERS = ("norm", "ln_", "layernorm")
TOOL_ORDER = ("jaxmerge", "jaxmerge warm-cache", "jaxmerge svd=exact", "torch", "torch cuda")


# ---------------------------------------------------------------------------
# Commands


def jaxmerge_command(method: str, base: str, experts: list[str], output: pathlib.Path,
                     cache_dir: pathlib.Path | None = None, svd: str | None = None) -> list:
    """The CLI call; ``cache_dir`` None: ``--compilation_cache=`` (off)."""
    command = [sys.executable, "-m", "jaxmerge.main", f"--method={method}", f"--base={base}",
               f"--experts={','.join(experts)}", f"--output={output}", "--dtype=float32",
               "--overwrite", "--progress=false", f"--compilation_cache={cache_dir or ''}"]
    if svd:
        command.append(f"--svd={svd}")
    return command


def torch_command(method: str, base: str, experts: list[str], output: pathlib.Path,
                  threads: int | None, float64: bool = False, device: str = "cpu") -> list:
    command = [sys.executable, str(TORCH_SCRIPT), f"--method={method}", f"--base={base}",
               f"--experts={','.join(experts)}", f"--output={output}", f"--device={device}"]
    command += (["--dtype=float64", "--compute-dtype=float64"] if float64
                else ["--dtype=float32"])
    if threads:
        command.append(f"--threads={threads}")
    return command


def probe_jaxmerge(workdir: pathlib.Path) -> dict:
    """The CLI's methods and whether it has ``--svd`` (asked in a child; jax stays out of here)."""
    code = ("import json; from absl import flags; from jaxmerge import methods, main; "
            "print('@@' + json.dumps({'methods': list(methods.REGISTRY), "
            "'svd_flag': 'svd' in flags.FLAGS}))")
    log = workdir / "logs" / "probe_jaxmerge.log"
    result = measure([sys.executable, "-c", code], log, env=child_env(), label="probe")
    lines = [x for x in pathlib.Path(log).read_text(errors="replace").splitlines()
             if x.startswith("@@")]
    if not result.ok() or not lines:
        print("jaxmerge probe failed:\n" + log_tail(log, 10))
        return {"methods": [], "svd_flag": False}
    return json.loads(lines[-1][2:])


def warm_imports(workdir: pathlib.Path, tools: list[str]) -> None:
    """Imports each tool once (writes .pyc, pages the libraries in): not timed."""
    codes = {"jaxmerge": "import jax, jax.numpy as jnp, jaxmerge.main, jaxmerge.api; "
                         "jnp.zeros(1).block_until_ready()",
             "torch": "import torch, safetensors.torch; torch.linalg.svd(torch.ones(8, 4))",
             "torch_cuda": "import torch, safetensors.torch; "
                           "torch.linalg.svd(torch.ones(8, 4, device='cuda'))"}
    for tool in tools:
        result = measure([sys.executable, "-c", codes[tool]],
                         workdir / "logs" / f"warm_{tool}.log", env=child_env(),
                         label=f"warm {tool}")
        state = "ok" if result.ok() else f"FAILED rc={result.returncode}"
        print(f"warm imports {tool}: {result.seconds:.1f} s {state}")


def torch_self_report(log: str) -> dict | None:
    lines = [x for x in pathlib.Path(log).read_text(errors="replace").splitlines()
             if x.startswith("@@")]
    return json.loads(lines[-1][2:]) if lines else None


def jaxmerge_self_report(log: str) -> float | None:
    import re

    found = re.findall(r"MB read, ([0-9.]+) s\)", pathlib.Path(log).read_text(errors="replace"))
    return float(found[-1]) if found else None


# ---------------------------------------------------------------------------
# Comparison


def is_matrix_leaf(name: str, shape: tuple, floating: bool) -> bool:
    lowered = name.lower()
    return (len(shape) == 2 and floating and not any(m in lowered for m in EMBEDDING_MARKERS)
            and not any(m in lowered for m in NORM_MARKERS))


def _norm(x: np.ndarray) -> float:
    return math.sqrt(float(np.square(x, dtype=np.float64).sum()))


def compare_outputs(base_dir: str, ref_dir: pathlib.Path, other_dir: pathlib.Path) -> dict:
    """``other`` against ``ref``, tensor by tensor, on Δ = θ − θ₀ (float32 views).

    rel = ‖Δ_other − Δ_ref‖_F / ‖Δ_ref‖_F (0/0 = 0, x/0 = inf); also max |θ_other − θ_ref|.
    """
    base, ref, other = Checkpoint(base_dir), Checkpoint(ref_dir), Checkpoint(other_dir)
    ref_names, other_names = ref.names(), set(other.names())
    rows, errors = [], []
    sq_ref = sq_diff = 0.0
    for name in ref_names:
        if name not in other_names:
            continue
        r_t, o_t = ref.torch(name), other.torch(name)
        if tuple(r_t.shape) != tuple(o_t.shape):
            errors.append({"name": name, "error": f"shape {tuple(o_t.shape)} vs "
                                                  f"{tuple(r_t.shape)}"})
            continue
        floating = r_t.dtype.is_floating_point
        if not floating:
            same = bool((r_t == o_t).all())
            rows.append({"name": name, "shape": list(r_t.shape), "matrix": False,
                         "rel_err": 0.0 if same else math.inf,
                         "max_abs_diff": 0.0 if same else math.inf, "delta_norm": 0.0,
                         "finite": True})
            continue
        b = base.float32(name) if name in base.files else np.zeros(r_t.shape, np.float32)
        r = r_t.float().numpy()
        o = o_t.float().numpy()
        d_ref, d_other = r - b, o - b
        num, den = _norm(d_other - d_ref), _norm(d_ref)
        sq_ref += den * den
        sq_diff += num * num
        rel = 0.0 if num == 0 else (num / den if den > 0 else math.inf)
        finite = bool(np.isfinite(o).all())
        rows.append({"name": name, "shape": list(r.shape),
                     "matrix": is_matrix_leaf(name, r.shape, True), "rel_err": rel,
                     "max_abs_diff": float(np.abs(o - r).max()) if r.size else 0.0,
                     "delta_norm": den, "finite": finite})

    def stats(subset: list[dict]) -> dict | None:
        if not subset:
            return None
        worst = max(subset, key=lambda x: x["rel_err"])
        return {"tensors": len(subset), "max_rel_err": worst["rel_err"],
                "median_rel_err": statistics.median(x["rel_err"] for x in subset),
                "worst_tensor": worst["name"] if worst["rel_err"] > 0 else None}

    worst_abs = max(rows, key=lambda x: x["max_abs_diff"]) if rows else None
    return {
        "tensors_compared": len(rows),
        "only_in_reference": sorted(set(ref_names) - other_names),
        "only_in_other": sorted(other_names - set(ref_names)),
        "errors": errors,
        "non_finite_tensors": [x["name"] for x in rows if not x["finite"]],
        "all": stats(rows),
        "matrix": stats([x for x in rows if x["matrix"]]),
        "non_matrix": stats([x for x in rows if not x["matrix"]]),
        "model_rel_err": (math.sqrt(sq_diff / sq_ref) if sq_ref > 0
                          else (0.0 if sq_diff == 0 else math.inf)),
        "max_abs_diff_theta": worst_abs["max_abs_diff"] if worst_abs else None,
        "max_abs_diff_theta_tensor": worst_abs["name"] if worst_abs else None,
        "worst_tensors": sorted(rows, key=lambda x: -x["rel_err"])[:5],
    }


# ---------------------------------------------------------------------------
# Driver


def summarize(runs: list, skip_first: bool = False) -> dict | None:
    timed = runs[1:] if skip_first else runs
    good = [r for r in timed if r.ok()]
    if not good:
        return None
    return {"cold_s": runs[0].seconds if runs[0].ok() else None,
            "median_s": statistics.median(r.seconds for r in good),
            "median_cpu_s": statistics.median(r.cpu_seconds for r in good),
            "peak_rss_mb": max(r.peak_rss_mb for r in good),
            "max_load_at_start": max(r.load_at_start for r in runs),
            "n_ok": len(good), "n_runs": len(timed)}


def _print_run(method: str, label: str, i: int, r) -> None:
    state = "ok" if r.ok() else f"FAILED rc={r.returncode}"
    print(f"  {method:9s} {label:20s} run {i}: {r.seconds:7.2f} s wall {r.cpu_seconds:7.2f} s "
          f"cpu {r.peak_rss_mb:7.0f} MB  (load {r.load_at_start:.1f})  {state}", flush=True)
    if not r.ok():
        print("    " + log_tail(r.log, 15).replace("\n", "\n    "))


def run_method(method: str, base: str, experts: list[str], workdir: pathlib.Path, args,
               jaxmerge_ok: bool, exact_ok: bool) -> dict:
    out = workdir / "spectral" / "out" / method
    logs = workdir / "spectral" / "logs" / method
    out.mkdir(parents=True, exist_ok=True)
    tools = args.tools
    dirs = {"jaxmerge": out / "jaxmerge", "jaxmerge warm-cache": out / "jaxmerge_cache",
            "jaxmerge svd=exact": out / "jaxmerge_exact", "torch": out / "torch",
            "torch cuda": out / "torch_cuda"}
    commands = {}
    if "jaxmerge" in tools and jaxmerge_ok:
        commands["jaxmerge"] = jaxmerge_command(method, base, experts, dirs["jaxmerge"])
        if exact_ok and method in args.exact_methods:
            commands["jaxmerge svd=exact"] = jaxmerge_command(
                method, base, experts, dirs["jaxmerge svd=exact"], svd="exact")
    if "torch" in tools:
        commands["torch"] = torch_command(method, base, experts, dirs["torch"], args.threads)
    if "torch_cuda" in tools:
        commands["torch cuda"] = torch_command(method, base, experts, dirs["torch cuda"],
                                               args.threads, device="cuda")
    record = {"method": method, "note": METHODS[method],
              "commands": {k: " ".join(v) for k, v in commands.items()}, "runs": {}}
    runs: dict[str, list] = {label: [] for label in commands}
    for i in range(args.repeats):
        for label, command in commands.items():
            shutil.rmtree(dirs[label], ignore_errors=True)
            slug = label.replace(" ", "_").replace("=", "_")
            r = measure(command, logs / f"{slug}_{i}.log", env=child_env(),
                        label=f"{label} #{i}")
            runs[label].append(r)
            _print_run(method, label, i, r)
    if "jaxmerge" in commands and args.jax_cache and runs["jaxmerge"][0].ok():
        label = "jaxmerge warm-cache"
        cache_dir = workdir / "spectral" / "jax_cache" / method
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        command = jaxmerge_command(method, base, experts, dirs[label], cache_dir)
        record["commands"][label] = " ".join(command)
        runs[label] = []
        for i in range(args.repeats + 1):
            shutil.rmtree(dirs[label], ignore_errors=True)
            r = measure(command, logs / f"jaxmerge_cache_{i}.log", env=child_env(),
                        label=f"{label} #{i}")
            runs[label].append(r)
            _print_run(method, label + (" (fill)" if i == 0 else ""), i, r)
        record["jax_cache_bytes"] = sum(f.stat().st_size for f in cache_dir.rglob("*")
                                        if f.is_file())
    record["runs"] = {label: [r.as_dict() for r in rs] for label, rs in runs.items()}
    record["tools"] = {}
    for label, rs in runs.items():
        summary = summarize(rs, skip_first=(label == "jaxmerge warm-cache"))
        if summary and label.startswith("torch"):
            reports = [torch_self_report(r.log) for r in rs if r.ok()]
            reports = [x for x in reports if x]
            if reports:
                summary["svd_s"] = statistics.median(x["svd_s"] for x in reports)
                summary["self_reported_s"] = statistics.median(x["total_s"] for x in reports)
                summary["svd_calls"] = reports[-1]["svd_calls"]
        elif summary:
            summary["self_reported_s"] = [jaxmerge_self_report(r.log) for r in rs if r.ok()]
        record["tools"][label] = summary

    # float64 reference (untimed), then the comparisons.
    ref64 = None
    if args.float64_reference:
        ref64 = out / "torch_float64"
        shutil.rmtree(ref64, ignore_errors=True)
        r = measure(torch_command(method, base, experts, ref64, args.threads, float64=True),
                    logs / "torch_float64.log", env=child_env(), label="torch float64")
        _print_run(method, "torch float64 (ref)", 0, r)
        if not r.ok():
            ref64 = None
    t0 = time.perf_counter()
    comparisons = {}
    torch_ok = bool(record["tools"].get("torch"))
    for label in TOOL_ORDER:
        if not record["tools"].get(label):
            continue
        entry = {}
        try:
            if torch_ok and label != "torch":  # "torch cuda" too: GPU vs CPU torch
                entry["vs_torch"] = compare_outputs(base, dirs["torch"], dirs[label])
            elif label == "torch" and not any(record["tools"].get(x) for x in TOOL_ORDER[:3]):
                entry["vs_torch"] = compare_outputs(base, dirs["torch"], dirs["torch"])
                entry["self_check"] = True
            if ref64 is not None:
                entry["vs_float64"] = compare_outputs(base, ref64, dirs[label])
        except Exception as error:  # report, keep benchmarking the other methods
            entry["error"] = f"{type(error).__name__}: {error}"
        comparisons[label] = entry
    record["comparisons"] = comparisons
    record["comparison_seconds"] = time.perf_counter() - t0
    return record


def fmt(value, spec=".2f", none="—"):
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def print_tables(records: list[dict], facts: dict, float64: bool) -> None:
    print("\nmachine: {cpu_model}; {usable_cores}/{logical_cores} usable cores; {memory_gb} GB "
          "RAM; {platform}; python {python}".format(**facts))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()))
    header = ["method", "tool", "cold s", "median s", "CPU s", "torch/this", "RSS MB",
              "max rel err", "median rel err", "max |Δθ|", "worst tensor"]
    if float64:
        header += ["max rel err vs f64"]
    rows = []
    for rec in records:
        torch_summary = rec["tools"].get("torch")
        for label in TOOL_ORDER:
            s = rec["tools"].get(label)
            if not s:
                continue
            cmp = rec["comparisons"].get(label, {})
            vs = cmp.get("vs_torch") or {}
            allstats = vs.get("all") or {}
            speed = (torch_summary["median_s"] / s["median_s"]
                     if torch_summary and label != "torch" else None)
            name = label + (" (self-check)" if cmp.get("self_check") else "")
            row = [rec["method"], name, fmt(s["cold_s"]), fmt(s["median_s"]),
                   fmt(s["median_cpu_s"], ".1f"), fmt(speed), fmt(s["peak_rss_mb"], ".0f"),
                   fmt(allstats.get("max_rel_err"), ".2e"),
                   fmt(allstats.get("median_rel_err"), ".2e"),
                   fmt(vs.get("max_abs_diff_theta"), ".2e"),
                   allstats.get("worst_tensor") or cmp.get("error") or "—"]
            if float64:
                f64 = (cmp.get("vs_float64") or {}).get("all") or {}
                row.append(fmt(f64.get("max_rel_err"), ".2e"))
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("cold = first run (jaxmerge: a fresh process compiling every shape); median = all "
          "runs (warm-cache: the runs after the one that filled the cache); CPU s = median "
          "user+sys; torch/this = torch median wall / this median wall (> 1: faster than "
          "torch); RSS = max child ru_maxrss. rel err = ‖Δ − Δ_torch‖/‖Δ_torch‖ per tensor, "
          "Δ = θ − θ₀; max |Δθ| = max |θ − θ_torch|.")
    loads = [s["max_load_at_start"] for rec in records for s in rec["tools"].values() if s]
    cores = facts["usable_cores"] or 1
    if loads and max(loads) > 0.5 * cores:
        print(f"WARNING: the machine was busy (1-min load average up to {max(loads):.1f} on "
              f"{cores} cores at the start of a timed run): wall times are noisy; compare the "
              "CPU seconds too.")
    for rec in records:
        print(f"\n[{rec['method']}] {rec['note']}")
        t = rec["tools"].get("torch")
        if t and t.get("svd_s") is not None:
            print(f"  torch: {t['svd_s']:.2f} s of {t['self_reported_s']:.2f} s inside "
                  f"torch.linalg.svd ({t['svd_calls']} calls per run)")
        for label in TOOL_ORDER:
            cmp = rec["comparisons"].get(label)
            if not cmp:
                continue
            if cmp.get("error"):
                print(f"  {label}: comparison error: {cmp['error']}")
                continue
            for key in ("vs_torch", "vs_float64"):
                vs = cmp.get(key)
                if not vs:
                    continue
                parts = []
                for kind in ("matrix", "non_matrix"):
                    st = vs.get(kind)
                    if st:
                        worst = st["worst_tensor"] or "—"
                        parts.append(f"{kind} max {st['max_rel_err']:.2e} ({worst}) median "
                                     f"{st['median_rel_err']:.2e}")
                print(f"  {label} {key}: {vs['tensors_compared']} tensors; whole-model rel "
                      f"{fmt(vs['model_rel_err'], '.2e')}; " + "; ".join(parts))
                if vs["only_in_reference"] or vs["only_in_other"] or vs["errors"]:
                    print(f"    missing: {vs['only_in_reference']}; extra: "
                          f"{vs['only_in_other']}; errors: {vs['errors']}")
                if vs["non_finite_tensors"]:
                    print(f"    NON-FINITE: {vs['non_finite_tensors']}")
        jm = rec["tools"].get("jaxmerge")
        if jm and jm.get("self_reported_s"):
            print(f"  jaxmerge self-reported merge seconds: {jm['self_reported_s']}")
        if rec.get("jax_cache_bytes") is not None:
            print(f"  compilation cache: {rec['jax_cache_bytes'] / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="resmerge,tsv,iso_c,iso_cts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--tools", default="jaxmerge,torch",
                        help="comma-separated subset of jaxmerge,torch,torch_cuda (the "
                             "torch script on a GPU, beside the CPU baseline)")
    parser.add_argument("--exact-methods", default="resmerge",
                        help="methods that also get a jaxmerge --svd=exact series ('' = none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch_spectral.py --threads (default: all usable cores)")
    parser.add_argument("--jax-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="also time jaxmerge with its --compilation_cache (warm)")
    parser.add_argument("--float64-reference", action=argparse.BooleanOptionalAction,
                        default=False, help="also run torch_spectral.py in float64 (untimed) "
                                            "and report every tool's error against it")
    parser.add_argument("--base", help="base model dir (default: build the demo)")
    parser.add_argument("--experts", help="comma-separated expert dirs (with --base)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    args.tools = [t for t in args.tools.split(",") if t]
    if not args.tools or any(t not in ("jaxmerge", "torch", "torch_cuda") for t in args.tools):
        parser.error("--tools: a comma-separated subset of jaxmerge,torch,torch_cuda")
    args.exact_methods = [m for m in args.exact_methods.split(",") if m]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    workdir = pathlib.Path(args.workdir).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print(f"machine: {facts['cpu_model']}, {facts['usable_cores']} cores, "
          f"{facts['memory_gb']} GB; versions {facts['versions']}")
    if args.base:
        base = str(pathlib.Path(args.base).resolve())
        experts = [str(pathlib.Path(e).resolve()) for e in (args.experts or "").split(",") if e]
        if not experts:
            parser.error("--base needs --experts")
    else:
        base, experts = build_inputs(workdir)
    probe = {"methods": [], "svd_flag": False}
    if "jaxmerge" in args.tools:
        probe = probe_jaxmerge(workdir)
        missing = [m for m in methods if m not in probe["methods"]]
        if missing:
            print(f"NOTE: the jaxmerge CLI has no method {missing} (yet): only torch runs "
                  "for them.")
        if args.exact_methods and not probe["svd_flag"]:
            print("NOTE: the jaxmerge CLI has no --svd flag (yet): no svd=exact series.")
    primed = prime_page_cache([base, *experts])
    print(f"page cache primed: {primed / 1e6:.0f} MB of inputs")
    warm_imports(workdir, args.tools)
    settings = {"compute_dtype": "float32", "out_dtype": "float32",
                "torch_threads": args.threads or facts["usable_cores"],
                "resmerge": {"head_rank": 1, "beta_min": 0.7, "beta_max": 1.0, "rho_max": 0.2,
                             "score_scale": {"attention": 1.0, "ffn": 0.25, "other": 0.0},
                             "score_map": "(x+1)/2", "eps": 1e-8},
                "tsv_iso": {"alpha": 1.0, "iso_cts_common_fraction": 0.8}}
    result = {"machine": facts, "repeats": args.repeats, "base": base, "experts": experts,
              "tools": args.tools, "jaxmerge_probe": probe, "settings": settings,
              "records": []}
    for method in methods:
        print(f"\n== {method}", flush=True)
        result["records"].append(run_method(
            method, base, experts, workdir, args, method in probe["methods"],
            probe["svd_flag"]))
        with open(workdir / "bench_spectral.json", "w") as f:  # partial results survive
            json.dump(result, f, indent=2, default=str)
    print_tables(result["records"], facts, args.float64_reference)
    print(f"\nwrote {workdir / 'bench_spectral.json'}")
    failed = [r["method"] for r in result["records"]
              if any(not s for s in r["tools"].values()) or not r["tools"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
