"""Tiny random Hugging Face checkpoints for tests (torch + transformers, CPU, no downloads).

``make_tiny_llama`` writes a random-init ``LlamaForCausalLM`` (≈20k parameters by default,
optionally sharded); ``make_tiny_expert`` derives an expert from it with
:func:`jaxmerge.demo.derive_expert`; ``load_state`` reads any checkpoint dir back as float32
numpy arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from jaxmerge.demo import derive_expert, weight_files

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def tiny_llama_config(
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
):
    """A ``LlamaConfig`` for a tiny model (GQA when ``num_kv_heads < num_heads``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def make_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    vocab_size: int = 64,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a random-init ``LlamaForCausalLM`` as an HF safetensors checkpoint in ``out_dir``.

    The weights are initialised in float32 under ``torch.manual_seed(seed)`` and then cast, so
    the bf16/fp16 versions of one seed are roundings of the float32 one. ``max_shard_size``
    (e.g. ``"20KB"``) gives several shards plus ``model.safetensors.index.json``. Only
    config.json, generation_config.json and the weights are written (no tokenizer).
    """
    import torch
    from transformers import LlamaForCausalLM

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {TORCH_DTYPES}, got {dtype!r}")
    config = tiny_llama_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    out_dir = Path(out_dir)
    if max_shard_size is None:
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


def make_tiny_expert(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    density: float = 0.3,
    **kwargs,
) -> Path:
    """An RL-like expert of a tiny base: ``derive_expert`` with a density high enough that
    every tensor of a tiny model (even a 32-entry norm) gets changes. ``kwargs`` go through
    (``rank``, ``scale``, ``dtype``, ``regime``)."""
    return derive_expert(base_dir, out_dir, seed, density=density, **kwargs)


def load_state(checkpoint_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of an HF safetensors checkpoint dir (sharded or not) as float32 numpy."""
    from safetensors import safe_open

    checkpoint_dir = Path(checkpoint_dir)
    state = {}
    for name in weight_files(checkpoint_dir):
        with safe_open(checkpoint_dir / name, framework="numpy") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key).astype(np.float32)
    return state


def stored_dtypes(checkpoint_dir: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors dtype string (``"BF16"``, ``"F32"``, ...) as stored."""
    from safetensors import safe_open

    checkpoint_dir = Path(checkpoint_dir)
    dtypes = {}
    for name in weight_files(checkpoint_dir):
        with safe_open(checkpoint_dir / name, framework="numpy") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    return dtypes


def read_config(checkpoint_dir: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict."""
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())
