"""ResMerge ablation "Residual-only mean" (paper Table 2): average the residuals, drop the heads."""

import jaxmerge
from jaxmerge import ops, spectral

merge = jaxmerge.route(
    {jaxmerge.matrix: jaxmerge.chain(spectral.spectral_split(rank=1), spectral.residual(),
                                     ops.mean())},
    default=ops.mean())
