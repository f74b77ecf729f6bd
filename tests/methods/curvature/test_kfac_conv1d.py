"""kfac on GPT-2's Conv1D (y = x·W + b, W stored (in, out)): the same factors, scores and update as the Linear with
weight Wᵀ, in Conv1D's storage order."""
import pytest
import torch
from torch import nn

import prunekit as pk

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


class Net(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(1)  # [n, positions, features] -> [n, classes]


def pair():
    torch.manual_seed(0)
    lin = Net(nn.Linear(5, 7), nn.Linear(7, 3)).double()
    conv = Net(Conv1D(7, 5), Conv1D(3, 7)).double()
    with torch.no_grad():
        for cm, lm in ((conv.a, lin.a), (conv.b, lin.b)):
            cm.weight.copy_(lm.weight.t())
            cm.bias.copy_(lm.bias)
    return lin, conv


def test_kfac_scores_and_update_on_conv1d_equal_the_transposed_linear():
    lin, conv = pair()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(2)]
    sl, sc = pk.score(lin, "kfac", data), pk.score(conv, "kfac", data)
    for name in ("a.weight", "b.weight"):
        assert sc[name].shape == conv.get_parameter(name).shape
        torch.testing.assert_close(sc[name], sl[name].t(), rtol=1e-12, atol=0)
    ml, mc = pk.prune(lin, "kfac", 0.5, data), pk.prune(conv, "kfac", 0.5, data)
    for name in ("a.weight", "b.weight"):
        assert torch.equal(mc.as_dict()[name], ml.as_dict()[name].t())
        torch.testing.assert_close(conv.get_parameter(name), lin.get_parameter(name).t(), rtol=1e-10, atol=1e-12)
        assert not torch.equal(conv.get_parameter(name)[mc.as_dict()[name]],
                               pair()[1].get_parameter(name)[mc.as_dict()[name]])  # the update moved kept weights
