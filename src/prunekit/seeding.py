"""Seeds: one integer per run, independent streams derived from it by name."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *tags: str) -> int:
    """A 63-bit seed derived from ``seed`` and names, stable across runs, processes and platforms."""
    h = hashlib.sha256(":".join([str(int(seed)), *tags]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *tags: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``derive_seed(seed, *tags)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *tags))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(derive_seed(seed, "numpy") % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states, for checkpoints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}  # plain data: loads with weights_only=True
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    ns = state["numpy"]
    if isinstance(ns, dict):
        ns = (ns["kind"], ns["keys"].numpy().astype(np.uint32), ns["pos"], ns["has_gauss"], ns["gauss"])
    np.random.set_state(ns)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
