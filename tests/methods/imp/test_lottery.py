import pytest
import torch
from torch import nn

from prunekit.checkpoint import load_checked
from prunekit.errors import PrunekitError
from prunekit.lottery import density_after, kept_after, level_masks, run_imp
from prunekit.masks import Masks


def model_fn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


class Trainer:
    def __init__(self, epochs=3):
        self.calls, self.epochs, self.fail_at = [], epochs, None

    def __call__(self, model, masks, level, level_dir, rewind_epoch=None):
        self.calls.append(level)
        if self.fail_at == level:
            raise RuntimeError("interrupted")
        g = torch.Generator().manual_seed(100 + level)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        masks.attach(opt)
        out = {}
        for ep in range(self.epochs):
            if rewind_epoch == ep:
                out["rewind_state"] = {k: v.clone() for k, v in model.state_dict().items()}
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        if rewind_epoch == self.epochs:
            out["rewind_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            out["loss"] = float(nn.functional.cross_entropy(model(x), y))
        return out


NAMES = ["0.weight", "2.weight", "4.weight"]
SIZES = [128, 192, 36]


def _masks(tmp_path, **kw):
    recs = run_imp(model_fn, Trainer(), kw.pop("levels", 4), run_dir=tmp_path, **kw)
    blobs = [load_checked(tmp_path / f"level_{r['level']}.pt") for r in recs]
    return recs, blobs


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nested_and_exact_counts(tmp_path, scope):
    recs, blobs = _masks(tmp_path, scope=scope, prune_fraction=0.2, output_fraction=0.1)
    for a, b in zip(blobs, blobs[1:]):
        for n in NAMES:
            assert not bool((b["masks"][n] & ~a["masks"][n]).any())
    for k, blob in enumerate(blobs):
        counts = [int(blob["masks"][n].sum()) for n in NAMES]
        if scope == "layer":
            assert counts == kept_after(k, SIZES, [0.2, 0.2, 0.1])
        else:
            assert sum(counts[:2]) == kept_after(k, [320], [0.2])[0]
            assert counts[2] == kept_after(k, [36], [0.1])[0]
        assert recs[k]["kept"] == sum(counts)
        assert recs[k]["density"] == pytest.approx(density_after(k, [320, 36], [0.2, 0.1]), abs=0.02)
    # hand counts, layer scope: 128 -> 102 -> 81 ; output 36 -> 32 (ceil 3.6 = 4) -> 28 (ceil 3.2 = 4)
    assert kept_after(2, [128, 36], [0.2, 0.1]) == [81, 28]


def test_density_after_lenet():
    d = density_after(15, [265_200, 1_000], [0.2, 0.1])
    assert d == pytest.approx((265_200 * 0.8**15 + 1_000 * 0.9**15) / 266_200)
    assert round(d * 100, 1) == 3.6


def test_level_masks_output_exempt_and_global():
    torch.manual_seed(0)
    m = model_fn()
    masks = Masks(m)
    new = level_masks(masks, m, 0.5, output_fraction=0.0)
    assert bool(new["4.weight"].all())
    assert int(new["0.weight"].sum() + new["2.weight"].sum()) == 160
    # the survivors are the largest magnitudes over the two ranked tensors
    w = torch.cat([m[0].weight.abs().flatten(), m[2].weight.abs().flatten()])
    keep = torch.cat([new["0.weight"].flatten(), new["2.weight"].flatten()])
    assert w[keep].min() >= w[~keep].max()


def test_rewind_init_restores_theta0(tmp_path):
    recs, blobs = _masks(tmp_path, levels=2, scope="layer")
    theta0 = load_checked(tmp_path / "init.pt")
    assert torch.equal(theta0["0.weight"], model_fn()[0].weight.detach())
    seen = {}

    def spy(model, masks, level, level_dir, rewind_epoch=None):
        seen[level] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    run_imp(model_fn, spy, 2, run_dir=tmp_path / "b", scope="layer")
    b = [load_checked(tmp_path / "b" / f"level_{k}.pt") for k in range(3)]
    for level in (1, 2):
        for n in NAMES:
            mk = b[level]["masks"][n]
            assert torch.equal(seen[level][n][mk], theta0[n][mk])
            assert bool((seen[level][n][~mk] == 0).all())
            assert int(mk.sum()) < mk.numel()
        assert torch.equal(seen[level]["0.bias"], theta0["0.bias"])


def test_rewind_epoch(tmp_path):
    tr = Trainer(epochs=3)
    run_imp(model_fn, tr, 1, run_dir=tmp_path, rewind=("epoch", 1), train_epochs=3)
    rs = load_checked(tmp_path / "level_0.pt")["rewind_state"]
    assert rs is not None and not torch.equal(rs["0.weight"], model_fn()[0].weight.detach())
    with pytest.raises(PrunekitError, match="after the end of training"):
        run_imp(model_fn, tr, 1, run_dir=tmp_path / "x", rewind=("epoch", 4), train_epochs=3)


def test_resume_matches_uninterrupted(tmp_path):
    full = Trainer()
    ref = run_imp(model_fn, full, 4, run_dir=tmp_path / "a", scope="global", output_fraction=0.1)
    tr = Trainer()
    tr.fail_at = 2
    with pytest.raises(RuntimeError, match="interrupted"):
        run_imp(model_fn, tr, 4, run_dir=tmp_path / "b", scope="global", output_fraction=0.1)
    tr.fail_at = None
    tr.calls.clear()
    res = run_imp(model_fn, tr, 4, run_dir=tmp_path / "b", scope="global", output_fraction=0.1)
    assert tr.calls == [2, 3, 4]
    assert res == ref
    for k in range(5):
        a = load_checked(tmp_path / "a" / f"level_{k}.pt")
        b = load_checked(tmp_path / "b" / f"level_{k}.pt")
        for n in NAMES:
            assert torch.equal(a["masks"][n], b["masks"][n])
        for key in a["final_state"]:
            assert torch.equal(a["final_state"][key], b["final_state"][key])


@pytest.mark.parametrize("control", ["reinit", "random_prune"])
def test_controls_keep_layer_counts(tmp_path, control):
    seen = []
    base = Trainer()

    def tf(model, masks, level, level_dir, rewind_epoch=None):
        seen.append((level, level_dir.name, {n: masks[n].clone() for n in masks},
                     {k: v.clone() for k, v in model.state_dict().items()}))
        return base(model, masks, level, level_dir, rewind_epoch)

    recs = run_imp(model_fn, tf, 2, run_dir=tmp_path, scope="layer", control=control, control_seed=7)
    assert all("control" in r for r in recs[1:]) and "control" not in recs[0]
    theta0 = load_checked(tmp_path / "init.pt")
    for level in (1, 2):
        main = [s for s in seen if s[0] == level and "control" not in s[1]][0]
        ctrl = [s for s in seen if s[0] == level and "control" in s[1]][0]
        for n in NAMES:
            assert int(ctrl[2][n].sum()) == int(main[2][n].sum())
        if control == "reinit":
            assert all(torch.equal(ctrl[2][n], main[2][n]) for n in NAMES)
            assert not torch.equal(ctrl[3]["0.bias"], theta0["0.bias"])
        else:
            assert not all(torch.equal(ctrl[2][n], main[2][n]) for n in NAMES)
            mk = ctrl[2]["0.weight"]
            assert torch.equal(ctrl[3]["0.weight"][mk], theta0["0.weight"][mk])


def test_errors(tmp_path):
    tr = Trainer()
    with pytest.raises(PrunekitError, match="levels"):
        run_imp(model_fn, tr, 0, run_dir=tmp_path)
    for f in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(PrunekitError, match="prune_fraction"):
            run_imp(model_fn, tr, 2, run_dir=tmp_path, prune_fraction=f)
    with pytest.raises(PrunekitError, match="rewind"):
        run_imp(model_fn, tr, 2, run_dir=tmp_path, rewind="later")
    with pytest.raises(PrunekitError, match="train_epochs"):
        run_imp(model_fn, tr, 2, run_dir=tmp_path, rewind=("epoch", 1))
    with pytest.raises(PrunekitError, match="control"):
        run_imp(model_fn, tr, 2, run_dir=tmp_path, control="shuffle")
    assert tr.calls == []
