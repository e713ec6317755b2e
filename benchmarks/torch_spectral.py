"""Plain PyTorch reference of the spectral merges, the way the papers' own scripts run them.

    python benchmarks/torch_spectral.py --method={resmerge,tsv,iso_c,iso_cts} \\
        --base=DIR --experts=A,B,C --output=DIR [--dtype=float32|bfloat16] [--threads=N]
        [--device=cpu|cuda]

This is the baseline that ``benchmarks/bench_spectral.py`` times against jaxmerge: a
faithful re-implementation of /work/shared/METHODS.md §3 (tsv, iso_c, iso_cts) and §4
(resmerge, house defaults) in the style of the released ResMerge script and of the
TSV / ISO reference code (see /work/shared/reference/resmerge-release-notes.md §1-§3 and
baselines-notes.md §4-§5). It imports torch, safetensors and the standard library only,
never jaxmerge, and it is deliberately simple:

* one tensor at a time: for every tensor name of the base (``safe_open(framework="pt")``;
  shards through ``model.safetensors.index.json`` when present) the base and the N expert
  tensors are loaded, upcast to float32 on the CPU, merged, and the result kept in RAM;
* matrix leaves (METHODS.md §0: 2-D, floating, the name contains none of ``embed_tokens``,
  ``wte``, ``word_embeddings``, ``lm_head`` and none of the norm markers ``norm``, ``ln_``,
  ``layernorm``) go through the method with a FULL thin ``torch.linalg.svd(
  full_matrices=False)`` per expert per matrix, as the reference scripts do; no batching,
  no randomised or truncated SVD;
* every other floating leaf takes the method's non-matrix rule: the mean task vector
  (ResMerge), α times the mean task vector (TSV, ISO-C, ISO-CTS; α = 1); non-floating
  tensors are copied from the base;
* the output is one ``model.safetensors`` holding exactly the base's tensor names (a tied
  ``lm_head`` absent from the base stays absent), in ``--dtype`` (default: each base
  tensor's own dtype; the float32 result is cast once), plus the base's config.json with
  ``torch_dtype`` / ``dtype`` updated, and the base's tokenizer / generation files.

Defaults (METHODS.md): ResMerge head rank 1, β_min 0.7, β_max 1.0, ρ_max 0.2, family score
scales attention 1.0 / ffn 0.25 / other 0.0, the (x + 1)/2 score map, eps 1e-8, the
mean-residual fallbacks. TSV / ISO α = 1; ISO-CTS common fraction 0.8 with Python's
round() (half to even). Degenerate task matrices (‖τ_t‖ ≤ 1e-8 for TSV, a projected ISO-CTS
task residual with norm ≤ 1e-8) leave their slots zero; ResMerge splits a task with
‖τ_t‖ = 0 into H = R = 0.

At the end it prints the wall time, the time spent inside torch.linalg.svd (every call:
the per-expert SVDs, the SVD of the sum and the polar factors) and one machine-readable
line starting with ``@@`` (JSON) for the benchmark driver.

``--compute-dtype=float64 --dtype=float64`` is not the baseline: it runs the same code in
double precision, as a high-precision reference against which the float32 tools' errors can
be judged (``bench_spectral.py --float64-reference``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EMBEDDING_MARKERS = ("embed_tokens", "wte", "word_embeddings", "lm_head")
NORM_MARKERS = ("norm", "ln_", "layernorm")
FAMILIES = (  # METHODS.md §0, first match wins
    ("attention", ("self_attn", ".attn.", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("ffn", ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj")),
    ("norm", NORM_MARKERS),
    ("embedding", EMBEDDING_MARKERS),
)
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json")

# ResMerge defaults (METHODS.md §4)
HEAD_RANK = 1
BETA_MIN, BETA_MAX = 0.7, 1.0
RHO_MAX = 0.2
SCORE_SCALE = {"attention": 1.0, "ffn": 0.25}  # every other family: 0.0
EPS = 1e-8
# TSV / ISO defaults (METHODS.md §3)
ALPHA = 1.0
COMMON_FRACTION = 0.8
ZERO_NORM = 1e-8
COMPUTE = torch.float32  # --compute-dtype=float64 gives an error-floor reference, not the baseline
DEVICE = torch.device("cpu")  # --device=cuda: the same script on a GPU (not the papers' CPU setup)

SVD_SECONDS = 0.0
SVD_CALLS = 0


# ---------------------------------------------------------------------------
# Names and small helpers


def family(name: str) -> str:
    lowered = name.lower()
    for fam, markers in FAMILIES:
        if any(m in lowered for m in markers):
            return fam
    return "other"


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    lowered = name.lower()
    return (tensor.ndim == 2 and tensor.dtype in FLOATING
            and not any(m in lowered for m in EMBEDDING_MARKERS)
            and not any(m in lowered for m in NORM_MARKERS))


def svd(a: torch.Tensor):
    """The full thin SVD, timed: a = U diag(S) Vh."""
    global SVD_SECONDS, SVD_CALLS
    start = time.perf_counter()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    SVD_SECONDS += time.perf_counter() - start
    SVD_CALLS += 1
    return u, s, vh


def polar(a: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from the thin SVD a = P diag(s) Qᵀ."""
    p, _, qh = svd(a)
    return p @ qh


def norm(a: torch.Tensor) -> float:
    return torch.linalg.vector_norm(a).item()


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.dot(a.reshape(-1), b.reshape(-1)).item()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return dot(a, b) / (norm(a) * norm(b) + 1e-8)


def clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def total(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return total(tensors) / len(tensors)


# ---------------------------------------------------------------------------
# ResMerge (METHODS.md §4)


def resmerge_matrix(taus: list[torch.Tensor], fam: str) -> torch.Tensor:
    n_tasks = len(taus)
    # 1. Split: head H_t = top-k SVD part, residual R_t = τ_t - H_t.
    heads, residuals = [], []
    for tau in taus:
        if norm(tau) <= 0.0:
            heads.append(torch.zeros_like(tau))
            residuals.append(torch.zeros_like(tau))
            continue
        u, s, vh = svd(tau)
        k = min(HEAD_RANK, s.shape[0])
        head = (u[:, :k] * s[:k]) @ vh[:k, :]
        heads.append(head)
        residuals.append(tau - head)

    # 2. SRC-A backbone.
    norms = [norm(r) for r in residuals]
    if max(norms) <= EPS:
        backbone = torch.zeros_like(taus[0])
    else:
        qs = [r / (n + EPS) for r, n in zip(residuals, norms)]
        pairs = [(t, u) for t in range(n_tasks) for u in range(t + 1, n_tasks)]
        s_r = sum(cos(qs[t], qs[u]) for t, u in pairs) / len(pairs) if pairs else 1.0
        big_q = total(qs)
        big_q_norm = norm(big_q)
        if big_q_norm <= EPS:
            backbone = mean(residuals)
        else:
            q_src = big_q / (big_q_norm + EPS)
            c_r = clamp01(sum(cos(q, q_src) for q in qs) / n_tasks)
            s_bar = clamp01((s_r + 1.0) / 2.0)
            c_bar = clamp01((c_r + 1.0) / 2.0)
            score = clamp01(0.5 * (s_bar + c_bar) * SCORE_SCALE.get(fam, 0.0))
            beta = BETA_MAX - (BETA_MAX - BETA_MIN) * score
            n_bar = sum(norms) / n_tasks
            if c_r <= 1.0 / math.sqrt(n_tasks):
                backbone = mean(residuals)
            else:
                backbone = (c_r ** beta * n_bar) * q_src

    # 3. LHC: a head correction of at most ρ_max ‖A‖ along the mean head.
    kept = [h / norm(h) for h in heads if norm(h) > 1e-8]
    if not kept:
        gate = 0.0
    elif len(kept) == 1 or n_tasks == 1:
        gate = 1.0
    else:
        pairs = [(t, u) for t in range(len(kept)) for u in range(t + 1, len(kept))]
        gate = clamp01(sum(max(0.0, cos(kept[t], kept[u])) for t, u in pairs) / len(pairs))
    mean_head = mean(heads)
    backbone_norm, mean_head_norm = norm(backbone), norm(mean_head)
    if RHO_MAX * gate > 0 and backbone_norm > 1e-8 and mean_head_norm > 1e-8:
        correction = (RHO_MAX * gate * backbone_norm / mean_head_norm) * mean_head
    else:
        correction = torch.zeros_like(backbone)
    return backbone + correction


# ---------------------------------------------------------------------------
# TSV, ISO-C, ISO-CTS (METHODS.md §3)


def tsv_matrix(taus: list[torch.Tensor], name: str) -> torch.Tensor:
    n_tasks = len(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = r // n_tasks
    if k == 0:
        print(f"WARNING: tsv: {name} {m}x{n}: rank {r} < {n_tasks} tasks, Δ = 0",
              file=sys.stderr)
        return torch.zeros_like(taus[0])
    u_cat = torch.zeros(m, r, dtype=COMPUTE, device=DEVICE)
    s_cat = torch.zeros(r, dtype=COMPUTE, device=DEVICE)
    v_cat = torch.zeros(r, n, dtype=COMPUTE, device=DEVICE)
    for t, tau in enumerate(taus):
        if norm(tau) <= ZERO_NORM:
            continue
        u, s, vh = svd(tau)
        u_cat[:, t * k:(t + 1) * k] = u[:, :k]
        s_cat[t * k:(t + 1) * k] = s[:k]
        v_cat[t * k:(t + 1) * k, :] = vh[:k, :]
    u_perp, v_perp = polar(u_cat), polar(v_cat)
    return ALPHA * ((u_perp * s_cat) @ v_perp)


def iso_c_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = svd(total(taus))
    return (ALPHA * s.mean().item()) * (u @ vh)


def iso_cts_matrix(taus: list[torch.Tensor]) -> torch.Tensor:
    n_tasks = len(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k0 = math.floor(COMMON_FRACTION * r)
    specific = round((r - k0) / n_tasks) * n_tasks  # Python round: half to even
    if specific == 0:
        return iso_c_matrix(taus)
    k_c = r - specific
    d = specific // n_tasks
    u, s, vh = svd(total(taus))
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c, :]
    u_all = torch.zeros(m, r, dtype=COMPUTE, device=DEVICE)
    s_all = torch.zeros(r, dtype=COMPUTE, device=DEVICE)
    v_all = torch.zeros(r, n, dtype=COMPUTE, device=DEVICE)
    for t, tau in enumerate(taus):
        residual = tau - u_c @ (u_c.T @ tau)
        if norm(residual) <= ZERO_NORM:
            continue
        ut, st, vht = svd(residual)
        u_all[:, t * d:(t + 1) * d] = ut[:, :d]
        s_all[t * d:(t + 1) * d] = st[:d]
        v_all[t * d:(t + 1) * d, :] = vht[:d, :]
    u_all[:, specific:] = u_c
    s_all[specific:] = s_c
    v_all[specific:, :] = vh_c
    u_perp, v_perp = polar(u_all), polar(v_all)
    return (ALPHA * s_all.mean().item()) * (u_perp @ v_perp)


def merge_leaf(method: str, name: str, taus: list[torch.Tensor], matrix: bool) -> torch.Tensor:
    if not matrix:
        return mean(taus) if method == "resmerge" else ALPHA * mean(taus)
    if method == "resmerge":
        return resmerge_matrix(taus, family(name))
    if method == "tsv":
        return tsv_matrix(taus, name)
    if method == "iso_c":
        return iso_c_matrix(taus)
    return iso_cts_matrix(taus)


# ---------------------------------------------------------------------------
# Checkpoints


class Reader:
    """Tensor-by-name access to a safetensors checkpoint directory (single file or shards)."""

    def __init__(self, directory: str):
        self.directory = pathlib.Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            single = self.directory / "model.safetensors"
            if not single.exists():
                raise SystemExit(f"{directory}: no model.safetensors or index")
            with safe_open(str(single), framework="pt") as handle:
                self.files = {name: single.name for name in handle.keys()}
        self.handles = {f: safe_open(str(self.directory / f), framework="pt")
                        for f in sorted(set(self.files.values()))}

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.files[name]].get_tensor(name)


def write_output(output: pathlib.Path, base_dir: pathlib.Path, merged: dict,
                 out_dtype: str | None, base_dtypes: set) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for stale in list(output.glob("*.safetensors")) + list(output.glob("*.index.json")):
        stale.unlink()
    save_file(merged, str(output / "model.safetensors"), metadata={"format": "pt"})
    config_path = base_dir / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if out_dtype is None:
            floating = sorted(str(d).removeprefix("torch.") for d in base_dtypes)
            dtype_name = floating[0] if len(floating) == 1 else None
        else:
            dtype_name = out_dtype
        if dtype_name is not None:
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = dtype_name
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for side in SIDE_FILES:
        if (base_dir / side).exists():
            shutil.copyfile(base_dir / side, output / side)


# ---------------------------------------------------------------------------
# Driver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=["resmerge", "tsv", "iso_c",
                                                             "iso_cts"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--experts", required=True, help="comma-separated expert dirs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="output dtype (default: each base tensor's dtype)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: all usable cores)")
    parser.add_argument("--compute-dtype", choices=["float32", "float64"], default="float32",
                        help="float32 (METHODS.md, the baseline); float64 only to get a "
                             "high-precision reference for error floors")
    parser.add_argument("--device", default="cpu",
                        help="torch device (cpu, the baseline; cuda: a GPU comparison)")
    args = parser.parse_args(argv)
    global COMPUTE, DEVICE
    COMPUTE = torch.float64 if args.compute_dtype == "float64" else torch.float32
    DEVICE = torch.device(args.device)
    start = time.perf_counter()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    base_dir = pathlib.Path(args.base)
    expert_dirs = [e for e in args.experts.split(",") if e]
    if not expert_dirs:
        parser.error("--experts is empty")
    base = Reader(args.base)
    experts = [Reader(e) for e in expert_dirs]
    out_dtype = DTYPES[args.dtype] if args.dtype else None

    merged, base_dtypes = {}, set()
    counts = {"tensors": 0, "matrices": 0, "non_matrix": 0, "copied": 0}
    for name in base.names():
        b = base.get(name)
        counts["tensors"] += 1
        if b.dtype not in FLOATING:
            merged[name] = b.contiguous()
            counts["copied"] += 1
            continue
        base_dtypes.add(b.dtype)
        b32 = b.to(DEVICE, COMPUTE)
        taus = []
        for e, reader in zip(expert_dirs, experts):
            if name not in reader.files:
                raise SystemExit(f"{e}: missing tensor {name}")
            x = reader.get(name)
            if x.shape != b.shape:
                raise SystemExit(f"{e}: {name} has shape {tuple(x.shape)}, base {tuple(b.shape)}")
            taus.append(x.to(DEVICE, COMPUTE) - b32)
        matrix = is_matrix(name, b)
        counts["matrices" if matrix else "non_matrix"] += 1
        delta = merge_leaf(args.method, name, taus, matrix)
        merged[name] = (b32 + delta).to(out_dtype or b.dtype).cpu().contiguous()
    merge_seconds = time.perf_counter() - start
    write_output(pathlib.Path(args.output), base_dir, merged, args.dtype, base_dtypes)
    wall = time.perf_counter() - start
    print(f"torch_spectral {args.method}: {counts['tensors']} tensors ({counts['matrices']} "
          f"matrix leaves, {counts['non_matrix']} non-matrix, {counts['copied']} copied), "
          f"{len(expert_dirs)} experts, {threads} threads, device {DEVICE}")
    print(f"total {wall:.2f} s wall (merge {merge_seconds:.2f} s); "
          f"torch.linalg.svd {SVD_SECONDS:.2f} s in {SVD_CALLS} calls")
    print("@@" + json.dumps({"method": args.method, "total_s": wall, "merge_s": merge_seconds,
                             "svd_s": SVD_SECONDS, "svd_calls": SVD_CALLS, "threads": threads,
                             "device": str(DEVICE),
                             **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
