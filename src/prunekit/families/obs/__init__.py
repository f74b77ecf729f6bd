"""The optimal-brain-surgeon family of seed 003 (WoodFisher and its variants) and its machinery: the gradient
matrix, block layouts, inverse engines (Gram–Woodbury, direct Cholesky, the Sherman–Morrison reference) and the
memory planner (docs/second_order.md)."""
from .blocks import (Block, BlockBatch, BlockLayout, dynamic_block_size, dynamic_layout, full_layout, global_layout,
                     layer_layout, make_layout)
from .engines import (BlockFactor, DirectFactor, GramFactor, ShermanMorrisonFactor, block_apply, block_diag_inv,
                      block_factor, choose_route, dense_fisher)
from .gradients import gradient_matrix, mean_gradient
from .planner import MemoryPlan, plan
from . import woodfisher  # noqa: E402,F401  (registers the codes)

__all__ = [
    "Block", "BlockBatch", "BlockLayout", "dynamic_block_size", "dynamic_layout", "full_layout", "global_layout",
    "layer_layout", "make_layout", "BlockFactor", "DirectFactor", "GramFactor", "ShermanMorrisonFactor",
    "block_apply", "block_diag_inv", "block_factor", "choose_route", "dense_fisher", "gradient_matrix",
    "mean_gradient", "MemoryPlan", "plan",
]
