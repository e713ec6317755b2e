"""ResMerge ablation "SRC-A w/ ungated head" (paper Table 2): LHC without the agreement gate.

The same as ``--method=resmerge --head_gate=none``, written out with the algebra.
"""

import jaxmerge
from jaxmerge import ops, spectral

merge = jaxmerge.route(
    {jaxmerge.matrix: jaxmerge.chain(spectral.spectral_split(rank=1),
                                     spectral.lhc(spectral.src_a(), rho_max=0.2, gate="none"))},
    default=ops.mean())
