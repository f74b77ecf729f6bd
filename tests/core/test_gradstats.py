"""prunekit.gradstats: the engines agree with each other and with an independent per-sample loop; purity; errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.gradstats import GradStats, grad_stats
from prunekit.params import prunable_params

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.")

N = 10  # not a multiple of 3 or 7: the last mini-batch is smaller
SPLITS = (4, 3, 3)  # incoming batch sizes, not aligned with B


pytestmark = pytest.mark.usefixtures("one_thread")


class SeqNet(nn.Module):
    """A Linear on a 3-D input (positions), a circular-padded Conv1d, then a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.c = nn.Conv1d(6, 4, 3, padding=1, padding_mode="circular")
        self.b = nn.Linear(4, 3)

    def forward(self, x):  # x: [n, T, 5]
        h = torch.relu(self.a(x))
        h = self.c(h.transpose(1, 2)).relu_()
        return self.b(h.mean(-1))


class Custom(nn.Module):
    """A prunable weight used through F.linear in the module's own forward (not an nn.Linear)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class Shared(nn.Module):
    """fc applied twice in one forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(h)))))


def _bn_random(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def make(name):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
        shape = (6,)
    elif name == "mlp_nobias":
        model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.ReLU(),
                              nn.Linear(5, 3, bias=False))
        shape = (6,)
    elif name == "cnn":
        model = _bn_random(nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.MaxPool2d(2),
            nn.Conv2d(6, 4, 2, padding="same", bias=False), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(16, 3)))
        shape = (3, 8, 8)
    elif name == "seq":
        model, shape = SeqNet(), (4, 5)
    elif name == "custom":
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), Custom(5, 4), nn.Tanh(), nn.Linear(4, 3))
        shape = (6,)
    elif name == "shared":
        model, shape = Shared(), (6,)
    else:
        raise KeyError(name)
    model = model.double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, x, y


def batches(x, y, sizes=SPLITS):
    out, a = [], 0
    for s in sizes:
        out.append((x[a: a + s], y[a: a + s]))
        a += s
    return out


def close(a: GradStats, b: GradStats, rtol=1e-9, atol=1e-12):
    assert a.mean.keys() == b.mean.keys()
    for k in a.mean:
        assert torch.allclose(a.mean[k], b.mean[k], rtol=rtol, atol=atol), k
        assert torch.allclose(a.sq[k], b.sq[k], rtol=rtol, atol=atol), k
    assert (a.n_samples, a.n_batches, a.batch_size) == (b.n_samples, b.n_batches, b.batch_size)


def reference(model, params, x, y, B, mode="eval"):
    """Independent: one loss.backward() per mini-batch on a copy of the model, grads read from .grad."""
    m = copy.deepcopy(model)
    m.train(mode == "train")
    by_name = dict(m.named_parameters())
    s = {p.name: torch.zeros_like(p.tensor) for p in params}
    q = {p.name: torch.zeros_like(p.tensor) for p in params}
    nb = 0
    for a in range(0, x.shape[0], B):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[a: a + B]), y[a: a + B]).backward()
        for p in params:
            g = by_name[p.name].grad
            s[p.name] += g
            q[p.name] += g * g
        nb += 1
    return {k: v / nb for k, v in s.items()}, {k: v / nb for k, v in q.items()}


# ------------------------------------------------------------------------------------------------------ agreement


@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn", "seq"])
@pytest.mark.parametrize("B", [1, 3, 7])
def test_hooks_equals_loop(name, B):
    model, x, y = make(name)
    params = prunable_params(model, include_bias=True)
    ref = grad_stats(model, params, batches(x, y), batch_size=B, engine="loop")
    assert ref.engine == "loop" and ref.n_batches == -(-N // B) and ref.n_samples == N
    assert ref.passes == ref.n_batches
    for max_chunk in (256, 4):  # 4: pieces smaller than the data; B = 7 > 4 runs micro-batches
        got = grad_stats(model, params, batches(x, y), batch_size=B, engine="hooks", max_chunk=max_chunk)
        assert got.engine == ("batched" if B > max_chunk else "hooks")
        close(got, ref)
    auto = grad_stats(model, params, batches(x, y), batch_size=B)
    assert auto.engine == "hooks" and auto.passes == 1
    close(auto, ref)


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
def test_independent_per_sample_loop(name):
    model, x, y = make(name)
    params = prunable_params(model, include_bias=True)
    mean, sq = reference(model, params, x, y, 1)
    for engine in ("hooks", "vmap", "loop"):
        got = grad_stats(model, params, batches(x, y, (1, 6, 3)), engine=engine)
        assert got.engine == engine
        for k in mean:
            assert torch.allclose(got.mean[k], mean[k], rtol=1e-9, atol=1e-12), (engine, k)
            assert torch.allclose(got.sq[k], sq[k], rtol=1e-9, atol=1e-12), (engine, k)


@pytest.mark.parametrize("name", ["mlp_nobias", "cnn", "seq"])
@pytest.mark.parametrize("B", [1, 3])
def test_vmap_equals_loop(name, B):
    model, x, y = make(name)
    params = prunable_params(model, include_bias=True)
    ref = grad_stats(model, params, batches(x, y), batch_size=B, engine="loop")
    got = grad_stats(model, params, batches(x, y), batch_size=B, engine="vmap")
    assert got.engine == "vmap"
    close(got, ref)


def test_independent_reference_with_batches():
    model, x, y = make("cnn")
    params = prunable_params(model)
    mean, sq = reference(model, params, x, y, 3)
    got = grad_stats(model, params, batches(x, y), batch_size=3)
    for k in mean:
        assert torch.allclose(got.mean[k], mean[k], rtol=1e-9, atol=1e-12)
        assert torch.allclose(got.sq[k], sq[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("B", [1, 3])
def test_memory_budget_subchunks(B):
    """A tiny max_bytes forces one sample / one output channel / one mini-batch at a time: same numbers."""
    model, x, y = make("cnn")
    params = prunable_params(model, include_bias=True)
    ref = grad_stats(model, params, batches(x, y), batch_size=B, engine="loop")
    for engine in ("hooks", "vmap"):
        close(grad_stats(model, params, batches(x, y), batch_size=B, engine=engine, max_bytes=1), ref)


def test_linear_fast_path_equals_materialized_squares():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randint(0, 4, (9,))
    params = prunable_params(model, include_bias=True)
    got = grad_stats(model, params, [(x, y)], engine="hooks")
    # per-sample gradients materialized with torch.func in the test itself
    from torch.func import functional_call, grad, vmap

    ps = {p.name: p.tensor.detach() for p in params}

    def f(ps, xi, yi):
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    per = vmap(grad(f), in_dims=(None, 0, 0))(ps, x, y)
    for k, g in per.items():
        assert g.shape == (9, *ps[k].shape)
        assert torch.allclose(got.sq[k], (g * g).mean(0), rtol=1e-10, atol=1e-14)
        assert torch.allclose(got.mean[k], g.mean(0), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------------------ fallbacks


def test_custom_module_goes_through_fallback():
    model, x, y = make("custom")
    params = prunable_params(model, modules=["0", "2", "4"])
    assert params[1].name == "2.weight" and isinstance(params[1].module, Custom)
    for B in (1, 3):
        ref = grad_stats(model, params, batches(x, y), batch_size=B, engine="loop")
        got = grad_stats(model, params, batches(x, y), batch_size=B)
        assert got.engine == "hooks+vmap"
        close(got, ref)
    with pytest.raises(PrunekitError, match="hooks engine does not support '2.weight'"):
        grad_stats(model, params, batches(x, y), engine="hooks")


class Branchy(nn.Module):
    """Data-dependent Python control flow: vmap cannot trace it."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)

    def forward(self, x):
        h = F.linear(x, self.weight)
        return h if float(h.detach().sum()) > -1e9 else -h


def test_vmap_failure_falls_back_to_loop():
    model, x, y = make("mlp")
    model[2] = Branchy(8, 5).double()
    params = prunable_params(model, modules=["0", "2", "4"])
    got = grad_stats(model, params, batches(x, y), batch_size=3)
    assert got.engine == "hooks+loop"
    close(got, grad_stats(model, params, batches(x, y), batch_size=3, engine="loop"))
    with pytest.raises(Exception):
        grad_stats(model, params, batches(x, y), batch_size=3, engine="vmap")


def test_weight_sharing_falls_back():
    model, x, y = make("shared")
    params = prunable_params(model, include_bias=True)
    ref = grad_stats(model, params, batches(x, y), batch_size=1, engine="loop")
    mean, sq = reference(model, params, x, y, 1)
    got = grad_stats(model, params, batches(x, y), batch_size=1, max_chunk=4)
    assert got.engine == "hooks+vmap"
    close(got, ref)
    for k in mean:
        assert torch.allclose(got.sq[k], sq[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(PrunekitError, match="called more than once"):
        grad_stats(model, params, batches(x, y), engine="hooks")


def test_user_loss():
    model, x, y = make("mlp")
    params = prunable_params(model)

    def smooth(out, t):
        return F.cross_entropy(out, t, label_smoothing=0.1)

    ref = grad_stats(model, params, batches(x, y), batch_size=3, loss=smooth, engine="loop")
    got = grad_stats(model, params, batches(x, y), batch_size=3, loss=smooth)
    assert got.engine == "vmap"  # mean-only user loss: the generic engine
    close(got, ref)
    per = grad_stats(model, params, batches(x, y), batch_size=3, loss=smooth,
                     per_sample_loss=lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1, reduction="none"))
    assert per.engine == "hooks"
    close(per, ref)


def test_other_models_route_to_vmap():
    torch.manual_seed(0)
    c3 = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 8, 3)).double().eval()
    x, y = torch.randn(5, 2, 3, 3, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = prunable_params(c3)
    got = grad_stats(c3, params, [(x, y)], batch_size=2)
    assert got.engine == "hooks+vmap"
    close(got, grad_stats(c3, params, [(x, y)], batch_size=2, engine="loop"))
    # BatchNorm without running statistics couples the samples even in eval mode: not the hooks engine
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = prunable_params(bn)
    got = grad_stats(bn, params, [(x, y)], batch_size=4)
    assert "hooks" not in got.engine
    close(got, grad_stats(bn, params, [(x, y)], batch_size=4, engine="loop"))


# ------------------------------------------------------------------------------------------------------ train mode


def test_train_mode_batch_statistics_and_purity():
    model, x, y = make("cnn")
    params = prunable_params(model)
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    got = grad_stats(model, params, batches(x, y, (2, 8)), batch_size=4, mode="train")
    assert got.engine == "loop" and got.n_batches == 3
    mean, sq = reference(model, params, x, y, 4, mode="train")
    for k in mean:
        assert torch.allclose(got.mean[k], mean[k], rtol=1e-9, atol=1e-12)
        assert torch.allclose(got.sq[k], sq[k], rtol=1e-9, atol=1e-12)
    for k, v in model.named_buffers():
        assert torch.equal(v, bufs[k]), k  # running statistics restored
    assert not any(m.training for m in model.modules())
    ev = grad_stats(model, params, batches(x, y), batch_size=4)
    assert not torch.allclose(ev.sq["0.weight"], got.sq["0.weight"])  # batch statistics did change the result


def test_train_mode_errors():
    model, x, y = make("cnn")
    params = prunable_params(model)
    with pytest.raises(PrunekitError, match="batch_size=1"):
        grad_stats(model, params, batches(x, y), batch_size=1, mode="train")
    with pytest.raises(PrunekitError, match="single sample"):  # 10 = 3 + 3 + 3 + 1
        grad_stats(model, params, batches(x, y), batch_size=3, mode="train")
    with pytest.raises(PrunekitError, match="mode='eval'"):
        grad_stats(model, params, batches(x, y), batch_size=2, mode="train", engine="hooks")
    mlp, x, y = make("mlp")
    grad_stats(mlp, prunable_params(mlp), batches(x, y), batch_size=1, mode="train")  # no BN: fine


# ---------------------------------------------------------------------------------------------------------- purity


def snapshot(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "req": {k: v.requires_grad for k, v in model.named_parameters()},
        "bufs": {k: v.clone() for k, v in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        assert (a["grads"][k] is None) == (b["grads"][k] is None), k
        if a["grads"][k] is not None:
            assert torch.equal(a["grads"][k], b["grads"][k]), k
    assert a["req"] == b["req"]
    for k in a["bufs"]:
        assert torch.equal(a["bufs"][k], b["bufs"][k]), k
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("engine", ["auto", "hooks", "vmap", "loop"])
def test_purity(engine):
    model, x, y = make("cnn")
    model.add_module("drop", nn.Dropout(0.5))
    params = prunable_params(model, include_bias=True)
    params[0].tensor.grad = torch.full_like(params[0].tensor, 0.25)  # one .grad set, the others None
    params[1].tensor.requires_grad_(False)  # a frozen prunable tensor
    model[1].weight.requires_grad_(False)  # a frozen BN scale
    model.train()
    model[4].eval()  # mixed modes are restored module by module
    before = snapshot(model)
    got = grad_stats(model, params, batches(x, y), batch_size=2, engine=engine)
    same(before, snapshot(model))
    assert all(v.abs().sum() > 0 for v in got.sq.values())  # frozen tensors are still scored
    # train mode with batch statistics and dropout
    grad_stats(model, params, batches(x, y), batch_size=5, engine="loop" if engine != "auto" else "auto",
               mode="train")
    same(before, snapshot(model))


def test_purity_on_exception():
    model, x, y = make("cnn")
    params = prunable_params(model)
    model.train()
    before = snapshot(model)
    calls = []

    def bad_loss(out, t):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, t)

    with pytest.raises(RuntimeError, match="boom"):
        grad_stats(model, params, batches(x, y), batch_size=2, loss=bad_loss, engine="loop", mode="train")
    same(before, snapshot(model))


# ------------------------------------------------------------------------------------------------- misc and errors


def test_fields_need_sq_dtype_and_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()  # float32 model
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    params = prunable_params(model)
    got = grad_stats(model, params, batches(x, y), batch_size=4, need_sq=False, max_chunk=8)
    assert got.sq is None and got.n_batches == 3 and got.batch_size == 4 and got.n_samples == 10
    assert got.passes == 2 and got.mean["0.weight"].dtype == torch.float32
    assert got.mean["0.weight"].shape == model[0].weight.shape
    d64 = grad_stats(model, params, batches(x.double(), y), batch_size=4, dtype=torch.float64)  # x cast to float32
    assert d64.mean["2.weight"].dtype == torch.float64
    assert torch.allclose(d64.mean["0.weight"].float(), got.mean["0.weight"], atol=1e-6)


def test_errors():
    model, x, y = make("mlp")
    params = prunable_params(model)
    with pytest.raises(PrunekitError, match="no samples"):
        grad_stats(model, params, [])
    with pytest.raises(PrunekitError, match="needs data"):
        grad_stats(model, params, None)
    with pytest.raises(PrunekitError, match="unknown gradient engine"):
        grad_stats(model, params, [(x, y)], engine="fast")
    with pytest.raises(PrunekitError, match="batch_size"):
        grad_stats(model, params, [(x, y)], batch_size=0)
    with pytest.raises(PrunekitError, match="pair"):
        grad_stats(model, params, [x])
    with pytest.raises(PrunekitError, match="same number of samples"):
        grad_stats(model, params, [(x, y[:3])])
    with pytest.raises(PrunekitError, match="mode"):
        grad_stats(model, params, [(x, y)], mode="inference")
    with pytest.raises(PrunekitError, match="PrunableParam"):
        grad_stats(model, [model[0].weight], [(x, y)])


class Skips(nn.Module):
    """An MLP whose forward never calls ``unused``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_generator_data_and_unused_module():
    """One-shot iterables work; a prunable module that the forward never calls scores exactly zero."""
    _, x, y = make("mlp")
    torch.manual_seed(0)
    model = Skips().double().eval()
    params = prunable_params(model)
    got = grad_stats(model, params, (b for b in batches(x, y)), batch_size=2)
    assert got.engine == "hooks"
    close(got, grad_stats(model, params, batches(x, y), batch_size=2, engine="loop"))
    assert torch.count_nonzero(got.sq["unused.weight"]) == 0
