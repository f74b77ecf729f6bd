"""Structured pruning support: channel groups, physical channel removal, and archives of shrunk models.

    from prunekit.structured import channel_groups, shrink, save_shrunk, load_shrunk
    groups = channel_groups(model, x)                  # which tensors move together, and what may be removed
    keep = {g.name: torch.rand(g.size) > 0.5 for g in groups if g.prunable}
    small = shrink(model, keep, x)                     # smaller copy; checked against the masked model
    save_shrunk("small.pt", small); again = load_shrunk("small.pt")   # no model code needed to reload

Hugging Face transformers (BERT family, GPT-2): the groups are attention heads and FFN neurons, read off the module
structure (:mod:`prunekit.structured.transformer_groups`); ``shrink`` removes them (example input: a dict batch)
and ``save_shrunk_hf`` / ``load_shrunk_hf`` store and rebuild the shrunk model (docs/structured.md).
"""
from .archive import MODULE_TYPES, export_onnx, load_shrunk, save_shrunk
from .archive_hf import load_shrunk_hf, save_shrunk_hf
from .channel_group import ChannelGroup
from .channel_masks import channel_masks_from_masks, channel_masks_to_masks, check_channel_masks, make_exact
from .fx_trace import trace
from .groups import channel_groups
from .shrink import TOLERANCE, masked_copy, relative_error, shrink, shrink_report, transformer_example
from .transformer_groups import transformer_groups

__all__ = [
    "ChannelGroup", "channel_groups", "channel_masks_to_masks", "channel_masks_from_masks", "check_channel_masks",
    "make_exact", "trace", "shrink", "shrink_report", "masked_copy", "relative_error", "TOLERANCE",
    "save_shrunk", "load_shrunk", "export_onnx", "MODULE_TYPES", "transformer_groups", "transformer_example",
    "save_shrunk_hf", "load_shrunk_hf",
]
from .select import (bn_scale_scores, broadcast_channel_scores, cached_channel_groups, example_input_for,  # noqa: E402
                     filter_norm_scores, masks_from_channels, select_channels)

__all__ += ["example_input_for", "select_channels", "masks_from_channels", "filter_norm_scores", "bn_scale_scores",
            "broadcast_channel_scores", "cached_channel_groups"]
