"""jaxmerge: training-free merging of fine-tuned LLM experts in JAX.

Checkpoints become pytrees; every method is a pure, jitted, vmapped function of
one leaf's stacked task vectors, composed from a few combinators::

    import jaxmerge
    from jaxmerge import ops, spectral

    my_ties = jaxmerge.chain(ops.trim(0.2), ops.elect_sign(), ops.disjoint_mean(),
                             jaxmerge.scale(1.0))
    merged = jaxmerge.merge(my_ties, base_params, [expert_a, expert_b])

    # ResMerge without its head correction (the paper's "SRC-A w/o head" row):
    src_a_only = jaxmerge.route(
        {jaxmerge.matrix: jaxmerge.chain(spectral.spectral_split(), spectral.residual(),
                                         spectral.src_a())},
        default=ops.mean())

See ``jaxmerge.methods`` for the built-in methods and METHODS.md for their math.
"""

from jaxmerge import linalg, ops, sensitivity, spectral
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
    calibrate,
    dare_linear,
    dare_ties,
    della,
    iso_c,
    iso_cts,
    linear,
    model_stock,
    ram,
    ram_plus,
    resmerge,
    sar,
    slerp,
    star,
    task_arithmetic,
    ties,
    tsv,
)
from jaxmerge.methods import fisher as fisher_merging
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
    "calibrate",
    "chain",
    "dare_linear",
    "dare_ties",
    "della",
    "everything",
    "family",
    "iso_c",
    "iso_cts",
    "layers",
    "linalg",
    "fisher_merging",
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
    "resmerge",
    "route",
    "sar",
    "sensitivity",
    "rowwise",
    "scale",
    "slerp",
    "spectral",
    "star",
    "stats_pass",
    "task_arithmetic",
    "ties",
    "tsv",
)
