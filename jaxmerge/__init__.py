"""jaxmerge: training-free merging of fine-tuned LLM experts in JAX.

Checkpoints become pytrees; every method is a pure, jitted, vmapped function of
one leaf's stacked task vectors, composed from a few combinators::

    import jaxmerge
    from jaxmerge import ops

    my_ties = jaxmerge.chain(ops.trim(0.2), ops.elect_sign(), ops.disjoint_mean(),
                             jaxmerge.scale(1.0))
    merged = jaxmerge.merge(my_ties, base_params, [expert_a, expert_b])

See ``jaxmerge.methods`` for the built-in methods and METHODS.md for their math.
"""

from jaxmerge import ops
from jaxmerge.algebra import (
    LeafContext,
    Merge,
    Predicate,
    StatsPass,
    add,
    chain,
    everything,
    family,
    layers,
    matrix,
    name,
    ndim,
    requires_experts,
    route,
    rowwise,
    scale,
    stats_pass,
)
from jaxmerge.api import MergeResult, merge, merge_checkpoints
from jaxmerge.errors import CheckpointError, ConfigError, JaxmergeError, MismatchError
from jaxmerge.leaves import LeafInfo
from jaxmerge.methods import (
    REGISTRY,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    linear,
    model_stock,
    ram,
    ram_plus,
    slerp,
    task_arithmetic,
    ties,
)
from jaxmerge.version import __version__

__all__ = (
    "REGISTRY",
    "CheckpointError",
    "ConfigError",
    "JaxmergeError",
    "LeafContext",
    "LeafInfo",
    "Merge",
    "MergeResult",
    "MismatchError",
    "Predicate",
    "StatsPass",
    "__version__",
    "add",
    "breadcrumbs",
    "breadcrumbs_ties",
    "chain",
    "dare_linear",
    "dare_ties",
    "della",
    "everything",
    "family",
    "layers",
    "linear",
    "matrix",
    "merge",
    "merge_checkpoints",
    "model_stock",
    "name",
    "ndim",
    "ops",
    "ram",
    "ram_plus",
    "requires_experts",
    "route",
    "rowwise",
    "scale",
    "slerp",
    "stats_pass",
    "task_arithmetic",
    "ties",
)
