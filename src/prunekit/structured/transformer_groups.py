"""Channel groups of Hugging Face transformers: attention heads and FFN neurons, found from the module structure.

``torch.fx`` cannot follow a transformers model (data-dependent control flow, attention dispatch, caches), so its
groups are read off the modules instead of a trace. Two block layouts are recognised:

- BERT family (``BertModel``, MiniLM, RoBERTa, ...): a self-attention module with ``nn.Linear`` children
  ``query``, ``key``, ``value`` and the ints ``num_attention_heads`` and ``attention_head_size``; the attention
  output projection is ``<its parent>.output.dense``. A block with ``intermediate.dense`` and ``output.dense``
  (``nn.Linear``) has an FFN.
- GPT-2: an attention module with ``transformers.pytorch_utils.Conv1D`` children ``c_attn`` (q|k|v fused, weight
  stored (in, out)) and ``c_proj`` and the ints ``num_heads``, ``head_dim``, ``split_size`` (self-attention only);
  an MLP with ``Conv1D`` children ``c_fc`` and ``c_proj``.

Groups (:class:`prunekit.structured.ChannelGroup`):

- one ``kind="head"`` group per attention module, named after it, of size = its number of heads: head ``h`` owns
  ``head_dim`` rows (output units, with their bias entries) of each of query, key and value (``rows=head_dim``;
  GPT-2's fused ``c_attn`` has the three in one tensor, ``splits=3``) and the ``head_dim`` input columns
  ``h*head_dim ...`` of the output projection (a consumer with ``block=head_dim``). ``attention`` names the module
  whose head count :func:`prunekit.structured.shrink` updates.
- one ``kind="neuron"`` group per FFN, named after its first layer (``intermediate.dense``, ``mlp.c_fc``): neuron
  ``j`` is output unit ``j`` of that layer and input column ``j`` of the second one.

The hidden size (residual stream, embeddings, LayerNorm) is never pruned and belongs to no group. A recognised
module whose sizes do not fit together gives a group that is not prunable, with the reason. A transformers model
with neither layout is refused with a :class:`PrunekitError` naming the supported ones.
"""
from __future__ import annotations

from torch import nn

from ..errors import PrunekitError
from ..params import hf_conv1d, is_hf_model
from .channel_group import ChannelGroup

__all__ = ["is_transformer", "transformer_groups", "SUPPORTED"]

SUPPORTED = ("BERT family (attention.self.query/key/value + attention.output.dense, intermediate.dense + "
             "output.dense)", "GPT-2 (attn.c_attn + attn.c_proj, mlp.c_fc + mlp.c_proj)")


def is_transformer(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` or a module that contains one (a wrapper)."""
    return any(is_hf_model(m) for m in model.modules())


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _linear(mod: nn.Module | None) -> bool:
    return isinstance(mod, nn.Linear)


def _conv1d(mod: nn.Module | None) -> bool:
    conv1d = hf_conv1d()
    return conv1d is not None and isinstance(mod, conv1d)


def _child(mod: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        mod = getattr(mod, part, None) if isinstance(mod, nn.Module) else None
    return mod if isinstance(mod, nn.Module) else None


def _int(mod: nn.Module, attr: str) -> int | None:
    v = getattr(mod, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _problems(checks: list[tuple[bool, str]]) -> str | None:
    bad = [why for ok, why in checks if not ok]
    return "; ".join(bad) if bad else None


def _bert_heads(name: str, mod: nn.Module, mods: dict[str, nn.Module]) -> ChannelGroup | None:
    q, k, v = (getattr(mod, a, None) for a in ("query", "key", "value"))
    heads, dim = _int(mod, "num_attention_heads"), _int(mod, "attention_head_size")
    if not (_linear(q) and _linear(k) and _linear(v) and heads and dim):
        return None
    parent = name.rpartition(".")[0]
    out_name = _join(parent, "output.dense")
    out = mods.get(out_name)
    if not _linear(out):
        return None
    width = heads * dim
    reason = _problems([(q.out_features == k.out_features == v.out_features == width,
                         f"query/key/value have {q.out_features}/{k.out_features}/{v.out_features} outputs, not "
                         f"{heads} heads x {dim}"),
                        (out.in_features == width, f"'{out_name}' reads {out.in_features} features, not {width}")])
    return ChannelGroup(name=name, size=heads, producers=[_join(name, a) for a in ("query", "key", "value")],
                        consumers=[(out_name, dim)], prunable=reason is None, reason=reason, rows=dim, kind="head",
                        attention=name)


def _bert_ffn(name: str, mod: nn.Module) -> ChannelGroup | None:
    inter, out = _child(mod, "intermediate.dense"), _child(mod, "output.dense")
    if not (_linear(inter) and _linear(out)) or _child(mod, "attention") is None:
        return None
    first = _join(name, "intermediate.dense")
    reason = _problems([(out.in_features == inter.out_features,
                         f"'{_join(name, 'output.dense')}' reads {out.in_features} features, not "
                         f"{inter.out_features}")])
    return ChannelGroup(name=first, size=inter.out_features, producers=[first],
                        consumers=[(_join(name, "output.dense"), 1)], prunable=reason is None, reason=reason,
                        kind="neuron")


def _gpt2_heads(name: str, mod: nn.Module) -> ChannelGroup | None:
    qkv, proj = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
    heads, dim = _int(mod, "num_heads"), _int(mod, "head_dim")
    if not (_conv1d(qkv) and _conv1d(proj) and heads and dim and _int(mod, "split_size")):
        return None
    width = heads * dim
    reason = _problems([(not getattr(mod, "is_cross_attention", False) and not hasattr(mod, "q_attn"),
                         "cross-attention (separate q_attn) is not supported"),
                        (qkv.weight.shape[1] == 3 * width and mod.split_size == width,
                         f"c_attn has {qkv.weight.shape[1]} outputs, not 3 x {heads} heads x {dim}"),
                        (proj.weight.shape[0] == width, f"c_proj reads {proj.weight.shape[0]} features, not {width}")])
    return ChannelGroup(name=name, size=heads, producers=[_join(name, "c_attn")],
                        consumers=[(_join(name, "c_proj"), dim)], prunable=reason is None, reason=reason, rows=dim,
                        splits=3, kind="head", attention=name)


def _gpt2_ffn(name: str, mod: nn.Module) -> ChannelGroup | None:
    fc, proj = getattr(mod, "c_fc", None), getattr(mod, "c_proj", None)
    if not (_conv1d(fc) and _conv1d(proj)):
        return None
    reason = _problems([(proj.weight.shape[0] == fc.weight.shape[1],
                         f"c_proj reads {proj.weight.shape[0]} features, not {fc.weight.shape[1]}")])
    return ChannelGroup(name=_join(name, "c_fc"), size=fc.weight.shape[1], producers=[_join(name, "c_fc")],
                        consumers=[(_join(name, "c_proj"), 1)], prunable=reason is None, reason=reason,
                        kind="neuron")


def transformer_groups(model: nn.Module) -> list[ChannelGroup]:
    """The head and FFN-neuron groups of a transformers model, in module registration order (forward order for
    BERT and GPT-2). Raises :class:`PrunekitError` when no block has a supported layout."""
    mods = dict(model.named_modules())
    out: list[ChannelGroup] = []
    for name, mod in mods.items():
        g = _bert_heads(name, mod, mods) or _bert_ffn(name, mod) or _gpt2_heads(name, mod) or _gpt2_ffn(name, mod)
        if g is not None:
            out.append(g)
    order = {name: i for i, name in enumerate(mods)}
    out.sort(key=lambda g: order[g.producers[0]])
    if not out:
        raise PrunekitError(
            f"structured pruning of transformers finds attention heads and FFN neurons by module structure, and "
            f"{type(model).__name__} has no block it recognises; supported: {'; '.join(SUPPORTED)}. Use an "
            "unstructured method (magnitude, snip, ...) for other architectures")
    return out
