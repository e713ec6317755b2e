"""Shared pieces of the testbed: checkpoints, tokenised data, losses, stage caching.

- Checkpoints are Hugging Face directories (``config.json``, ``model.safetensors``, tokenizer
  files) written in bf16 by :func:`save_checkpoint` and read into float32 parameters of
  :mod:`jaxmerge.models` by :func:`load_checkpoint`; transformers'
  ``AutoModelForCausalLM.from_pretrained`` loads them as they are.
- Data: (prompt, response) pairs are tokenised exactly as :mod:`jaxmerge.fisher.data` does
  (prompt with the tokenizer's special tokens or chat template; response without special tokens
  plus EOS), then padded to one fixed length per task so a training step compiles once.
- Stages (base, experts, Fisher, merges) write into a directory with a ``stage.json`` spec;
  :func:`is_done` lets a rerun with the same spec skip them (``--workdir`` caching).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxmerge import models
from jaxmerge.fisher import data as data_lib
from jaxmerge.io import hf
from jaxmerge.io.safetensors_io import ShardedWriter

STAGE_FILE = "stage.json"


# ---------------------------------------------------------------------------
# seeds and stage caching


def stable_seed(*parts) -> int:
    """A 31-bit seed from a stable hash of ``parts`` (independent of Python's hash salt)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def spec_hash(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(directory, spec) -> bool:
    """Whether ``directory`` holds a finished stage with exactly ``spec``."""
    path = pathlib.Path(directory) / STAGE_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text())["spec_hash"] == spec_hash(spec)
    except (ValueError, KeyError):
        return False


def mark_done(directory, spec, **record) -> None:
    """Records a finished stage (written last, so an interrupted stage is redone)."""
    path = pathlib.Path(directory) / STAGE_FILE
    path.write_text(json.dumps({"spec_hash": spec_hash(spec), "spec": spec, **record},
                               indent=1, default=str) + "\n")


def read_stage(directory) -> dict:
    return json.loads((pathlib.Path(directory) / STAGE_FILE).read_text())


def fresh_dir(directory) -> pathlib.Path:
    """An empty ``directory`` (an unfinished or stale one is removed first)."""
    directory = pathlib.Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


# ---------------------------------------------------------------------------
# checkpoints


def llama_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, intermediate_size: int, max_positions: int) -> dict:
    """A Hugging Face ``LlamaForCausalLM`` ``config.json`` dict (untied head, SwiGLU, RoPE)."""
    from experiments import tokenizer as tok

    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads, "hidden_act": "silu",
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": tok.BOS, "eos_token_id": tok.EOS, "pad_token_id": tok.PAD,
        "torch_dtype": "bfloat16", "use_cache": True,
    }


def init_params(hf_config: dict, seed: int) -> models.Params:
    """Fresh float32 parameters: N(0, 0.02²) matrices and embeddings, unit norms (GPT-2 style)."""
    config = models.ModelConfig.from_hf(hf_config)
    model = nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))
    _, shapes = models.split(model)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if "norm" in name:
            values.append(jnp.ones(leaf.shape, jnp.float32))
        else:
            values.append(0.02 * jax.random.normal(key, leaf.shape, jnp.float32))
    return jax.tree.unflatten(treedef, values)


def save_checkpoint(out_dir, params: models.Params, hf_config: dict, tokenizer_dir,
                    dtype: str = "bfloat16", record: dict | None = None) -> pathlib.Path:
    """Writes an HF checkpoint: config.json, model.safetensors (``dtype``), tokenizer files.

    With ``tie_word_embeddings`` only ``embed_tokens`` is stored, as transformers does.
    """
    target = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}[dtype]
    out_dir = fresh_dir(out_dir)
    tensors = models.params_to_hf(params)
    if hf_config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    specs = [(name, target, tuple(array.shape)) for name, array in tensors.items()]
    with ShardedWriter(out_dir, specs, 5 * 10**9,
                       metadata={"format": "pt", "jaxmerge": "experiments"}) as writer:
        for name, array in tensors.items():
            writer.write(name, np.asarray(array, np.float32).astype(target))
    config = dict(hf_config, torch_dtype=dtype)
    config.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    hf.copy_auxiliary(tokenizer_dir, out_dir)
    if record is not None:
        (out_dir / "training.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return out_dir


def load_checkpoint(directory) -> tuple[dict, nnx.GraphDef, models.Params]:
    """``(hf_config, graphdef, float32 params)`` of an HF checkpoint directory."""
    hf_config = json.loads((pathlib.Path(directory) / "config.json").read_text())
    model = models.load_model(directory, dtype=jnp.float32)
    graphdef, params = models.split(model)
    return hf_config, graphdef, params


def load_tokenizer(directory):
    return data_lib.load_tokenizer(directory)


# ---------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Fixed-length arrays of tokenised (prompt, response) pairs.

    Attributes:
      input_ids: ``int32[n, length]``, right-padded with ``pad_id``.
      attention_mask: ``int32[n, length]``.
      target_mask: ``bool[n, length]``: the response tokens (and EOS), the scored ones.
      prompts: ``int32[n, prompt_length]``, the prompts alone, left-padded (for decoding).
      prompt_mask: ``int32[n, prompt_length]``.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    prompts: np.ndarray
    prompt_mask: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index) -> Encoded:
        return Encoded(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def training_batch(self, rows) -> dict[str, jax.Array]:
        """``input_ids``, ``attention_mask`` and ``target_mask`` of ``rows``, as device arrays
        (the batch of a cross-entropy step on the response tokens)."""
        return {"input_ids": jnp.asarray(self.input_ids[rows]),
                "attention_mask": jnp.asarray(self.attention_mask[rows]),
                "target_mask": jnp.asarray(self.target_mask[rows])}


def encode(tokenizer, pairs: Sequence[tuple[str, str]], length: int, prompt_length: int,
           chat_template: bool = False) -> Encoded:
    """Tokenises (prompt, response) pairs as :func:`jaxmerge.fisher.data.tokenize_example`.

    Raises:
      ValueError: a pair longer than ``length`` or a prompt longer than ``prompt_length``.
    """
    examples = [data_lib.Example(prompt=p, response=r) for p, r in pairs]
    tokenized = data_lib.tokenize(examples, tokenizer, max_length=None,
                                  chat_template=chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(tokenized)
    input_ids = np.full((n, length), pad, np.int32)
    attention = np.zeros((n, length), np.int32)
    target = np.zeros((n, length), bool)
    prompts = np.full((n, prompt_length), pad, np.int32)
    prompt_mask = np.zeros((n, prompt_length), np.int32)
    for row, example in enumerate(tokenized):
        ids, first = example.input_ids, example.first_target
        if len(ids) > length or first > prompt_length:
            raise ValueError(f"example {row} has {len(ids)} tokens ({first} prompt tokens); "
                             f"the task allows {length} ({prompt_length})")
        input_ids[row, :len(ids)] = ids
        attention[row, :len(ids)] = 1
        target[row, first:len(ids)] = True
        prompts[row, prompt_length - first:] = ids[:first]
        prompt_mask[row, prompt_length - first:] = 1
    return Encoded(input_ids, attention, target, prompts, prompt_mask)


def token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``[batch, seq]`` log p(token_t | tokens_<t) (position 0 gets 0)."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def batches(rng: np.random.Generator, size: int, batch_size: int, steps: int):
    """``steps`` index batches of ``batch_size``, epochs of random permutations."""
    order = np.array([], np.int64)
    for _ in range(steps):
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(size)])
        yield order[:batch_size]
        order = order[batch_size:]


def adamw(learning_rate: float, steps: int, warmup: int, weight_decay: float,
          clip: float = 1.0):
    """AdamW (Loshchilov & Hutter 2019) with linear warmup, cosine decay to 10 %, clipping."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup, 1), max(steps, warmup + 1), learning_rate * 0.1)
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay))
