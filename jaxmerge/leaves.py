"""What jaxmerge knows about one named tensor (a *leaf*) before reading it.

Conventions from METHODS.md §0: a leaf's *module family* comes from its name
(first match wins), and a *matrix leaf* is a floating 2-D tensor that is not an
embedding, lm_head or norm. Spectral methods treat matrix leaves specially;
every other leaf takes the method's non-matrix rule.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

FAMILY_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("self_attn", ".attn.", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("ffn", ("mlp", "ffn", "feed_forward", "gate_proj", "up_proj", "down_proj")),
    ("norm", ("norm", "ln_", "layernorm")),
    ("embedding", ("embed_tokens", "wte", "word_embeddings", "lm_head")),
)
"""Substrings that decide a leaf's module family, in priority order (METHODS.md §0)."""

EMBEDDING_PATTERNS = ("embed_tokens", "wte", "word_embeddings", "lm_head")
NORM_PATTERNS = ("norm", "ln_", "layernorm")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def module_family(name: str) -> str:
    """Returns 'attention', 'ffn', 'norm', 'embedding' or 'other' for a tensor name."""
    lowered = name.lower()
    for family, patterns in FAMILY_PATTERNS:
        if any(pattern in lowered for pattern in patterns):
            return family
    return "other"


def is_embedding_name(name: str) -> bool:
    """True for token embeddings and the LM head (rows indexed by vocabulary)."""
    lowered = name.lower()
    return any(pattern in lowered for pattern in EMBEDDING_PATTERNS)


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), if any."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """Static facts about one leaf, available to merges at trace time.

    Attributes:
      name: the tensor's name in the checkpoint (e.g. ``model.layers.0.mlp.up_proj.weight``).
      shape: the shape merged (for vocabulary-mismatched embeddings, the common rows).
      dtype: the stored dtype of the base tensor, as a numpy dtype name.
      family: module family from :func:`module_family`.
      layer: decoder layer index, or None for embeddings, final norm, lm_head.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    family: str = "other"
    layer: int | None = None

    @classmethod
    def from_name(cls, name: str, shape, dtype="float32") -> LeafInfo:
        return cls(
            name=name,
            shape=tuple(int(d) for d in shape),
            dtype=np.dtype(dtype).name,
            family=module_family(name),
            layer=layer_index(name),
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat16"))

    @property
    def is_matrix(self) -> bool:
        """ndim == 2, floating, not an embedding / lm_head and not a norm (METHODS.md §0)."""
        lowered = self.name.lower()
        return (
            self.ndim == 2
            and self.is_floating
            and not is_embedding_name(self.name)
            and not any(pattern in lowered for pattern in NORM_PATTERNS)
        )

    def group_key(self) -> tuple:
        """The static facts a merge may branch on; leaves sharing it share one compiled call."""
        return (self.shape, self.dtype, self.family, self.is_matrix)
