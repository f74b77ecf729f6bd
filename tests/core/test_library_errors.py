"""Clear library errors (issue 14): each mistake raises a PrunekitError that names the problem and the fix, before
any scoring work."""
import pytest
import torch
from torch import nn

import prunekit as pk


def _conv_net(in_channels: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, classes))


def _batches(n_batches: int = 3, n: int = 8, channels: int = 3, classes: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, channels, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(n_batches)]


@pytest.fixture
def counting(scoped_registry):
    """A data method (labels) that records the round of every batch it scores; the registry is restored after the
    test. An empty record after an error means no batch was scored."""
    calls = []

    def score(ctx):
        for _ in ctx.data:  # reads the data once per round
            calls.append(ctx.round)
        return {p.name: p.tensor.detach().abs() for p in ctx.params}

    pk.register("test_counting_data", family="test", needs_data="labels", summary="test only")(score)
    return calls


def test_counting_method_scores_valid_data(counting):
    masks = pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=_batches(), rounds=2)
    assert counting == [1, 1, 1, 2, 2, 2]
    assert masks.kept() == pk.keep_count(masks.total(), 0.5)


def test_model_given_as_a_string():
    for call in (lambda: pk.prune("resnet20", "magnitude", sparsity=0.5),
                 lambda: pk.score("resnet20", "magnitude")):
        with pytest.raises(pk.PrunekitError, match=r"string 'resnet20'.*get_model\('resnet20'\)"):
            call()
    with pytest.raises(pk.PrunekitError, match=r"get_model\('resnet20'\)"):
        pk.sparsity("resnet20")
    with pytest.raises(pk.PrunekitError, match="nn.Module"):
        pk.load("whatever.pt", "resnet20")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.fc(x * mask)


def test_forward_with_two_inputs(counting):
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(pk.PrunekitError, match=r"forward takes 2 inputs \(x, mask\) but data batches give one"):
        pk.prune(TwoInputs(), "test_counting_data", sparsity=0.5, data=data)
    assert counting == []
    with pytest.raises(pk.PrunekitError, match="takes 2 inputs"):
        pk.prune(TwoInputs(), "snip", sparsity=0.5, data=data)


@pytest.mark.parametrize("labels, message", [
    (lambda y: y.float(), r"labels are floating point .* pass y.long\(\)"),
    (lambda y: y[:, None], r"labels have shape \(8, 1\) .* class indices of shape \(8,\); use y.squeeze\(1\)"),
    (lambda y: y + 4, r"labels range from 4 to 7 but the model has 4 outputs"),
    (lambda y: y - 4, r"labels range from -4 to -1 but the model has 4 outputs"),
    (lambda y: y.int(), r"dtype torch.int32 .* pass y.long\(\)"),
])
def test_bad_labels(counting, labels, message):
    data = [(x, labels(y)) for x, y in _batches()]
    with pytest.raises(pk.PrunekitError, match=message):
        pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=data)
    assert counting == []


def test_bad_labels_through_a_real_method():
    data = [(x, y + 4) for x, y in _batches()]
    with pytest.raises(pk.PrunekitError, match="labels range from"):
        pk.prune(_conv_net(), "snip", sparsity=0.5, data=data)


def test_float_label_probabilities_and_custom_losses_are_accepted(counting):
    probs = [(x, torch.softmax(torch.randn(x.shape[0], 4), 1)) for x, _ in _batches()]
    pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=probs)
    floats = [(x, y.float()) for x, y in _batches()]
    pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=floats,
             loss=lambda out, t: (out[:, 0] - t).pow(2).mean())  # a custom loss decides what labels mean
    assert counting == [1] * 6


def test_wrong_input_channels(counting):
    data = _batches(channels=1)
    with pytest.raises(pk.PrunekitError, match=r"expects 3 input channels .* the data has 1 channels"):
        pk.prune(_conv_net(3), "test_counting_data", sparsity=0.5, data=data)
    assert counting == []


def test_wrong_input_features():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    with pytest.raises(pk.PrunekitError, match=r"expects 784 input features but receives 3072"):
        pk.prune(model, "snip", sparsity=0.5, data=data)


def test_one_shot_iterator_for_several_rounds(counting):
    data = _batches()
    with pytest.raises(pk.PrunekitError, match=r"one-shot iterator .* 3 rounds.*re-iterable"):
        pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=iter(data), rounds=3)
    gen = (b for b in data)
    with pytest.raises(pk.PrunekitError, match="one-shot iterator .*re-iterable"):
        pk.prune(_conv_net(), "snip", sparsity=0.5, data=gen, rounds=2)
    assert counting == []


def test_one_shot_iterator_read_twice_in_one_round(scoped_registry):
    def score(ctx):
        for _ in ctx.data:
            pass
        for _ in ctx.data:  # a second pass over the same data
            pass
        return {p.name: p.tensor.detach().abs() for p in ctx.params}

    pk.register("test_two_passes", family="test", needs_data="labels", summary="test only")(score)
    model = _conv_net()
    pk.prune(model, "test_two_passes", sparsity=0.5, data=_batches())  # a list: fine
    with pytest.raises(pk.PrunekitError, match="one-shot iterator .* reads the data more than once"):
        pk.prune(_conv_net(), "test_two_passes", sparsity=0.5, data=iter(_batches()))


def test_one_shot_iterator_single_pass_still_works_and_sees_every_batch(scoped_registry):
    seen = []

    def score(ctx):
        seen.extend(int(x.shape[0]) for x, _ in ctx.data)
        return {p.name: p.tensor.detach().abs() for p in ctx.params}

    pk.register("test_single_pass", family="test", needs_data="labels", summary="test only")(score)
    data = _batches(n_batches=3, n=5)
    pk.prune(_conv_net(), "test_single_pass", sparsity=0.5, data=(b for b in data))
    assert seen == [5, 5, 5]  # the batch read by the check is replayed, nothing is lost
    it = iter(data)
    for _ in it:
        pass
    with pytest.raises(pk.PrunekitError, match="exhausted iterator"):
        pk.prune(_conv_net(), "test_single_pass", sparsity=0.5, data=it)


def test_check_does_not_change_the_model_or_draw_an_extra_epoch(counting):
    """The data check reads the first batch of the same pass the method reads: a shuffling loader is drawn once."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)
    reference = torch.Generator().manual_seed(0)
    list(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=reference))  # one epoch
    pk.score(model, "test_counting_data", data=loader)
    assert counting == [1] * 4
    assert torch.equal(g.get_state(), reference.get_state())  # exactly one epoch drawn: the check added none
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_nan_inputs_are_named(counting):
    data = _batches()
    data[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(pk.PrunekitError, match=r"data batches contain non-finite inputs.*1 NaN"):
        pk.prune(_conv_net(), "test_counting_data", sparsity=0.5, data=data)
    assert counting == []


@pytest.mark.parametrize("code", ["woodfisherblock", "woodtaylorblock", "woodfisher"])
def test_obs_nan_inputs_in_a_later_batch_name_the_data(code):
    """Batch 1 is finite (the central check passes); batch 2 has a NaN: the OBS family names the data instead of
    advising a larger fisher_damp."""
    data = _batches(n_batches=2, n=8)
    data[1][0][3, 0, 0, 0] = float("nan")
    with pytest.raises(pk.PrunekitError, match=r"data batches contain NaN or infinite inputs") as e:
        pk.prune(_conv_net(), code, sparsity=0.5, data=data, fisher_samples=4, fisher_batch=4)
    assert "raise fisher_damp" not in str(e.value)


def test_obs_nan_gradients_from_finite_inputs_blame_the_model():
    model = _conv_net()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(pk.PrunekitError, match=r"inputs are finite: the model or the loss produced NaN"):
        pk.prune(model, "woodfisherblock", sparsity=0.5, data=_batches(), fisher_samples=4, fisher_batch=2)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 4, b"PK\x03\x04broken"])
def test_load_garbage_file(tmp_path, tiny_mlp, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(pk.PrunekitError, match="not a prunekit model file or is damaged") as e:
        pk.load(path, tiny_mlp)
    assert str(path) in str(e.value)
    assert "weights_only" not in str(e.value)


def test_load_truncated_file(tmp_path, tiny_mlp):
    path = tmp_path / "m.pt"
    pk.save(path, tiny_mlp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(pk.PrunekitError, match="damaged") as e:
        pk.load(path, tiny_mlp)
    assert "weights_only" not in str(e.value)


def test_load_missing_file(tmp_path, tiny_mlp):
    with pytest.raises(pk.PrunekitError, match="does not exist"):
        pk.load(tmp_path / "nope.pt", tiny_mlp)


def test_data_given_as_one_batch():
    x, y = _batches(1)[0]
    with pytest.raises(pk.PrunekitError, match=r"one \(inputs, targets\) batch.*\[\(x, y\)\]"):
        pk.prune(_conv_net(), "snip", sparsity=0.5, data=(x, y))
