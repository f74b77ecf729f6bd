"""Fixtures shared by every test folder. prunekit is imported as installed (`pip install -e .`, which `make test`
does); tests/ is on sys.path (pytest puts the root conftest's folder there), so helper modules such as tiny and
nets import by name from any subfolder."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention (and make timings erratic on small shared machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def scoped_registry():
    """Register test methods freely: the method registry is restored after the test, and the fixture checks that it
    was (a later test sees exactly the methods it saw before)."""
    from prunekit import registry

    before = registry.snapshot()
    with registry.scoped():
        yield registry
    after = registry.snapshot()
    assert after == before, "the method registry was not restored after the test"
