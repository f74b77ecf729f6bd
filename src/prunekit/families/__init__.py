"""Every built-in pruning method, one subpackage per family; importing this package registers them all.

(Named ``families``, not ``methods``: ``prunekit.methods()`` is the public list of registered methods.)

- :mod:`.baselines`: ``none``, ``random``, ``magnitude``, and seed 003's ``magni`` / ``globalmagni``;
- :mod:`.pai`: pruning at initialization from gradients, the Fisher diagonal and paths (GN, SNIP, GraSP, FD, FP,
  FTS, FBSS, SynFlow, PX);
- :mod:`.obs`: the WoodFisher (optimal brain surgeon) codes with their engines, block layouts, memory planner and
  gradient matrix;
- :mod:`.curvature`: the curvature baselines of seed 003 (naive Hessian diagonal, diagonal Fisher, K-FAC);
- :mod:`.imp`: iterative magnitude pruning (LTH, SAP, InCoP): the codes, lottery levels and InCoP's statistics
  (the experiment protocol that trains the levels is :mod:`prunekit.experiments.imp_runner`);
- :mod:`.sensitivity`: provable sensitivity pruning (SiPP weights, PFP filters);
- :mod:`.filters`: the structured baselines (filter norms, random filters, BatchNorm scales);
- :mod:`.layerwise`: layer-wise reconstruction from a calibration set (SparseGPT, Wanda).

Adding a method is one module in its family and its :func:`prunekit.registry.register` call; shared engines
(:mod:`prunekit.gradstats`, :mod:`prunekit.structured`) are public modules that families import.
"""
from . import baselines, curvature, filters, imp, obs, pai, sensitivity  # noqa: F401  (registers every method)
from . import layerwise  # noqa: F401
