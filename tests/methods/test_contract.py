"""The contract every registered method keeps (issue 15), checked for every entry of ``pk.methods()``.

The codes are collected from the registry when this module is imported, so a method registered later is covered
without touching this file. For every one-shot code (``MethodInfo.kind == "one-shot"``), on :class:`ContractNet`
(conv → BN → ReLU → depthwise conv → BN → ReLU → max-pool → flatten → Linear head) and 32 labelled examples:

- kept count: ``pk.prune`` to 0.5, then on to 0.8 with ``masks=``, keeps exactly ``pk.keep_count(n, s)`` prunable
  weights (globally, or in every tensor for a code whose ``MethodInfo.scope`` is ``"layer"``); a structured code
  (``MethodInfo.structured``) is within its ``size_tol`` of that and removes whole channels (a pruned weight lies in
  a removed channel, and a removed channel loses its producer rows and its consumer slices together). The masks are
  applied: every pruned weight is 0 in the model.
- nested: the 0.8 masks prune every entry the 0.5 masks pruned.
- purity: ``pk.score`` changes nothing it can see: parameters (values and identity), buffers, ``.grad`` (None stays
  None, existing gradients keep their values), ``requires_grad`` flags, every module's train/eval mode, hooks, the
  data, grad mode, and the torch / numpy / python RNG states. Checked on the dense model and on the 0.5-pruned
  model with its masks.
- determinism: the same ``seed=`` on copies of the same model gives identical masks and an identical state (the
  updated weights of the OBS codes, the zeroed biases and BN entries of the structured codes), whatever the global
  RNG state was before the call.
- device: every mask is a bool tensor of its parameter's shape on its parameter's device (also on CUDA when there
  is one).

``levels`` codes (the IMP family: train, prune, rewind) only run as experiments: ``pk.prune`` must refuse them with a
PrunekitError that points to ``prunekit run``, leaving the model as it was. The ``dense`` code (``none``) keeps every
weight: its masks keep all, the model is not changed and the report says 0 rounds.

A code that breaks a property is listed in KNOWN_VIOLATIONS (strict xfail, with the evidence); the checks are
themselves tested on throw-away methods that break one property each (``test_the_contract_catches_...``).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.structured import channel_groups, channel_masks_from_masks, channel_masks_to_masks

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every registered method, in registration order, as the registry has them when this module is imported.
INFOS = {m.name: m for m in pk.methods()}
CODES = list(INFOS)
KINDS = ("dense", "one-shot", "levels")

SPARSITIES = (0.5, 0.8)
SEED = 7  # the ``seed=`` option (mask generator) of every prune call

#: (code, property) -> the evidence: contract violations, expected to fail (strict: a fix makes the test fail too,
#: so the entry must then be removed). Properties: count, nested, pure, modes, deterministic, device.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

#: Codes whose score cannot be called through pk.score, with the reason (none today: levels codes are skipped
#: whole, every other code's score is callable).
NO_SCORE: dict[str, str] = {}

#: Small scoring budgets, so every code runs in a fraction of a second on the 32 examples.
BUDGETS = {"fisher_samples": 32, "kfac_samples": 32, "hess_samples": 8, "diag_fisher_samples": 32,
           "sample_size": 32}
#: Codes that prune in many rounds by default (synflow, px: 100) are run in this many: the rounds and their
#: nesting are still exercised.
MAX_ROUNDS = 3


def options(code: str) -> dict:
    """The keyword options of ``pk.prune`` / ``pk.score`` for ``code``: small budgets where the code has them."""
    info = pk.get_method(code)
    opts = {k: v for k, v in BUDGETS.items() if k in info.option_names()}
    if info.default_rounds > MAX_ROUNDS:
        opts["rounds"] = MAX_ROUNDS
    return opts


# --------------------------------------------------------------------------------------------- model and data
class ContractNet(nn.Module):
    """conv1 (3→10) → BN → ReLU → depthwise conv2 → BN → ReLU → 2×2 max-pool → flatten → fc (160→4).

    1000 prunable weights (270 + 90 + 640). One channel group may lose channels (conv1's outputs, which the depthwise
    conv carries through to fc's input): each of its 10 channels holds 27 + 9 + 64 = 100 weights, so 0.5 and 0.8
    are reachable exactly with whole channels (5 and 2 kept). fc's outputs are the model's output (never removed).
    ReLU only (px), BatchNorm with non-trivial statistics, a Linear head after a flatten."""

    input_shape = (3, 8, 8)

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(160, 4)
        with torch.no_grad():  # deterministic whatever the global RNG, and BatchNorm away from the identity
            for t in self.parameters():
                fan_in = t[0].numel() if t.dim() > 1 else 4
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) / fan_in ** 0.5)
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(0.5 + torch.rand(10, generator=g))
                bn.bias.copy_(torch.rand(10, generator=g) * 0.4 - 0.2)
                bn.running_mean.copy_(torch.rand(10, generator=g) * 0.4 - 0.2)
                bn.running_var.copy_(0.5 + torch.rand(10, generator=g))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


def make_data(device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """32 examples, 4 classes, batches of 8."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, *ContractNet.input_shape, generator=g)
    y = torch.randint(0, 4, (32,), generator=g)
    return [(x[i:i + 8].to(device), y[i:i + 8].to(device)) for i in range(0, 32, 8)]


def make_model(device="cpu") -> ContractNet:
    return ContractNet().to(device)


# ------------------------------------------------------------------------------------------------- pruning runs
def clone_masks(masks: pk.Masks) -> dict[str, torch.Tensor]:
    return {n: m.detach().clone() for n, m in masks.items()}


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@dataclass
class Run:
    """One code pruned to each of ``sparsities`` in turn (each step continues from the previous masks) on a fresh
    model; what each step left."""

    code: str
    sparsities: tuple
    model: nn.Module
    before: dict  # the model's state before pruning
    masks: list = field(default_factory=list)  # cloned masks after each step
    states: list = field(default_factory=list)  # the model's state after each step
    devices: list = field(default_factory=list)  # [(name, mask dtype, mask shape, mask device, param shape, device)]
    reports: list = field(default_factory=list)


def run_nested(code: str, seed: int = SEED, global_seed: int = 1, device="cpu",
               sparsities=SPARSITIES) -> Run:
    """``pk.prune`` at each of ``sparsities`` in turn (the later ones continue from the earlier masks), starting
    with the global torch RNG seeded by ``global_seed`` (it must not matter)."""
    model, data = make_model(device), make_data(device)
    run = Run(code, tuple(sparsities), model, clone_state(model))
    masks = None
    torch.manual_seed(global_seed)
    for s in sparsities:
        with warnings.catch_warnings():
            # layer collapse (magnitude-like codes empty fc at 0.8) and "works around a fixed channel group"
            # notes are expected here; sizes and structure are what the checks assert
            warnings.simplefilter("ignore")
            masks = pk.prune(model, code, sparsity=s, data=data, masks=masks, seed=seed, **options(code))
        run.masks.append(clone_masks(masks))
        run.states.append(clone_state(model))
        run.devices.append([(p.name, masks[p.name].dtype, tuple(masks[p.name].shape), masks[p.name].device,
                             tuple(p.tensor.shape), p.tensor.device) for p in masks.params])
        run.reports.append(dict(masks.report))
    return run


_RUNS: dict[tuple, Run] = {}


def cached_run(code: str, global_seed: int = 1, sparsities=SPARSITIES) -> Run:
    """run_nested for a registered code, computed once per module (the property tests share it)."""
    key = (code, global_seed, tuple(sparsities))
    if key not in _RUNS:
        _RUNS[key] = run_nested(code, global_seed=global_seed, sparsities=sparsities)
    return _RUNS[key]


# ------------------------------------------------------------------------------------------------------- checks
def check_kept_count(run: Run) -> None:
    """Exact counts (global, or per tensor for layer-scope codes), size_tol and whole channels for structured
    codes, everything kept for the dense code; the masks are applied to the model."""
    info = pk.get_method(run.code)
    sizes = {n: m.numel() for n, m in run.masks[0].items()}
    total = sum(sizes.values())
    for s, masks, state, report in zip(run.sparsities, run.masks, run.states, run.reports):
        kept = sum(int(m.sum()) for m in masks.values())
        where = f"{run.code} at sparsity {s}"
        for n, m in masks.items():
            assert bool((state[n][~m] == 0).all()), f"{where}: pruned entries of {n} are not 0 in the model"
        if info.kind == "dense":
            assert kept == total, f"{where}: the dense code pruned {total - kept} weights"
            assert report["rounds"] == 0, f"{where}: the dense code reports {report['rounds']} rounds"
            for n, t in run.before.items():
                assert torch.equal(state[n], t), f"{where}: the dense code changed {n}"
            continue
        if info.structured:
            tol = getattr(info.make_options(**{k: v for k, v in options(run.code).items()
                                               if k in info.option_names()}), "size_tol", 0.0)
            target = pk.keep_count(total, s)
            assert abs(kept - target) <= tol * target, \
                f"{where}: kept {kept} of {total}, target {target}, outside size_tol={tol:g}"
            check_whole_channels(run.model, masks, where)
        elif info.scope == "layer":
            for n, m in masks.items():
                assert int(m.sum()) == pk.keep_count(sizes[n], s), \
                    f"{where}: {n} keeps {int(m.sum())} of {sizes[n]}, want {pk.keep_count(sizes[n], s)}"
        else:
            assert kept == pk.keep_count(total, s), \
                f"{where}: kept {kept} of {total}, want exactly {pk.keep_count(total, s)}"


def check_whole_channels(model: nn.Module, masks: dict, where: str) -> None:
    """Every pruned weight lies in a removed channel of a prunable channel group; a removed channel loses every
    producer row and every consumer slice (so ``pk.shrink`` can drop it); at least one channel is removed."""
    x = make_data(next(model.parameters()).device)[0][0]
    groups = channel_groups(model, x)
    by_rows = channel_masks_from_masks(model, groups, masks, side="producers")
    by_slices = channel_masks_from_masks(model, groups, masks, side="consumers")
    for g in by_rows:
        assert torch.equal(by_rows[g], by_slices[g]), (
            f"{where}: channel group {g!r} is only half removed: channels without producer rows "
            f"{(~by_rows[g]).nonzero().flatten().tolist()}, without consumer slices "
            f"{(~by_slices[g]).nonzero().flatten().tolist()}")
    assert any(not bool(k.all()) for k in by_rows.values()), f"{where}: no channel was removed"
    whole = channel_masks_to_masks(model, groups, by_rows)
    for n, m in masks.items():
        want = whole.get(n)
        want = torch.ones_like(m) if want is None else want.to(m.device)
        stray = int((want & ~m).sum())
        assert stray == 0, f"{where}: {stray} pruned weights of {n} are not in a removed channel"


def check_nested(run: Run) -> None:
    assert len(run.masks) > 1
    for (s0, m0), (s1, m1) in zip(zip(run.sparsities, run.masks), zip(run.sparsities[1:], run.masks[1:])):
        for n in m0:
            revived = int((m1[n] & ~m0[n]).sum())
            assert revived == 0, f"{run.code}: {revived} entries of {n} pruned at {s0} are kept again at {s1}"


def check_same(a: Run, b: Run) -> None:
    """Identical masks at every step and an identical model state after it."""
    assert a.sparsities == b.sparsities
    for s, ma, mb, sa, sb in zip(a.sparsities, a.masks, b.masks, a.states, b.states):
        for n in ma:
            diff = int((ma[n] != mb[n]).sum())
            assert diff == 0, f"{a.code} seed={SEED}, sparsity {s}: masks of {n} differ in {diff} entries"
        for n in sa:
            assert torch.equal(sa[n], sb[n]), f"{a.code} seed={SEED}, sparsity {s}: {n} differs after pruning"


def check_devices(run: Run) -> None:
    for step in run.devices:
        for name, dtype, shape, device, pshape, pdevice in step:
            assert dtype == torch.bool, f"{run.code}: the mask of {name} is {dtype}, not torch.bool"
            assert shape == pshape, f"{run.code}: the mask of {name} has shape {shape}, the parameter {pshape}"
            assert device == pdevice, f"{run.code}: the mask of {name} is on {device}, the parameter on {pdevice}"


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def same_rng(a: dict, b: dict) -> list[str]:
    """The generators whose state differs between ``a`` and ``b``."""
    bad = [] if torch.equal(a["torch"], b["torch"]) else ["torch"]
    if "cuda" in a and not all(torch.equal(x, y) for x, y in zip(a["cuda"], b["cuda"])):
        bad.append("cuda")
    na, nb = a["numpy"], b["numpy"]
    if not (na[0] == nb[0] and np.array_equal(na[1], nb[1]) and tuple(na[2:]) == tuple(nb[2:])):
        bad.append("numpy")
    if a["python"] != b["python"]:
        bad.append("python")
    return bad


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def observable(model: nn.Module, data) -> dict:
    """Everything a score function could change that a caller can see."""
    params = dict(model.named_parameters())
    return {
        "parameter values": {n: p.detach().clone() for n, p in params.items()},
        "parameter objects": {n: id(p) for n, p in params.items()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
        "requires_grad flags": {n: p.requires_grad for n, p in params.items()},
        "train/eval modes": {n: m.training for n, m in model.named_modules()},
        "module hooks": {(n, h): len(getattr(m, h, None) or ()) for n, m in model.named_modules() for h in _HOOKS},
        "tensor hooks": {n: len(getattr(p, "_backward_hooks", None) or ()) +
                         len(getattr(p, "_post_accumulate_grad_hooks", None) or ()) for n, p in params.items()},
        "data": [tuple(t.clone() for t in batch) for batch in data],
        "grad mode": torch.is_grad_enabled(),
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _changed(a, b) -> list[str]:
    if isinstance(a, dict):
        return [str(k) for k in a if k not in b or not _equal(a[k], b[k])] + [str(k) for k in b if k not in a]
    return [] if _equal(a, b) else ["value"]


def prepare(model: nn.Module, mode: str) -> nn.Module:
    """A model in the middle of training: some gradients set (others None), one frozen tensor, and every module in
    train or eval ``mode``, or ``mixed``: in train mode but bn2 in eval (a frozen BatchNorm while fine-tuning)."""
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn2.eval()
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.25)
    model.fc.bias.grad = torch.linspace(-1, 1, 4, device=model.fc.bias.device)
    model.bn1.bias.requires_grad_(False)
    return model


def check_score_is_pure(code: str, model: nn.Module, masks: pk.Masks | None = None, mode: str = "train") -> None:
    """``pk.score(model, code, ...)`` on a model prepared in ``mode`` leaves the model, its gradients, flags and
    modes, the data and every global RNG exactly as they were; the scores cover every prunable tensor with its
    shape."""
    data = make_data(next(model.parameters()).device)
    prepare(model, mode)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before, rng = observable(model, data), rng_states()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = pk.score(model, code, data=data, masks=masks, seed=SEED, **{
            k: v for k, v in options(code).items() if k != "rounds"})
    after, rng_after = observable(model, data), rng_states()
    for what in before:
        changed = _changed(before[what], after[what])
        assert not changed, f"pk.score({code!r}) changed the {what}: {', '.join(changed)}"
    bad = same_rng(rng, rng_after)
    assert not bad, f"pk.score({code!r}) advanced the global RNG state of {', '.join(bad)}"
    params = dict(model.named_parameters())
    for n, t in scores.items():
        assert tuple(t.shape) == tuple(params[n].shape), f"pk.score({code!r}): scores of {n} have shape {t.shape}"


# ------------------------------------------------------------------------------------------------- parametrize
ONE_SHOT = [c for c in CODES if INFOS[c].kind != "levels"]  # one-shot codes and the dense code
LEVELS = [c for c in CODES if INFOS[c].kind == "levels"]


def cases(prop: str):
    """Every code that ``pk.prune`` runs, as pytest params; known violations of ``prop`` as strict xfails. (Levels
    codes only run as experiments: test_levels_codes_only_run_as_experiments is their whole contract here.)"""
    return [pytest.param(code, id=code, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[(code, prop)])]
                         if (code, prop) in KNOWN_VIOLATIONS else []) for code in ONE_SHOT]


def test_every_code_has_a_known_kind_and_the_tables_name_real_codes():
    """A new kind would need its own contract here; stale table entries would hide nothing."""
    now = {m.name: m.kind for m in pk.methods()}
    assert set(CODES) <= set(now)
    assert all(kind in KINDS for kind in now.values()), now
    assert {c for c, _ in KNOWN_VIOLATIONS} | set(NO_SCORE) <= set(CODES)
    assert {p for _, p in KNOWN_VIOLATIONS} <= {"count", "nested", "pure", "modes", "deterministic", "device"}
    assert sorted(ONE_SHOT + LEVELS) == sorted(CODES)  # every code is run by one of the two contracts
    assert [c for c in CODES if now[c] == "dense"] == ["none"]
    assert set(LEVELS) >= {"lth", "sap", "ciap", "giap"}


@pytest.mark.parametrize("code", LEVELS)
def test_levels_codes_only_run_as_experiments(code):
    model = make_model()
    before = clone_state(model)
    with pytest.raises(pk.PrunekitError, match=r"`prunekit run`"):
        pk.prune(model, code, sparsity=0.5, data=make_data())
    assert _equal(before, clone_state(model))


@pytest.mark.parametrize("code", cases("count"))
def test_kept_count(code):
    """0.5 then 0.8 from the 0.5 masks, and 0.8 straight from the dense model."""
    check_kept_count(cached_run(code))
    check_kept_count(cached_run(code, sparsities=SPARSITIES[-1:]))


@pytest.mark.parametrize("code", cases("nested"))
def test_masks_are_nested(code):
    check_nested(cached_run(code))


@pytest.mark.parametrize("code", cases("pure"))
def test_score_is_pure(code):
    """On the dense model in train mode, and on the 0.5-pruned model in eval mode with its masks in force."""
    if code in NO_SCORE:
        pytest.skip(NO_SCORE[code])
    check_score_is_pure(code, make_model(), mode="train")
    run = cached_run(code)
    model = make_model()
    model.load_state_dict(run.states[0])
    check_score_is_pure(code, model, pk.Masks(model, masks=run.masks[0]), mode="eval")


@pytest.mark.parametrize("code", cases("modes"))
def test_score_keeps_every_modules_own_mode(code):
    """Purity on a model in train mode whose bn2 is in eval mode: each module keeps its own mode."""
    if code in NO_SCORE:
        pytest.skip(NO_SCORE[code])
    check_score_is_pure(code, make_model(), mode="mixed")


@pytest.mark.parametrize("code", cases("deterministic"))
def test_same_seed_same_masks(code):
    check_same(cached_run(code, global_seed=1), cached_run(code, global_seed=2))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code", cases("device"))
def test_masks_on_the_parameters_device(code, device):
    check_devices(cached_run(code) if device == "cpu" else run_nested(code, device=device))


# ----------------------------------------------------------------------------- the checks catch broken methods
def _magnitude(ctx):
    return {p.name: p.tensor.detach().abs().clone() for p in ctx.params}


def _mutates_weights(ctx):
    with torch.no_grad():
        ctx.params[0].tensor.mul_(1.5)
    return _magnitude(ctx)


def _train_forward(ctx):  # a train-mode forward left behind: BN statistics and modes change
    ctx.model.train()
    x, _ = next(iter(ctx.data))
    with torch.no_grad():
        ctx.model(x)
    return _magnitude(ctx)


def _eval_flattens(ctx):  # restores the root's mode only
    was = ctx.model.training
    ctx.model.eval()
    ctx.model.train(was)
    return _magnitude(ctx)


def _leaves_grads(ctx):  # a backward whose gradients stay in .grad (added to conv1's, new for the others)
    sum((p.tensor ** 2).sum() for p in ctx.params).backward()
    return _magnitude(ctx)


def _unfreezes(ctx):
    for p in ctx.model.parameters():
        p.requires_grad_(True)
    return _magnitude(ctx)


def _global_rng(ctx):  # random scores from the global RNG instead of ctx.generator
    return {p.name: torch.rand(p.tensor.shape) for p in ctx.params}


def _leaks_hook(ctx):
    ctx.model.fc.register_forward_hook(lambda *a: None)
    return _magnitude(ctx)


def _one_too_many(ctx, scores, sparsity):
    masks = pk.select(scores, ctx.masks, sparsity)
    for m in masks.values():  # revive one more entry than asked
        flat = m.reshape(-1)
        if not bool(flat.all()):
            flat[int((~flat).nonzero()[0])] = True
            break
    return masks


def _ignores_current(ctx, scores, sparsity):  # a fresh top-k over every entry: pruned ones may come back
    return pk.select(scores, None, sparsity)


def _global_select(ctx, scores, sparsity):  # one global ranking, whatever the code's scope
    return pk.select(scores, ctx.masks, sparsity)


def _smallest(ctx):
    return {p.name: -p.tensor.detach().abs() for p in ctx.params}


BROKEN = {  # name: (register keywords, the property check that must fail, a regex of its message)
    "mutates_weights": ({"score": _mutates_weights}, "pure", r"changed the parameter values: conv1\.weight"),
    "train_forward": ({"score": _train_forward}, "pure", r"changed the buffers: bn1\.running_mean"),
    "eval_flattens": ({"score": _eval_flattens}, "modes", r"changed the train/eval modes: bn2"),
    "leaves_grads": ({"score": _leaves_grads}, "pure",
                     r"changed the grads: conv1\.weight, conv2\.weight, fc\.weight"),
    "unfreezes": ({"score": _unfreezes}, "pure", r"changed the requires_grad flags: bn1\.bias"),
    "global_rng": ({"score": _global_rng}, "pure", r"advanced the global RNG state of torch"),
    "global_rng_masks": ({"score": _global_rng}, "deterministic", r"masks of .* differ"),
    "leaks_hook": ({"score": _leaks_hook}, "pure", r"changed the module hooks"),
    "one_too_many": ({"score": _magnitude, "select": _one_too_many}, "count",
                     r"kept 501 of 1000, want exactly 500"),
    "layer_miscount": ({"score": _magnitude, "scope": "layer", "select": _global_select}, "count",
                       r"keeps \d+ of \d+, want"),
    "not_nested": ({"score": _smallest, "select": _ignores_current}, "nested", r"pruned at 0.5 are kept again"),
    "not_whole_channels": ({"score": _magnitude, "structured": True}, "count", r"no channel was removed"),
}


def _check(prop: str, code: str) -> None:
    if prop == "pure":
        check_score_is_pure(code, make_model(), mode="train")
    elif prop == "modes":
        check_score_is_pure(code, make_model(), mode="mixed")
    elif prop == "deterministic":
        check_same(run_nested(code, global_seed=1), run_nested(code, global_seed=2))
    elif prop == "count":
        check_kept_count(run_nested(code))
    elif prop == "nested":
        check_nested(run_nested(code))


@pytest.mark.parametrize("bad", list(BROKEN))
def test_the_contract_catches_a_broken_method(scoped_registry, bad):
    kw, prop, message = BROKEN[bad]
    kw = dict(kw)
    score = kw.pop("score")
    code = f"contract_bad_{bad}"
    pk.register(code, family="test", needs_data=kw.pop("needs_data", "none"), summary="breaks the contract",
                **kw)(score)
    with pytest.raises(AssertionError, match=message):
        _check(prop, code)


def test_a_well_behaved_method_passes_every_check(scoped_registry):
    """The throw-away methods above fail because of what they break, not because the checks reject any new code."""
    pk.register("contract_good", family="test", needs_data="none", summary="magnitude again")(_magnitude)
    for prop in ("pure", "modes", "deterministic", "count", "nested"):
        _check(prop, "contract_good")
    check_devices(run_nested("contract_good"))


def test_the_device_check_compares_with_the_parameters_device():
    run = run_nested("magnitude", sparsities=(0.5,))
    check_devices(run)
    name, dtype, shape, _, pshape, pdevice = run.devices[0][0]
    run.devices[0][0] = (name, dtype, shape, torch.device("meta"), pshape, pdevice)
    with pytest.raises(AssertionError, match=r"mask of conv1\.weight is on meta, the parameter on cpu"):
        check_devices(run)


def _channels_removed(removed=(0, 1, 2, 3, 4)) -> dict[str, torch.Tensor]:
    """ContractNet masks that remove conv1's channels ``removed`` whole: conv1 and conv2 rows, fc's 16 columns."""
    m = make_model()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in m.named_parameters() if n.endswith("weight")
             and not n.startswith("bn")}
    for c in removed:
        masks["conv1.weight"][c] = False
        masks["conv2.weight"][c] = False
        masks["fc.weight"][:, 16 * c:16 * (c + 1)] = False
    return masks


def test_the_channel_check_rejects_half_removed_channels_and_stray_weights():
    model = make_model()
    good = _channels_removed()
    check_whole_channels(model, good, "good")
    half = _channels_removed()
    half["fc.weight"][:, 16 * 4:16 * 5] = True  # channel 4 loses its filters but fc still reads it
    half_removed = r"group 'conv1' is only half removed: .*rows \[0, 1, 2, 3, 4\], .*slices \[0, 1, 2, 3\]"
    with pytest.raises(AssertionError, match=half_removed):
        check_whole_channels(model, half, "half")
    stray = _channels_removed()
    stray["conv1.weight"][7, 0, 1, 1] = False  # one weight of a kept channel
    with pytest.raises(AssertionError, match=r"1 pruned weights of conv1\.weight are not in a removed channel"):
        check_whole_channels(model, stray, "stray")
    nothing = _channels_removed(())
    with pytest.raises(AssertionError, match="no channel was removed"):
        check_whole_channels(model, nothing, "nothing")
