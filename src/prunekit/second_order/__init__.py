"""Moved to :mod:`prunekit.families.obs` (these names stay importable). Second-order machinery of the OBS family (second_order.md): the gradient matrix, block layouts, inverse engines
(Gram–Woodbury, direct Cholesky, the Sherman–Morrison reference) and the memory planner."""
from ..families.obs.blocks import (Block, BlockBatch, BlockLayout, dynamic_block_size, dynamic_layout, full_layout, global_layout,
                     layer_layout, make_layout)
from ..families.obs.engines import (BlockFactor, DirectFactor, GramFactor, ShermanMorrisonFactor, block_apply, block_diag_inv,
                      block_factor, choose_route, dense_fisher)
from ..families.obs.gradients import gradient_matrix, mean_gradient
from ..families.obs.planner import MemoryPlan, plan

__all__ = [
    "Block", "BlockBatch", "BlockLayout", "dynamic_block_size", "dynamic_layout", "full_layout", "global_layout",
    "layer_layout", "make_layout", "BlockFactor", "DirectFactor", "GramFactor", "ShermanMorrisonFactor",
    "block_apply", "block_diag_inv", "block_factor", "choose_route", "dense_fisher", "gradient_matrix",
    "mean_gradient", "MemoryPlan", "plan",
]
