"""Gradient statistics shared by the Fisher/Taylor criteria: the mean mini-batch gradient and its mean square.

Definitions (docs: pai.md sections 1 and 4.2). The scoring samples, in their given order, are split into
N_b = ceil(n/B) consecutive mini-batches of B samples (the last may be smaller). For each mini-batch b, L_b is the
MEAN loss over b and g_b = dL_b/dθ for every prunable tensor θ, taken at θ as it is (already masked; gradients at
pruned entries are computed normally). :func:`grad_stats` returns, from one pass over the data,

    mean = ḡ = (1/N_b) Σ_b g_b          sq = F̂ = (1/N_b) Σ_b g_b ⊙ g_b

B = 1 gives per-sample gradients: ḡ is the full-data mean gradient and F̂ the empirical Fisher diagonal.

Engines (``engine=``):

- ``'hooks'``: one batched forward and backward per chunk of up to ``max_chunk`` samples. Forward hooks capture the
  input of every prunable ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` and the gradient edge of its output (taken
  at forward time, so in-place ops that later modify the output, such as ``ReLU(inplace=True)``, do not disturb
  it); one ``torch.autograd.grad`` of the SUM of the per-sample losses w.r.t. those edges gives
  δ_n = ∂ℓ_n/∂out_n. The
  per-sample weight gradient is G_n = Σ_positions δ_n x_nᵀ (conv: on the unfolded input, per group), and
  g_b = (1/|b|) Σ_{n∈b} G_n. For B = 1 on a Linear without positions, Σ_n G_n⊙G_n = (δ⊙δ)ᵀ(x⊙x), one matmul
  and no per-sample tensor. Otherwise per-sample (B = 1) or per-mini-batch (B > 1) gradients are materialized in
  sub-chunks that stay within ``max_bytes``. No weight gradient and no input gradient is ever computed.
- ``'vmap'``: ``torch.func.vmap`` over mini-batches of ``grad`` of the mean mini-batch loss through
  ``functional_call`` (B = 1: per-sample gradients), in chunks sized to ``max_bytes``. Works for any module type
  and any mean loss that vmap can trace.
- ``'loop'``: one ``torch.autograd.grad`` of the mean loss per mini-batch: the reference, and the only engine for
  ``mode='train'`` (batch statistics make per-sample gradients depend on the other samples of the mini-batch).
- ``'auto'``: ``'loop'`` for ``mode='train'``; in eval mode ``'hooks'`` for the tensors it supports and ``'vmap'``
  for the others (a prunable tensor of a custom module, a Conv3d, a module called more than once per forward,
  tensors tied across modules); ``'vmap'`` for everything when the loss is a user function without a per-sample
  form; ``'loop'`` for tensors on which vmap fails. ``GradStats.engine`` says what ran, e.g. ``'hooks+vmap'``.

When B > ``max_chunk`` (eval mode) every mini-batch is processed as consecutive micro-batches of at most
``max_chunk`` samples whose summed-loss gradients are added and divided by |b| (pai.md 4.2); ``engine`` is then
``'batched'``. In train mode a mini-batch is always one forward of its |b| samples, whatever ``max_chunk``.

Dict batches (``{"input_ids": ..., "labels": ...}``, :mod:`prunekit.batches`) call the model as ``model(**batch)`` and
always run on the 'loop' engine (one forward and backward per mini-batch); the default loss is then the output's own
``.loss`` when it has one, else cross-entropy on its ``.logits`` (:func:`prunekit.registry.default_loss`).

Losses: the default cross-entropy runs in per-sample form (sum reduction). A user ``loss`` is taken as a MEAN over
the batch; 'vmap' and 'loop' call it on whole mini-batches, so any mean loss works there. The hooks engine needs the
sum of per-sample losses: pass ``per_sample_loss`` (per-sample values whose mean is ``loss``); with an explicit
``engine='hooks'`` and no ``per_sample_loss`` it uses ``loss × batch size``, exact only for a mean of per-sample terms.

Purity: weights, buffers (BN running statistics included), every ``.grad`` (None-ness too), ``requires_grad``
flags, the train/eval flag of every module and the CPU/CUDA RNG state are the same after the call, also when it
raises. Nothing is accumulated into ``.grad``.

Limits of the hooks engine: a prunable module's first positional argument must be its input with the samples along
dimension 0 (positions of a Linear are the dimensions between the first and the last); a tensor used outside its
module (e.g. ``F.linear(x, self.fc.weight)`` elsewhere) is not seen and gives a wrong result: use ``engine='vmap'``
for such models.

Modules: :mod:`.frontend` (:func:`grad_stats`, its checks, :class:`GradStats`), :mod:`.dispatch` (which engine
handles which tensor, the streams of mini-batches through the engines, the fallbacks), :mod:`.engines` (the
accumulating run: the 'loop', 'vmap' and 'hooks' engines), :mod:`.capture` (the hooks engine's forward/backward
capture and conv unfolding, shared with :mod:`prunekit.families.obs.gradients`), :mod:`.losses` (the default
cross-entropy's mean and per-sample forms), :mod:`.attention` (:func:`twice_differentiable`, for Hessian-vector
products on transformers). Every public name stays importable from ``prunekit.gradstats``.
"""
from .attention import twice_differentiable
from .capture import Unsupported, batch_coupled, capture_io, gradient_edge, hook_kind, unfolder
from .engines import BLOCK_BYTES
from .frontend import DEFAULT_MAX_BYTES, ENGINES, MODES, GradStats, grad_stats
from .losses import LossFn, is_default_ce

__all__ = ["grad_stats", "GradStats", "ENGINES", "MODES", "DEFAULT_MAX_BYTES", "BLOCK_BYTES", "LossFn",
           "twice_differentiable", "Unsupported", "batch_coupled", "capture_io", "gradient_edge", "hook_kind",
           "unfolder", "is_default_ce"]
