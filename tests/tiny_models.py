"""Tiny random Hugging Face causal LMs of every family jaxmerge.models supports (torch CPU).

``tiny_config("qwen3", tie_word_embeddings=True)`` builds a transformers config with local
defaults only (no hub); ``make_tiny_model`` writes a random float32 model of it with
``save_pretrained`` and returns the directory and the eager-attention torch model.
"""

from __future__ import annotations

import os
from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    # Larger than the 0.02 default: logits of a few units, so greedy decoding has clear winners
    # and float rounding cannot flip an argmax.
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str, **overrides):
    """A transformers config for a 2-layer, 32-wide model with GQA (4 query, 2 kv heads).

    Family specifics: qwen3 has ``head_dim=16`` (not hidden/heads) and q/k norms; qwen2 has
    q/k/v biases; mistral has ``sliding_window=None`` unless overridden; rope_theta differs per
    family so RoPE is really read from the config.
    """
    import transformers

    kwargs = dict(_COMMON)
    if family == "llama":
        cls = transformers.LlamaConfig
        kwargs.update(rope_theta=500000.0, architectures=["LlamaForCausalLM"])
    elif family == "qwen2":
        cls = transformers.Qwen2Config
        kwargs.update(rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"])
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        kwargs.update(head_dim=16, rope_theta=1000000.0, architectures=["Qwen3ForCausalLM"])
    elif family == "mistral":
        cls = transformers.MistralConfig
        kwargs.update(sliding_window=None, rope_theta=10000.0,
                      architectures=["MistralForCausalLM"])
    else:
        raise ValueError(f"unknown family {family!r} (known: {FAMILIES})")
    kwargs.update(overrides)
    return cls(**kwargs)


def make_tiny_model(family: str, out_dir: str | os.PathLike, *, seed: int = 0, **overrides):
    """Writes a random float32 model of ``tiny_config(family, **overrides)`` to ``out_dir``.

    Returns:
      ``(out_dir, torch_model)``; the torch model is in eval mode with eager attention.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir, model


TINY_WORDS = ("user", "assistant", ":", "?", ".", "the", "a", "cat", "dog", "sat", "on", "mat",
              "what", "is", "two", "plus", "three", "four", "five", "yes", "no", "red", "blue",
              "green")
"""Words of :func:`make_tiny_tokenizer` (after ``<pad> <s> </s> <unk>``, ids 0-3)."""

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}")


def make_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 128):
    """Saves a word-level tokenizer (no download) into ``out_dir`` and returns it.

    Ids: ``<pad>`` 0, ``<s>`` 1 (BOS, prepended by ``tokenizer(text)``), ``</s>`` 2 (EOS),
    ``<unk>`` 3, then :data:`TINY_WORDS`, then ``w{id}`` up to ``vocab_size`` (matching
    :data:`_COMMON`'s special ids and vocabulary). Words split on whitespace and punctuation;
    decoding joins words with spaces. Has a chat template (:data:`TINY_CHAT_TEMPLATE`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", *TINY_WORDS]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer
