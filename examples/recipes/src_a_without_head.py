"""ResMerge ablation "SRC-A w/o head" (paper Table 2): the SRC-A backbone, no head correction."""

import jaxmerge
from jaxmerge import ops, spectral

merge = jaxmerge.route(
    {jaxmerge.matrix: jaxmerge.chain(spectral.spectral_split(rank=1), spectral.residual(),
                                     spectral.src_a())},
    default=ops.mean())
