"""Real speedups from sparsity: measured, never assumed.

- CPU, unstructured: :func:`to_sparse` swaps pruned Linear layers for :class:`SparseLinear` (a torch sparse CSR
  weight) only where a timing of that shape, sparsity band, row count and thread count (:class:`SpeedTable`) says
  CSR beats dense; :class:`SparseReport` says which layers were converted and why not the others.
- CUDA, 2:4 semi-structured: :func:`to_semi_structured` swaps 2:4-patterned Linear weights for torch's
  semi-structured tensors (fp16/bf16, Ampere or newer); :func:`check_2to4` and :func:`semi_structured_problem` say why
  a weight cannot be converted.

Both are inference-only: training keeps the masked dense model. Numbers: docs/speedup.md, bench/bench_sparse_cpu.py,
bench/bench_semi_structured_gpu.py.
"""
from .convert import LayerDecision, SparseReport, to_sparse
from .csr import SparseLinear
from .semi import check_2to4, semi_structured_problem, to_semi_structured
from .timing import SpeedTable, Timing, TimingKey, time_pair

__all__ = ["LayerDecision", "SparseReport", "to_sparse", "SparseLinear", "check_2to4", "semi_structured_problem",
           "to_semi_structured", "SpeedTable", "Timing", "TimingKey", "time_pair"]
