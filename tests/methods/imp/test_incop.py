import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.incop import (StopRule, flow_distance, gradient_flow, gradient_flow_original, information_flow,
                            monitored_layers, pq_index, pq_level_masks, pq_prune_count, pq_prune_fraction)

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


# ------------------------------------------------------------------ PQ index

def test_pq_hand_values():
    # (1, 2) on [3, 1, 0, 0]: I = 1 - 4^(-1/2) * 4 / sqrt(10); m = ceil(16/10) = 2; frac 0.5; n_prune 2
    w = T(3, 1, 0, 0)
    assert pq_index(w, 1, 2) == pytest.approx(1 - 2 / math.sqrt(10), abs=1e-12)
    assert pq_prune_fraction(w, 1, 2) == pytest.approx(0.5)
    assert pq_prune_count(w, 1, 2) == 2
    # (0.5, 1) on [4, 1, 0, 0]: ||w||_0.5 = 9, ||w||_1 = 5, I = 1 - 9/(4*5) = 0.55, m = ceil(4*0.45) = 2
    w = T(4, 1, 0, 0)
    assert pq_index(w, 0.5, 1) == pytest.approx(0.55, abs=1e-12)
    assert pq_prune_fraction(w, 0.5, 1) == pytest.approx(0.5)


def test_pq_flat_is_zero_and_clipped():
    w = torch.full((1000,), 0.3)
    i = pq_index(w, 0.5, 1)
    assert 0.0 <= i < 1e-12
    assert pq_prune_fraction(w, 0.5, 1) == 0.0
    assert pq_prune_fraction(w, 1, 2) == 0.0


def test_pq_beta_clamp_eta_gamma():
    w = torch.zeros(11)
    w[0] = 1.0  # m = 1, 1 - 1/11 = 0.909 > beta
    assert pq_prune_fraction(w, 1, 2) == pytest.approx(0.9)
    assert pq_prune_count(w, 1, 2) == 9  # floor(11 * 0.9)
    flat = torch.ones(8)  # eta = 1, (p, q) = (1, 2): m = ceil(8 * 2^-2) = 2, frac 0.75; gamma 0.5 -> 0.375
    assert pq_prune_fraction(flat, 1, 2, eta=1.0) == pytest.approx(0.75)
    assert pq_prune_fraction(flat, 1, 2, eta=1.0, gamma=0.5) == pytest.approx(0.375)
    assert pq_prune_fraction(flat, 1, 2, eta=1.0, gamma=5.0) == pytest.approx(0.9)


def test_pq_masks_global_and_edge_cases():
    # alive [4, 1, 0] (100 masked out): participation ratio 25/17 -> m = 2 of 3, frac 1/3, n_prune 1
    w, m = T(4, 1, 100, 0), torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    assert pq_prune_fraction(w, 1, 2, masks=m) == pytest.approx(1 / 3)
    assert pq_prune_count(w, 1, 2, masks=m) == 1
    # global scope = concatenation
    assert pq_index({"a": T(3, 1), "b": T(0, 0)}, 1, 2) == pytest.approx(pq_index(T(3, 1, 0, 0), 1, 2))
    assert pq_index([T(3, 1), T(0, 0)], 1, 2) == pytest.approx(pq_index(T(3, 1, 0, 0), 1, 2))
    # nothing alive / all zero: prune nothing
    assert pq_prune_fraction(w, masks=torch.zeros(4, dtype=torch.bool)) == 0.0
    assert pq_prune_fraction(torch.zeros(5)) == 0.0
    assert pq_index(torch.zeros(5)) == 0.0
    with pytest.raises(PrunekitError, match="zero alive"):
        pq_index(w, masks=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(PrunekitError, match="empty"):
        pq_index(torch.zeros(0))
    with pytest.raises(PrunekitError, match="empty"):
        pq_prune_fraction([])


@pytest.mark.parametrize("p,q", [(1, 1), (2, 1), (0, 1), (-0.5, 1), (float("nan"), 1)])
def test_pq_bad_p_q(p, q):
    with pytest.raises(PrunekitError, match="0 < p < q"):
        pq_index(T(1, 2), p, q)
    with pytest.raises(PrunekitError, match="0 < p < q"):
        pq_prune_fraction(T(1, 2), p, q)


def test_pq_gaussian_limit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(400_000, generator=g, dtype=torch.float64)
    assert pq_index(w, 1, 2) == pytest.approx(1 - math.sqrt(2 / math.pi), abs=3e-3)
    assert pq_prune_fraction(w, 1, 2) == pytest.approx(1 - 2 / math.pi, abs=5e-3)
    assert pq_index(w, 0.5, 1) == pytest.approx(1 - math.gamma(0.75) ** 2 / math.sqrt(math.pi), abs=3e-3)


def test_pq_level_masks_counts_and_nesting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    masks = {"0.weight": torch.rand(5, 6) > 0.2, "1.weight": torch.ones(3, 5, dtype=torch.bool)}
    params = dict(model.named_parameters())
    for scope in ("global", "layer"):
        new, counts = pq_level_masks(masks, model, 1, 2, scope=scope)
        for n in masks:
            assert not (new[n] & ~masks[n]).any()
        if scope == "global":
            expect = pq_prune_count({n: params[n] for n in masks}, 1, 2, masks=masks)
            assert counts == {"global": expect}
            assert sum(int(masks[n].sum()) - int(new[n].sum()) for n in masks) == expect
        else:
            for n in masks:
                k = pq_prune_count(params[n], 1, 2, masks=masks[n])
                assert counts[n] == k and int(masks[n].sum()) - int(new[n].sum()) == k


# ------------------------------------------------------------------ flows

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3, 4)
        self.downsample = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h) + self.downsample(h)))


def _batches(n_batches=3, bs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 2, 4, 4, generator=g), torch.randint(0, 2, (bs,), generator=g))
            for _ in range(n_batches)]


def _loop_rho(model, batches, stat):
    """Explicit per-sample loop of the 4.1 formulas."""
    model.eval()
    acts = [[], [], []]
    with torch.no_grad():
        for x, _ in batches:
            for xi in x:
                xi = xi[None]
                c = model.conv(xi)
                acts[0].append([float(c[0, k].mean()) for k in range(3)])
                h = torch.relu(model.bn(c)).mean(dim=(2, 3))
                a1 = model.fc1(h)
                acts[1].append([float(v) for v in a1[0]])
                acts[2].append([float(v) for v in model.fc2(torch.relu(a1 + model.downsample(h)))[0]])
    n = len(acts[0])
    zs = []
    for a in acts:
        c = len(a[0])
        mu = [sum(a[i][k] for i in range(n)) / n for k in range(c)]
        sd = [max(math.sqrt(max(sum(a[i][k] ** 2 for i in range(n)) / n - mu[k] ** 2, 0)), 1e-6) for k in range(c)]
        zs.append([[(a[i][k] - mu[k]) / sd[k] for k in range(c)] for i in range(n)])
    out = []
    for z0, z1 in zip(zs[:-1], zs[1:]):
        r = [[sum(z0[i][j] * z1[i][k] for i in range(n)) / n for k in range(len(z1[0]))] for j in range(len(z0[0]))]
        flat = [v for row in r for v in row]
        if stat == "mean":
            out.append(sum(flat) / len(flat))
        elif stat == "mean_abs":
            out.append(sum(abs(v) for v in flat) / len(flat))
        else:
            out.append(math.sqrt(sum(v * v for v in flat)) / math.sqrt(len(flat)))
    return out


def test_monitored_layers():
    m = Net()
    assert monitored_layers(m) == ["conv", "fc1", "fc2"]
    assert monitored_layers(m, "original") == ["conv", "fc1", "fc2"]
    m.shortcut = nn.Linear(1, 1)
    assert "shortcut" not in monitored_layers(m) and "shortcut" in monitored_layers(m, "original")


@pytest.mark.parametrize("stat", ["mean", "mean_abs", "fro"])
def test_information_flow_matches_loop(stat):
    torch.manual_seed(1)
    model = Net().double().train()  # float64 so batched and per-sample forwards agree to 1e-9
    batches = [(x.double(), y) for x, y in _batches()]
    rho = information_flow(model, batches, stat=stat)
    assert model.training  # flag restored
    assert rho.shape == (2,) and rho.dtype == torch.float64
    assert rho.tolist() == pytest.approx(_loop_rho(model, batches, stat), abs=1e-9)
    if stat == "mean":
        assert information_flow(model, batches, mode="original").tolist() == pytest.approx(rho.tolist())
    else:
        with pytest.raises(PrunekitError, match="signed mean"):
            information_flow(model, batches, stat=stat, mode="original")


def test_information_flow_nan_fails_check():
    model = Net()
    x = torch.full((4, 2, 4, 4), float("nan"))
    rho = information_flow(model, [x])
    assert torch.isnan(rho).all()
    assert math.isnan(flow_distance(rho, torch.zeros(2)))


@pytest.mark.parametrize("stat", ["mean_abs", "mean_abs_alive", "fro"])
def test_gradient_flow_matches_loop(stat):
    torch.manual_seed(2)
    model = Net().train()
    masks = {"conv.weight": torch.rand(3, 2, 3, 3) > 0.5, "fc1.weight": torch.rand(4, 3) > 0.3,
             "fc2.weight": torch.ones(2, 4, dtype=torch.bool)}
    masks["fc1.weight"][0] = True
    batches = _batches(n_batches=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = gradient_flow(model, masks, batches, stat=stat)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # explicit loop
    model.eval()
    params = dict(model.named_parameters())
    expect = [0.0] * 3
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for j, n in enumerate(masks):
            g = (params[n].grad.double() * masks[n]).reshape(-1).tolist()
            mk = masks[n].reshape(-1).tolist()
            if stat == "mean_abs":
                v = sum(abs(a) for a in g) / len(g)
            elif stat == "mean_abs_alive":
                v = sum(abs(a) for a, k in zip(g, mk) if k) / sum(mk)
            else:
                v = math.sqrt(sum(a * a for a in g))
            expect[j] += v / len(batches)
    assert s.tolist() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_gradient_flow_original_stale_grad_mismatch():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    masks = {"0.weight": torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), "1.weight": torch.ones(1, 2).bool()}
    with pytest.raises(PrunekitError, match="no .grad"):
        gradient_flow_original(model, masks, 4)
    model[0].weight.grad = torch.tensor([[1.0, 5.0], [-2.0, 2.0]])
    model[1].weight.grad = torch.tensor([[3.0, -4.0]])
    g, n = gradient_flow_original(model, masks, 4)
    s = 4 / 3
    assert g.tolist() == pytest.approx([s * 5 / 4, s * 7 / 2])
    assert n.tolist() == pytest.approx([s * 3.0, s * 5.0])
    # the seed compares n (current) with g (reference): nonzero even for identical gradients
    assert flow_distance(n, g) > 0
    with pytest.raises(PrunekitError, match="num_batches"):
        gradient_flow_original(model, masks, 1)


# ------------------------------------------------------------------ stop rule

def _run(rule, ds, accs=None, chunk_epochs=2):
    fired = []
    for i, d in enumerate(ds):
        acc = accs[i] if accs else None
        fired.append(rule.update((i + 1) * chunk_epochs, [d, 0.0], [0.0, 0.0], acc=acc))
    return fired


def test_stop_fixed_patience():
    rule = StopRule("fixed", "if", patience=2, acc_guard=False)
    assert rule.epsilon == 0.1
    fired = _run(rule, [0.5, 0.05, 0.3, 0.05, float("nan"), 0.05, 0.01, 0.02])
    assert fired == [False] * 6 + [True, True]
    assert rule.reason == "flow" and rule.stopped_chunk == 7 and rule.stopped_epoch == 14
    assert len(rule.history) == 7 and math.isnan(rule.history[4]["distance"])


def test_stop_fixed_accuracy_guard_and_cap_and_min_chunks():
    rule = StopRule("fixed", "gf", acc_ref=0.9, acc_tol=0.01)
    assert rule.epsilon == 0.5
    assert _run(rule, [9, 9, 9], accs=[0.5, 0.88, 0.895]) == [False, False, True]
    assert rule.reason == "accuracy" and rule.stopped_epoch == 6
    rule = StopRule("fixed", "if", max_chunks=4, acc_ref=0.9, acc_guard=False)
    assert _run(rule, [1, 1, 1, 1], accs=[0.99] * 4) == [False, False, False, True]
    assert rule.reason == "max_chunks" and rule.stopped_chunk == 4
    rule = StopRule("fixed", "if", min_chunks=3, patience=1)
    assert _run(rule, [0.0, 0.0, 0.0]) == [False, False, True]
    assert rule.reason == "flow"
    rule = StopRule("fixed", None, acc_ref=0.9, max_chunks=5)  # stop: acc
    assert _run(rule, [0, 0, 0], accs=[0.1, 0.95, 0.1]) == [False, True, True]
    assert rule.reason == "accuracy" and rule.stopped_epoch == 4


def test_stop_original():
    rule = StopRule("original", "if", patience=5)
    assert rule.epsilon == 1.0 and rule.patience == 1
    assert _run(rule, [1.5, 0.9]) == [False, True]
    assert rule.reason == "flow" and rule.stopped_epoch == 4
    rule = StopRule("original", "gf", epsilon=0.5, acc_ref=0.9, acc_tol=0.5)  # tolerance ignored
    assert _run(rule, [9, 9], accs=[0.89, 0.9]) == [False, True]
    assert rule.reason == "accuracy"


def test_stop_bad_args():
    with pytest.raises(PrunekitError, match="stop_mode"):
        StopRule("paper")
    with pytest.raises(PrunekitError, match="min_chunks"):
        StopRule(max_chunks=0)
    with pytest.raises(PrunekitError, match="same monitored"):
        flow_distance([1.0], [1.0, 2.0])
