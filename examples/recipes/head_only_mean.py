"""ResMerge ablation "Head-only mean" (paper Table 2): average only the rank-1 spectral heads.

    python -m jaxmerge.main --recipe=examples/recipes/head_only_mean.py \
        --base=BASE --experts=A,B,C --output=OUT
"""

import jaxmerge
from jaxmerge import ops, spectral

merge = jaxmerge.route(
    {jaxmerge.matrix: jaxmerge.chain(spectral.spectral_split(rank=1), spectral.head(),
                                     ops.mean())},
    default=ops.mean())
