"""prunekit.second_order: inverse engines, block layouts, the memory planner and the gradient matrix
(second_order.md §§1, 3, 4, 9)."""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit import PrunekitError
from prunekit.params import prunable_params
from prunekit.second_order import blocks as B
from prunekit.second_order import planner
from prunekit.second_order.engines import (DirectFactor, GramFactor, ShermanMorrisonFactor, cholesky, block_apply,
                                           block_diag_inv, block_factor, choose_route, dense_fisher)
from prunekit.second_order.gradients import gradient_matrix, sample_labels

F64 = torch.float64
ROUTES = ("gram", "direct", "sherman_morrison")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _grads(nb, N, c, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # rows with different scales and a few dead (zero) columns, like real gradients
    G = torch.randn(nb, N, c, generator=g, dtype=F64) * torch.rand(1, 1, c, generator=g, dtype=F64) * scale
    G[:, :, :2] = 0.0
    return G.to(dtype)


# ------------------------------------------------------------------------------------------------------- engines


@pytest.mark.parametrize("N,c", [(6, 23), (40, 17)])  # Gram's regime N < c and the direct regime N >= c
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lam", [1e-5, 1e-2])
def test_every_engine_matches_the_explicit_inverse(N, c, dtype, tol, lam):
    G = _grads(3, N, c, dtype)
    V = torch.randn(3, c, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    # reference: torch.linalg.inv of the explicitly formed damped Fisher of the same (float32 -> exact) values
    ref = torch.stack([torch.linalg.inv(dense_fisher(g, lam)) for g in G])
    for route in ROUTES:
        f = block_factor(G, lam, route)
        assert f.route == route
        d = f.diag(G)
        assert d.dtype == F64 and d.shape == (3, c)
        assert _rel(d, ref.diagonal(dim1=-2, dim2=-1)) < tol, route
        assert _rel(f.apply(G, V), ref @ V) < tol, route
        # dead columns: [F⁻¹]_qq = 1/λ exactly
        assert torch.allclose(d[:, :2], torch.full((3, 2), 1 / lam, dtype=F64), rtol=1e-12)


def test_auto_route_rule_and_single_block_helpers():
    assert choose_route(10, 11) == "gram" and choose_route(11, 11) == "direct" and choose_route(50, 3) == "direct"
    assert choose_route(5, 3, "gram") == "gram"
    with pytest.raises(PrunekitError, match="unknown inverse engine"):
        choose_route(5, 3, "cholesky")
    G = _grads(1, 5, 9, F64)[0]
    ref = torch.linalg.inv(dense_fisher(G, 1e-3))
    v = torch.randn(9, dtype=F64)
    assert torch.allclose(block_diag_inv(G, 1e-3), ref.diagonal(), rtol=1e-10)
    assert torch.allclose(block_apply(G, 1e-3, v), ref @ v, rtol=1e-10, atol=1e-10)
    assert torch.allclose(block_apply(G, 1e-3, v[:, None].repeat(1, 2)), (ref @ v)[:, None].repeat(1, 2), rtol=1e-10)
    with pytest.raises(PrunekitError, match="damping must be > 0"):
        block_diag_inv(G, 0.0)


def test_batched_blocks_equal_block_by_block():
    G = _grads(5, 8, 30, torch.float32)
    V = torch.randn(5, 30, 1, dtype=F64)
    for route in ROUTES:
        f = block_factor(G, 1e-4, route)
        d, a = f.diag(G), f.apply(G, V)
        for i in range(5):
            fi = block_factor(G[i: i + 1], 1e-4, route)
            assert torch.allclose(fi.diag(G[i: i + 1])[0], d[i], rtol=1e-12)
            assert torch.allclose(fi.apply(G[i: i + 1], V[i: i + 1])[0], a[i], rtol=1e-10, atol=1e-12)
        # a subset of the batch (the update's recompute-free path) and a device move keep the numbers
        sub = f.select(torch.tensor([1, 3])).to("cpu")
        assert torch.allclose(sub.diag(G[[1, 3]]), d[[1, 3]], rtol=1e-12)


@pytest.mark.parametrize("N,c", [(6, 20), (30, 12)])
def test_centering_uses_the_centred_fisher(N, c):
    G = _grads(2, N, c, F64) + 0.7  # a non-zero mean gradient
    ref = torch.stack([torch.linalg.inv(dense_fisher(g, 1e-3, center=True)) for g in G])
    V = torch.randn(2, c, 1, dtype=F64)
    for route in ROUTES:
        f = block_factor(G, 1e-3, route, center=True)
        assert _rel(f.diag(G), ref.diagonal(dim1=-2, dim2=-1)) < 1e-9, route
        assert _rel(f.apply(G, V), ref @ V) < 1e-9, route


def test_sherman_morrison_tiled_and_float32():
    G = _grads(2, 12, 25, torch.float32)
    ref = torch.stack([torch.linalg.inv(dense_fisher(g, 1e-2)) for g in G])
    for parts in (1, 3, 25):
        f = ShermanMorrisonFactor(G, 1e-2, parts=parts)
        assert _rel(f.diag(), ref.diagonal(dim1=-2, dim2=-1)) < 1e-10
    f32 = ShermanMorrisonFactor(G, 1e-2, parts=5, dtype=torch.float32)  # the reference's precision
    assert _rel(f32.diag(), ref.diagonal(dim1=-2, dim2=-1)) < 1e-5
    assert f32.nbytes == 2 * 25 * 25 * 4


def test_one_weight_block_and_diagonal_floor():
    g = torch.tensor([[0.5], [-1.0], [2.0]], dtype=F64)
    for route in ROUTES:
        d = block_diag_inv(g, 1e-3, route)
        assert torch.allclose(d, torch.tensor([1 / (1e-3 + (0.25 + 1 + 4) / 3)], dtype=F64), rtol=1e-12)
    G = _grads(4, 10, 50, torch.float32, scale=30.0)
    for route in ROUTES:
        f = block_factor(G, 1e-5, route)
        floor = 1.0 / (1e-5 + G.double().square().sum((1, 2)) / 10)
        assert bool((f.diag(G) >= floor[:, None] * (1 - 1e-12)).all())
        assert bool((f.diag(G) <= 1 / 1e-5).all())


def test_gram_never_forms_a_c_by_c_matrix():
    G = _grads(1, 4, 3000, torch.float32)
    f = GramFactor(G, 1e-4, col_chunk=512)
    assert f.L.shape == (1, 4, 4) and f.nbytes == 16 * 8
    d = f.diag(G)
    assert d.shape == (1, 3000)
    assert isinstance(block_factor(G, 1e-4), GramFactor)
    assert isinstance(block_factor(G[:, :, :3], 1e-4), DirectFactor)


def test_cholesky_jitter_retry_is_logged(caplog):
    v = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    A = (v[:, None] * v[None, :]).unsqueeze(0)  # PSD, singular: the plain Cholesky fails
    A[0].diagonal().sub_(1e-13)
    with caplog.at_level(logging.WARNING, logger="prunekit.second_order"):
        L = cholesky(A.clone(), 3, "a test matrix")
    assert "jitter" in caplog.text
    assert torch.allclose(L[0] @ L[0].T, A[0], atol=1e-8)
    with pytest.raises(PrunekitError, match="raise fisher_damp"):
        cholesky(-torch.eye(2, dtype=F64).unsqueeze(0), 2, "a negative matrix")


# ------------------------------------------------------------------------------------------------------- layouts


def test_layer_layout_chunks_inside_tensors():
    lay = B.layer_layout([10, 7, 4], 4)
    assert [(b.start, b.size, b.tensor) for b in lay.blocks] == [
        (0, 4, 0), (4, 4, 0), (8, 2, 0), (10, 4, 1), (14, 3, 1), (17, 4, 2)]
    assert lay.sizes() == {4: 4, 2: 1, 3: 1}
    whole = B.layer_layout([10, 7, 4], None)
    assert [(b.start, b.size) for b in whole.blocks] == [(0, 10), (10, 7), (17, 4)]
    # c >= tensor size is the whole-tensor layout
    assert [(b.start, b.size) for b in B.layer_layout([10, 7, 4], 10).blocks] == [(0, 10), (10, 7), (17, 4)]
    with pytest.raises(PrunekitError, match="block_size"):
        B.layer_layout([3], 0)


def test_global_and_full_layouts_straddle_tensors():
    lay = B.global_layout([10, 7, 4], 8)
    assert [(b.start, b.size, b.tensor) for b in lay.blocks] == [(0, 8, 0), (8, 8, None), (16, 5, None)]
    full = B.make_layout([torch.ones(10), torch.ones(7)], blocks="global", block_size=None)
    assert full.kind == "full" and [(b.start, b.size) for b in full.blocks] == [(0, 17)]
    assert B.make_layout([torch.ones(10), torch.ones(7)], blocks="global", block_size=100).n_blocks == 1


def test_dynamic_layout_and_growth_rule():
    assert B.dynamic_block_size(2000, 100_000, 100_000) == 2000
    assert B.dynamic_block_size(2000, 100_000, 10_000) == 10_000  # capped by the active count
    assert B.dynamic_block_size(2000, 1_000_000, 100_000) == 20_000  # 90% sparsity: 2000 -> 20,000
    assert B.dynamic_block_size(3, 10, 7) == 4
    m1 = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)  # 4 active of 6
    m2 = torch.tensor([0, 0, 0, 0], dtype=torch.bool)  # collapsed
    m3 = torch.tensor([1, 1, 0, 1], dtype=torch.bool)  # 3 active of 4
    lay = B.dynamic_layout([m1, m2, m3], 1)  # c = min(⌊1·14/7⌋, 7) = 2
    assert lay.block_size == 2 and lay.n_columns == 7 and lay.d_total == 14
    assert lay.columns.tolist() == [0, 2, 3, 4, 10, 11, 13]
    assert [(b.start, b.size, b.tensor) for b in lay.blocks] == [(0, 2, 0), (2, 2, 0), (4, 2, 2), (6, 1, 2)]
    assert lay.skipped == [1]
    assert B.dynamic_layout([m1, m2, m3], 2).block_size == 4  # ⌊2·14/7⌋
    g = B.dynamic_layout([m1, m2, m3], 1, within="global")
    assert [(b.start, b.size) for b in g.blocks] == [(0, 2), (2, 2), (4, 2), (6, 1)]
    dense = B.dynamic_layout([torch.ones(6, dtype=torch.bool)], 4)
    assert [(b.start, b.size) for b in dense.blocks] == [(0, 4), (4, 2)]


def test_batches_gather_and_scatter():
    lay = B.layer_layout([12, 8], 4)  # sizes: 4 ×5 (3 in tensor 0, 2 in tensor 1), contiguous
    batches = lay.batches()
    assert [(b.size, b.starts) for b in batches] == [(4, [0, 4, 8, 12, 16])]
    G = torch.arange(3 * 20, dtype=F64).reshape(3, 20)
    Gb = batches[0].gather(G)
    assert Gb.shape == (5, 3, 4) and Gb.data_ptr() == G.data_ptr()  # a view
    assert torch.equal(Gb[2], G[:, 8:12])
    lay = B.layer_layout([10, 6], 4)  # 4-blocks at 0, 4, 10 (not evenly spaced) -> stacked copy
    (b4, b2) = [b for b in lay.batches() if b.size == 4], [b for b in lay.batches() if b.size == 2]
    assert b4[0].starts == [0, 4, 10] and b2[0].starts == [8, 14]
    assert torch.equal(b4[0].gather(torch.arange(16.0).repeat(2, 1))[2, 0], torch.arange(10.0, 14.0))
    v = torch.arange(16, dtype=F64)
    dst = torch.zeros(16, dtype=F64)
    for b in lay.batches():
        b.scatter_vec(dst, b.gather_vec(v))
    assert torch.equal(dst, v)
    split = lay.batches(max_blocks=2)
    assert [len(b.starts) for b in split] == [2, 1, 2]
    active = torch.zeros(16, dtype=torch.bool)
    active[5] = True
    assert [b.starts for b in lay.batches(active=active)] == [[4]]


# ------------------------------------------------------------------------------------------------------- planner


def test_planner_caches_when_it_fits_and_recomputes_otherwise():
    lay = B.layer_layout([40_000, 6_000], 2000)
    p = planner.plan(lay, 100, widest_tensor=40_000, memory_limit=2 * 2**30)
    assert p.cache and p.cache_bytes == 23 * 100 * 100 * 8 and p.grad_bytes == 100 * 46_000 * 4
    assert p.routes == {2000: "gram"} and p.blocks_per_batch[2000] >= 1
    assert "factor cache" in p.summary() and p.peak_bytes < 2 * 2**30
    small = planner.plan(lay, 100, widest_tensor=40_000, memory_limit=p.grad_bytes + planner.MARGIN + 12 * 2**20,
                         max_micro_batch=4)
    assert small.peak_bytes <= small.limit
    never = planner.plan(lay, 100, widest_tensor=40_000, memory_limit=2 * 2**30, cache="never")
    assert not never.cache
    direct = planner.plan(B.layer_layout([5000], 50), 100, widest_tensor=5000, memory_limit=2**30)
    assert direct.routes == {50: "direct"} and direct.cache_bytes == 100 * 50 * 50 * 8


def test_planner_refuses_early_with_the_numbers_and_a_block_size():
    lay = B.layer_layout([1_000_000], None)  # one block of 10^6 weights, N = 2000: K alone is 64 MB
    with pytest.raises(PrunekitError) as e:
        planner.plan(lay, 2000, widest_tensor=1_000_000, memory_limit=8_200_000_000 + 100 * 2**20,
                     engine="direct")
    msg = str(e.value)
    assert "does not fit in memory" in msg and "GiB" in msg and "block_size:" in msg and "limit" in msg
    with pytest.raises(PrunekitError, match="gradient matrix alone needs .*lower fisher_samples"):
        planner.plan(lay, 2000, widest_tensor=1_000_000, memory_limit=2**30)
    with pytest.raises(PrunekitError, match="cache_factors"):
        planner.plan(lay, 10, widest_tensor=10, cache="sometimes")


def test_planner_time_estimate():
    lay = B.layer_layout([4000, 4000], 2000)
    p = planner.plan(lay, 1000, widest_tensor=4000, memory_limit=2**31)
    assert p.flops == pytest.approx(4 * (1000**2 * 2000 + 1000**3))


# ----------------------------------------------------------------------------------------------- gradient matrix


def _conv_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(16, 3))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _loop(model, params, X, Y, masks, b, N, loss=F.cross_entropy):
    model.eval()
    rows = []
    for n in range(N):
        gs = torch.autograd.grad(loss(model(X[n * b:(n + 1) * b]), Y[n * b:(n + 1) * b]), [p.tensor for p in params])
        rows.append(torch.cat([(g * masks[p.name]).reshape(-1) for g, p in zip(gs, params)]))
    model.train()
    return torch.stack(rows)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("b,micro", [(1, None), (1, 3), (3, None), (3, 2)])
def test_gradient_matrix_equals_a_loop_of_backward_passes(engine, b, micro):
    model = _conv_model()
    params = prunable_params(model, include_bias=True)
    X, Y = torch.randn(23, 2, 6, 6), torch.randint(0, 3, (23,))
    data = [(X[i:i + 5], Y[i:i + 5]) for i in range(0, 23, 5)]
    masks = {p.name: torch.rand(p.tensor.shape, generator=torch.Generator().manual_seed(3)) > 0.3 for p in params}
    G = gradient_matrix(model, params, data, n_grads=7, grad_batch=b, masks=masks, engine=engine,
                        max_micro_batch=micro)
    assert G.shape == (7, sum(p.tensor.numel() for p in params)) and G.dtype == torch.float32
    assert torch.allclose(G, _loop(model, params, X, Y, masks, b, 7), atol=1e-6)
    pruned = torch.cat([~masks[p.name].reshape(-1) for p in params])
    assert bool((G[:, pruned] == 0).all())


def test_gradient_matrix_active_columns_fewer_examples_and_purity():
    model = _conv_model()
    model.train()
    params = prunable_params(model)
    X, Y = torch.randn(9, 2, 6, 6), torch.randint(0, 3, (9,))
    masks = {p.name: torch.rand(p.tensor.shape) > 0.5 for p in params}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="using N = 4"):
        G = gradient_matrix(model, params, [(X, Y)], n_grads=10, grad_batch=2, masks=masks, active_only=True)
    act = torch.cat([masks[p.name].reshape(-1) for p in params])
    assert G.shape == (4, int(act.sum()))
    assert torch.allclose(G, _loop(model, params, X, Y, masks, 2, 4)[:, act], atol=1e-6)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.tensor.grad is None for p in params)
    with pytest.raises(PrunekitError, match="at least one mini-batch"):
        gradient_matrix(model, params, [(X, Y)], n_grads=1, grad_batch=10)


def test_gradient_matrix_custom_loss_true_fisher_and_smoothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = prunable_params(model)
    X, Y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    ones = {p.name: torch.ones_like(p.tensor, dtype=torch.bool) for p in params}
    nll = lambda out, y: F.nll_loss(F.log_softmax(out, 1), y)  # noqa: E731 - a user loss: vmap path
    G = gradient_matrix(model, params, [(X, Y)], n_grads=12, loss=nll)
    assert torch.allclose(G, _loop(model, params, X, Y, ones, 1, 12), atol=1e-6)
    # true Fisher: labels drawn from the model with the seeded generator, independent of chunking
    g1 = gradient_matrix(model, params, [(X, Y)], n_grads=12, true_fisher=True,
                         generator=torch.Generator().manual_seed(5), max_micro_batch=5)
    yt = sample_labels(model(X), torch.Generator().manual_seed(5))
    assert torch.allclose(g1, _loop(model, params, X, yt, ones, 1, 12), atol=1e-6)
    g2 = gradient_matrix(model, params, [(X, Y)], n_grads=12, true_fisher=True,
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2)
    ls = gradient_matrix(model, params, [(X, Y)], n_grads=12, label_smoothing=0.1)
    smooth = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)  # noqa: E731
    assert torch.allclose(ls, _loop(model, params, X, Y, ones, 1, 12, loss=smooth), atol=1e-6)
    with pytest.raises(PrunekitError, match="built-in cross-entropy"):
        gradient_matrix(model, params, [(X, Y)], n_grads=2, loss=nll, label_smoothing=0.1)


def test_sample_labels_follow_the_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    y = sample_labels(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=F64), atol=0.015)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engines_on_cuda_match_cpu():
    G = _grads(3, 20, 50, torch.float32)
    for route in ROUTES:
        dc = block_factor(G, 1e-4, route).diag(G)
        dg = block_factor(G.cuda(), 1e-4, route).diag(G.cuda()).cpu()
        assert _rel(dg, dc) < 1e-9


def test_no_warnings_from_a_plain_run():
    G = _grads(2, 5, 9, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block_factor(G, 1e-3).diag(G)
