"""The architecture of a decoder-only causal LM, read from a Hugging Face ``config.json``.

:class:`ModelConfig` is a frozen, hashable dataclass: it is static data of the NNX modules and
may key a ``jax.jit`` cache. :meth:`ModelConfig.from_hf` validates the dict and names the
field it cannot honour, so an unsupported checkpoint fails before any weight is read.

Families (``model_type``, ``architectures``):

- ``llama`` / ``LlamaForCausalLM`` (Llama 2/3, SmolLM2): optional ``attention_bias`` (q, k, v, o)
  and ``mlp_bias``.
- ``mistral`` / ``MistralForCausalLM``: no biases; ``sliding_window`` on every layer (or null).
- ``qwen2`` / ``Qwen2ForCausalLM``: biases on q, k and v only; sliding window only when
  ``use_sliding_window`` and only from layer ``max_window_layers`` on (or per ``layer_types``).
- ``qwen3`` / ``Qwen3ForCausalLM``: per-head RMSNorm on queries and keys (``q_norm``, ``k_norm``)
  before RoPE, an explicit ``head_dim``, optional ``attention_bias``; sliding as in Qwen2.

RoPE settings come from ``rope_parameters`` (transformers 5) or from the older top-level
``rope_theta`` and ``rope_scaling``. Supported ``rope_type``: ``default``, ``linear`` and
``llama3`` (Llama 3.1+ frequency-dependent scaling).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from jaxmerge.errors import ConfigError

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""Supported ``model_type`` -> the ``architectures`` entry it must carry."""

ROPE_TYPES = ("default", "linear", "llama3")
"""Supported ``rope_type`` values."""

DEFAULT_ROPE_THETA = 10000.0
DEFAULT_RMS_NORM_EPS = 1e-6
_QWEN3_DEFAULT_HEAD_DIM = 128
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, RoFormer), half-rotation layout as in HF.

    Attributes:
      theta: the base wavelength (``rope_theta``; default 10000).
      rope_type: ``"default"``, ``"linear"`` (frequencies divided by ``factor``) or ``"llama3"``.
      factor: the scaling factor of ``linear`` and ``llama3`` (1.0 otherwise).
      low_freq_factor: ``llama3`` only.
      high_freq_factor: ``llama3`` only.
      original_max_position_embeddings: ``llama3`` only: the pre-training context length.
    """

    theta: float = DEFAULT_ROPE_THETA
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (pre-norm, SwiGLU MLP, RoPE, grouped-query attention).

    Attributes:
      model_type: ``llama``, ``mistral``, ``qwen2`` or ``qwen3``.
      vocab_size: rows of the token embedding (and of the output head).
      hidden_size: the residual stream width.
      intermediate_size: the MLP width.
      num_layers: decoder layers.
      num_heads: query heads.
      num_kv_heads: key/value heads (``num_heads`` must be a multiple; fewer = GQA).
      head_dim: the width of one head.
      rms_norm_eps: epsilon of every RMSNorm (default 1e-6).
      rope: the RoPE settings.
      tie_word_embeddings: the output head is the transposed token embedding (no ``lm_head``).
      qkv_bias: biases on the q, k and v projections.
      o_bias: a bias on the output projection.
      mlp_bias: biases on the gate, up and down projections.
      qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
      sliding_windows: per layer, the attention window (a key is seen when the query is fewer
        than ``window`` tokens after it) or None for full causal attention.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {field} must be a positive integer, "
                                  f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"model config: {len(self.sliding_windows)} sliding windows for "
                f"{self.num_layers} layers")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Reads a Hugging Face ``config.json`` dict (transformers 4 or 5 layout).

        Raises:
          ConfigError: an unsupported family, activation, RoPE type or field value; the
            message names the field.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"model config must be a dict, got {type(config).__name__}")
        model_type = _model_type(config)
        if "quantization_config" in config:
            raise ConfigError("config.json: quantization_config is set; quantised checkpoints "
                              "are not supported (dequantise first)")
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise ConfigError(f"config.json: hidden_act={activation!r} is not supported "
                              "(only 'silu', the SwiGLU MLP)")
        num_heads = _required(config, "num_attention_heads")
        hidden_size = _required(config, "hidden_size")
        num_layers = _required(config, "num_hidden_layers")
        head_dim = _head_dim(config, model_type, hidden_size, num_heads)
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=_required(config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required(config, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
            rope=rope_config_from_hf(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type != "mistral" and attention_bias),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(config, model_type, num_layers),
        )

    @classmethod
    def from_dir(cls, directory) -> ModelConfig:
        """Reads ``config.json`` of a checkpoint directory (see :meth:`from_hf`)."""
        path = pathlib.Path(directory) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        return cls.from_hf_file(config, path)

    @classmethod
    def from_hf_file(cls, config, path) -> ModelConfig:
        """:meth:`from_hf`, with errors naming the file ``path`` the dict was read from."""
        try:
            return cls.from_hf(config)
        except ConfigError as error:
            message = str(error).removeprefix("config.json").removeprefix(":").lstrip()
            raise ConfigError(f"{path}: {message}") from None

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def _model_type(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"config.json: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    architectures = config.get("architectures")
    if architectures is not None:
        expected = ARCHITECTURES[model_type]
        if not isinstance(architectures, list) or architectures != [expected]:
            raise ConfigError(f"config.json: architectures={architectures!r} is not supported "
                              f"for model_type={model_type!r} (expected [{expected!r}])")
    return model_type


def _head_dim(config: Mapping[str, Any], model_type: str, hidden_size, num_heads) -> int:
    """``head_dim`` as transformers reads it: Qwen2 always derives it, Qwen3 defaults to 128,
    Llama and Mistral default to ``hidden_size // num_attention_heads``."""
    head_dim = config.get("head_dim")
    if model_type != "qwen2" and head_dim is not None:
        return head_dim
    if model_type == "qwen3":
        return _QWEN3_DEFAULT_HEAD_DIM
    if (not isinstance(num_heads, int) or not isinstance(hidden_size, int) or num_heads <= 0
            or hidden_size % num_heads):
        raise ConfigError(f"config.json: hidden_size={hidden_size!r} is not divisible by "
                          f"num_attention_heads={num_heads!r} and there is no head_dim")
    return hidden_size // num_heads


def _required(config: Mapping[str, Any], field: str):
    if field not in config:
        raise ConfigError(f"config.json: no field {field!r}")
    return config[field]


def rope_config_from_hf(config: Mapping[str, Any]) -> RopeConfig:
    """The RoPE settings of a config dict: ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling``.

    Raises:
      ConfigError: an unsupported ``rope_type`` (named), partial rotary embedding, or a
        ``llama3`` entry without its parameters.
    """
    params = config.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        field = "rope_scaling"
        params.setdefault("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA))
    if not isinstance(params, Mapping):
        raise ConfigError(f"config.json: {field} must be a dict, got {params!r}")
    if any(isinstance(value, Mapping) for value in params.values()):
        raise ConfigError(f"config.json: per-layer-type {field} are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: {field}.rope_type={rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor={partial!r} is not supported "
                          "(only 1.0)")
    theta = float(params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(_rope_key(params, field,
                                                                                  "factor")))
    values = {key: _rope_key(params, field, key) for key in _LLAMA3_KEYS}
    if values["low_freq_factor"] == values["high_freq_factor"]:
        raise ConfigError(f"config.json: {field} low_freq_factor and high_freq_factor must "
                          "differ for rope_type='llama3'")
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position_embeddings=int(values["original_max_position_embeddings"]),
    )


def _rope_key(params: Mapping[str, Any], field: str, key: str):
    if key not in params:
        raise ConfigError(f"config.json: {field} of rope_type={params.get('rope_type')!r} "
                          f"needs {key!r}")
    return params[key]


def _sliding_windows(config: Mapping[str, Any], model_type: str,
                     num_layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window as transformers applies it (None = full attention)."""
    if not isinstance(num_layers, int) or num_layers <= 0:
        return ()
    window = config.get("sliding_window")
    if model_type == "llama":
        return (None,) * num_layers
    if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise ConfigError(f"config.json: sliding_window={window!r} must be a positive integer "
                          "or null")
    if model_type == "mistral":
        return (window,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        first_sliding = config.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= first_sliding
                       else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention",
                                                                   "sliding_attention"}:
        raise ConfigError(f"config.json: layer_types={layer_types!r} must list "
                          f"'full_attention' or 'sliding_attention' for each of {num_layers} "
                          "layers")
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
