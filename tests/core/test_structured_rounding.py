"""``round_channels: k`` for every channel method: each kept width of the shrunk model (a residual-tied group as a
whole, after the size search and any fill) is a multiple of k or the full width.

The check is independent of the selection code: the model is physically shrunk with ``pk.shrink`` and every
Conv/Linear output width of the shrunk copy is compared with the dense model's."""
import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.models import get_model
from prunekit.models.registry import model_names
from prunekit.structured import select_channels, channel_groups

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("filter_l1", "filter_l2", "filter_random", "bn_scale", "pfp")
#: smaller inputs for the ImageNet-shaped models, so that a test run stays short
SMALL = {"efficientnet_lite0": (3, 64, 64), "resnet50": (3, 64, 64)}
FAST = ("lenet5_caffe", "vgg11_bn", "resnet20")


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _check(name: str, method: str, k: int, sparsity: float = 0.5) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, input_shape=SMALL.get(name)).eval()
    if method == "bn_scale" and not _has_bn(model):
        pytest.skip(f"{name} has no BatchNorm")
    x = torch.randn(8, *model.input_shape, generator=torch.Generator().manual_seed(1))
    data = [(x, torch.zeros(8, dtype=torch.long))]
    dense = _widths(model)
    opts = {"sample_size": 4} if method == "pfp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, method, sparsity, data, round_channels=k, **opts)
        small = pk.shrink(model, masks, x[:2])
    got = _widths(small)
    bad = {n: (w, dense[n]) for n, w in got.items() if w != dense[n] and w % k}
    assert not bad, f"{name}/{method}: widths that are neither multiples of {k} nor full: {bad}"
    assert any(w < dense[n] for n, w in got.items()), "nothing was removed"
    assert abs(masks.sparsity() - sparsity) < 0.1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAST)
def test_kept_widths_are_multiples(name, method):
    _check(name, method, 8)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", [n for n in model_names() if n not in FAST])
def test_kept_widths_are_multiples_on_the_whole_zoo(name, method):
    # pfp on 4 random examples: channels never active on S always go, so these two cannot keep half their weights
    sparsity = 0.8 if method == "pfp" and name in ("vgg19_kuangliu", "efficientnet_lite0") else 0.5
    _check(name, method, 8 if name not in ("mlpnet",) else 4, sparsity)


def test_residual_stream_is_rounded_as_a_whole():
    """ResNet-56, pfp with k = 16: the tied residual groups (one per stage) end at multiples of 16 or full."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masks = pk.prune(model, "pfp", 0.6, [(x, torch.zeros(8, dtype=torch.long))], sample_size=4,
                         round_channels=16)
    groups = {g.name: g for g in channel_groups(model, x[:2])}
    tied = [g for g in groups.values() if g.name.startswith("add:") and g.prunable]
    assert tied
    from prunekit.structured import channel_masks_from_masks
    cm = channel_masks_from_masks(model, list(groups.values()), masks)
    for g in tied:
        n = int(cm[g.name].sum())
        assert n % 16 == 0 or n == g.size, (g.name, n)


def test_select_channels_round_to_blocks():
    """Two independent linear layers: each group keeps a multiple of 4 (or all), by its own top scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))
    groups = channel_groups(model, torch.randn(2, 6))
    alive = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    scores = {g.name: torch.rand(g.size, dtype=torch.float64) for g in groups if g.prunable}
    for mode in ("uniform", "global"):
        keep, kept = select_channels(model, groups, scores, 150, alive, mode, size_tol=0.3, round_to=4)
        for name, m in keep.items():
            n = int(m.sum())
            assert n % 4 == 0 or n == m.numel()
            top = torch.sort(scores[name], descending=True, stable=True).indices[:n]
            assert bool(m[top].all())  # a top set of the group
        # the count equals a plain recount of the masks
        n1, n2 = (int(keep[g.name].sum()) for g in groups if g.prunable)
        assert kept == 6 * n1 + n1 * n2 + n2 * 3
    with pytest.raises(PrunekitError, match="round_channels"):
        select_channels(model, groups, scores, 150, alive, round_to=0)


def test_transformer_heads_and_neurons_are_rounded():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    from tests.core.test_hf_models import bert_batches
    for method in ("filter_l1", "filter_random", "pfp"):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = pk.prune(m, method, 0.5, bert_batches() if method == "pfp" else None, round_channels=4)
        groups = channel_groups(m, None)
        from prunekit.structured import channel_masks_from_masks
        cm = channel_masks_from_masks(m, groups, masks)
        counts = {g.name: int(cm[g.name].sum()) for g in groups if g.prunable}
        assert counts and all(c % 4 == 0 for c in counts.values()), counts
        assert any(c < g.size for g in groups if g.prunable for c in [counts[g.name]])
