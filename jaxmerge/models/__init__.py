"""Flax NNX decoder-only causal LMs (Llama, Mistral, Qwen2, Qwen3) loaded from HF checkpoints.

Used for data-aware statistics (Fisher information) and for evaluating merged models without
PyTorch. The logits match transformers' float32 PyTorch models to ~1e-5.

Example::

  model = load_model("path/to/checkpoint")              # float32 parameters
  logits = forward(model, input_ids, attention_mask)    # jitted
  tokens = generate(model, input_ids, attention_mask, max_new_tokens=32, eos_token_id=2)
  apply_fn, params = functional(model)                  # apply_fn(params, batch) -> logits
  tensors = params_to_hf(params)                        # {hf_name: numpy array}
"""

from jaxmerge.models.cache import KVCache, init_cache
from jaxmerge.models.config import ModelConfig, RopeConfig
from jaxmerge.models.generate import generate
from jaxmerge.models.layers import (
    MLP,
    Attention,
    DecoderLayer,
    RMSNorm,
    attention_mask,
    dot_product_attention,
)
from jaxmerge.models.model import (
    CausalLM,
    Params,
    apply,
    forward,
    functional,
    merge,
    positions_from_mask,
    split,
)
from jaxmerge.models.rope import apply_rope, inverse_frequencies
from jaxmerge.models.weights import (
    RULES,
    from_params,
    hf_shapes,
    hf_to_nnx,
    load_model,
    load_params,
    nnx_to_hf,
    params_from_hf,
    params_to_hf,
)

__all__ = [
    "MLP",
    "RULES",
    "Attention",
    "CausalLM",
    "DecoderLayer",
    "KVCache",
    "ModelConfig",
    "Params",
    "RMSNorm",
    "RopeConfig",
    "apply",
    "apply_rope",
    "attention_mask",
    "dot_product_attention",
    "forward",
    "from_params",
    "functional",
    "generate",
    "hf_shapes",
    "hf_to_nnx",
    "init_cache",
    "inverse_frequencies",
    "load_model",
    "load_params",
    "merge",
    "nnx_to_hf",
    "params_from_hf",
    "params_to_hf",
    "positions_from_mask",
    "split",
]
