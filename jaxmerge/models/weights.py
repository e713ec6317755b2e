"""Hugging Face tensor names <-> the NNX parameter tree, in one table.

Each rule pairs an HF name template with an NNX path template; ``{layer}`` and the other
fields match the same text on both sides. Linear weights are stored ``[out, in]`` by PyTorch
and ``[in, out]`` by ``nnx.Linear`` (its ``kernel``), so they are transposed both ways;
embeddings, norms and biases are copied as they are. With ``tie_word_embeddings`` the
checkpoint has no ``lm_head.weight`` and the model has no ``lm_head``.

- :func:`params_from_hf` / :func:`params_to_hf`: a flat ``{hf_name: array}`` dict <-> the
  nested params dict of :func:`jaxmerge.models.split`.
- :func:`load_model`: a checkpoint directory -> a ready :class:`CausalLM`, reading each tensor
  once through :class:`jaxmerge.io.Checkpoint` (no torch).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmerge.errors import CheckpointError, ConfigError
from jaxmerge.io.safetensors_io import Checkpoint
from jaxmerge.models.config import ModelConfig
from jaxmerge.models.model import CausalLM, Params

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF name pattern and its NNX path pattern (``.``-separated, ``{field}`` slots)."""

    hf_name: str
    nnx_path: str
    transpose: bool = False


_FIELDS = {"layer": r"\d+", "qkvo": "[qkvo]", "qk": "[qk]", "mlp": "gate|up|down"}
_LAYER = "model.layers.{layer}."

RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule("model.norm.weight", "norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", transpose=True),
    Rule(_LAYER + "input_layernorm.weight", "layers.{layer}.input_layernorm.scale"),
    Rule(_LAYER + "post_attention_layernorm.weight",
         "layers.{layer}.post_attention_layernorm.scale"),
    Rule(_LAYER + "self_attn.{qkvo}_proj.weight", "layers.{layer}.self_attn.{qkvo}_proj.kernel",
         transpose=True),
    Rule(_LAYER + "self_attn.{qkvo}_proj.bias", "layers.{layer}.self_attn.{qkvo}_proj.bias"),
    Rule(_LAYER + "self_attn.{qk}_norm.weight", "layers.{layer}.self_attn.{qk}_norm.scale"),
    Rule(_LAYER + "mlp.{mlp}_proj.weight", "layers.{layer}.mlp.{mlp}_proj.kernel",
         transpose=True),
    Rule(_LAYER + "mlp.{mlp}_proj.bias", "layers.{layer}.mlp.{mlp}_proj.bias"),
)
"""The rename table, HF name <-> NNX path."""

IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Checkpoint tensors that are not parameters (old Llama checkpoints store RoPE buffers)."""


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for field, regex in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{regex})")
    return re.compile(pattern)


_HF_PATTERNS = tuple((_compile(rule.hf_name), rule) for rule in RULES)
_NNX_PATTERNS = tuple((_compile(rule.nnx_path), rule) for rule in RULES)


def _path_from_string(path: str) -> Path:
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


def _path_to_string(path: Path) -> str:
    return ".".join(str(part) for part in path)


def hf_to_nnx(name: str) -> tuple[Path, bool] | None:
    """The NNX path of an HF tensor name and whether it is transposed; None if unknown."""
    for pattern, rule in _HF_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return _path_from_string(rule.nnx_path.format(**match.groupdict())), rule.transpose
    return None


def nnx_to_hf(path: Path) -> tuple[str, bool]:
    """The HF tensor name of an NNX parameter path and whether it is transposed.

    Raises:
      KeyError: the path has no HF name.
    """
    text = _path_to_string(path)
    for pattern, rule in _NNX_PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            return rule.hf_name.format(**match.groupdict()), rule.transpose
    raise KeyError(f"parameter {text!r} has no Hugging Face name")


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _unflatten(flat: Mapping[Path, object]) -> Params:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _abstract_params(config: ModelConfig, dtype) -> tuple[nnx.GraphDef, dict[Path, object]]:
    """The graph and the flat ``{path: ShapeDtypeStruct}`` of a model, nothing allocated."""
    abstract = nnx.eval_shape(
        lambda: CausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, _flatten(nnx.to_pure_dict(state))


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``config`` holds, with its HF (``[out, in]``) shape."""
    _, flat = _abstract_params(config, jnp.float32)
    shapes = {}
    for path, leaf in flat.items():
        name, transpose = nnx_to_hf(path)
        shapes[name] = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)
    return shapes


def _unexpected(names: Iterable[str], expected: Mapping[str, object],
                config: ModelConfig) -> list[str]:
    """Names that neither map to a parameter nor may be ignored."""
    extra = []
    for name in names:
        if name in expected or IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # transformers ties it to the embedding and ignores the stored copy
        extra.append(name)
    return extra


def _convert(array, transpose: bool, dtype) -> jax.Array:
    array = np.asarray(array)
    if transpose:
        array = array.T
    return jnp.asarray(array, dtype=dtype if dtype is not None else array.dtype)


def _assemble(config: ModelConfig, read: Callable[[str], np.ndarray],
              available: Mapping[str, tuple[int, ...]], dtype, where: str,
              locate: Callable[[str], str]) -> Params:
    """Reads, checks and converts every parameter; raises once with all the problems."""
    expected = hf_shapes(config)
    problems = []
    for name, shape in expected.items():
        if name not in available:
            problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
        elif tuple(available[name]) != shape:
            problems.append(f"tensor {name!r} in {locate(name)} has shape "
                            f"{list(available[name])}, but config.json implies {list(shape)}")
    for name in _unexpected(available, expected, config):
        problems.append(f"tensor {name!r} in {locate(name)} is not a parameter of a "
                        f"{config.model_type} model with this config.json")
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{where}: {shown}{more}")
    flat = {}
    for name in expected:
        path, transpose = hf_to_nnx(name)
        flat[path] = _convert(read(name), transpose, dtype)
    return _unflatten(flat)


def params_from_hf(tensors: Mapping[str, object], config: ModelConfig, dtype=None) -> Params:
    """HF-named arrays -> the nested params dict of :func:`jaxmerge.models.split`.

    Args:
      tensors: ``{hf_name: array}`` (numpy or jax), e.g. a merge result.
      config: the architecture.
      dtype: cast every parameter to it; None keeps each tensor's dtype.

    Raises:
      CheckpointError: a missing, mis-shaped or unexpected tensor (all of them, named).
    """
    shapes = {name: tuple(np.shape(array)) for name, array in tensors.items()}
    return _assemble(config, tensors.__getitem__, shapes, dtype, "tensors",
                     lambda name: "the given tensors")


def params_to_hf(params: Params) -> dict[str, np.ndarray]:
    """The nested params dict -> ``{hf_name: numpy array}`` in HF layout (dtype kept).

    The inverse of :func:`params_from_hf`: Linear kernels are transposed back to ``[out, in]``.
    Works on any pytree of the params' structure (gradients, Fisher diagonals, ...).
    """
    tensors = {}
    for path, leaf in _flatten(params).items():
        name, transpose = nnx_to_hf(path)
        array = np.asarray(leaf)
        tensors[name] = np.ascontiguousarray(array.T) if transpose else array
    return tensors


def load_params(directory, config: ModelConfig | None = None, dtype=jnp.float32) -> Params:
    """Reads a checkpoint directory's weights into the nested params dict.

    Args:
      directory: an HF safetensors checkpoint (single file or sharded).
      config: the architecture; default read from the directory's ``config.json``.
      dtype: the parameter dtype (default float32); None keeps the stored dtypes.

    Raises:
      CheckpointError: a missing, mis-shaped or unexpected tensor, naming it and its file.
      ConfigError: no or an unsupported ``config.json``.
    """
    with Checkpoint.open(directory) as checkpoint:
        if config is None:
            config = _config_of(checkpoint)
        shapes = {name: entry.shape for name, entry in checkpoint.tensors.items()}
        return _assemble(config, checkpoint.read, shapes, dtype, str(checkpoint.directory),
                         lambda name: str(checkpoint.tensors[name].path))


def _config_of(checkpoint: Checkpoint) -> ModelConfig:
    path = pathlib.Path(checkpoint.directory) / "config.json"
    if checkpoint.config is None:
        raise ConfigError(f"{path} does not exist: cannot tell the model's architecture")
    return ModelConfig.from_hf_file(checkpoint.config, path)


def load_model(directory, dtype=jnp.float32, compute_dtype=None) -> CausalLM:
    """A :class:`CausalLM` with the weights of an HF checkpoint directory.

    Args:
      directory: an HF safetensors checkpoint with its ``config.json``.
      dtype: the parameter dtype (default float32; e.g. ``jnp.bfloat16`` to halve memory).
      compute_dtype: the computation dtype; default ``dtype``.

    Raises:
      CheckpointError: a missing, mis-shaped or unexpected tensor, naming it and its file.
      ConfigError: no or an unsupported ``config.json``, naming the field.
    """
    with Checkpoint.open(directory) as checkpoint:
        config = _config_of(checkpoint)
    params = load_params(directory, config, dtype)
    return from_params(config, params, compute_dtype or dtype)


def from_params(config: ModelConfig, params: Params, compute_dtype=None) -> CausalLM:
    """A :class:`CausalLM` around an existing params dict (no copy).

    ``compute_dtype`` defaults to the dtype of the embedding.
    """
    compute_dtype = compute_dtype or params["embed_tokens"]["embedding"].dtype
    graphdef, _ = nnx.split(nnx.eval_shape(
        lambda: CausalLM(config, dtype=compute_dtype, param_dtype=compute_dtype,
                         rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)
