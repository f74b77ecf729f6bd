"""The OBS memory planner on transformer-sized models (issue 16 §1): a streamed Fisher (no stored gradient matrix,
the oBERT recipe) when G does not fit but the block inverses do, equal to the stored-G step; a refusal with the
numbers of both ways, before any data is read, when neither fits; the MiniLM numbers (planner only, no
allocation)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import prunekit as pk
from prunekit.errors import PrunekitError
from prunekit.families.obs import planner as P
from prunekit.families.obs.blocks import global_layout, layer_layout

pytest.importorskip("transformers")

from tests.core.test_hf_models import bert_batches, tiny_bert  # noqa: E402

GIB = 2**30
#: The prunable tensors of the fetched MiniLM (MiniLM-L6-H384: 6 layers of Q, K, V, O (384×384) and the MLP
#: (384×1536, 1536×384): 36 Linear, 10,616,832 weights of its 22.7M parameters; the rest is embeddings).
MINILM = ([384 * 384] * 4 + [384 * 1536] * 2) * 6
#: A 12-layer H384 encoder: 72 Linear, 21,233,664 prunable weights (the "about 21M" of the issue).
L12 = MINILM * 2
LIMIT_24GB = int(P.HOST_FRACTION * 24 * GIB)  # the default budget on a 24 GB machine with all of it available


def test_minilm_sizes():
    assert sum(MINILM) == 10_616_832 and len(MINILM) == 36 and sum(L12) == 21_233_664


#: (sizes, G of 1024 gradients, inverses of blocks of 50, largest N with G stored, largest streamable block size)
CASES = {"minilm": (MINILM, "40.50", 3.95, 423, 210), "l12": (L12, "81.00", 7.91, 211, 104)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_minilm_obert_recipe_streams_within_24gb(case):
    """1024 gradients, blocks of 50 (oBERT): G does not fit; the block inverses (d·50·8 bytes) do."""
    sizes, g_gib, inv_gib, _, _ = CASES[case]
    lay = layer_layout(sizes, 50)
    with pytest.raises(PrunekitError, match=rf"gradient matrix alone needs {g_gib} GiB"):
        P.plan(lay, 1024, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB)  # G stored only: refused
    plan = P.plan(lay, 1024, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB, streamable=True)
    assert plan.streamed and plan.cache_bytes == sum(c * c * 8 for c in _blocks(sizes, 50))
    assert abs(plan.cache_bytes / GIB - inv_gib) < 0.01
    assert 1 <= plan.stream_rows <= 1024 and plan.stream_rows * sum(sizes) * 4 <= P.STREAM_ROW_BYTES
    assert plan.peak_bytes <= plan.limit
    assert "streamed Fisher" in plan.summary()


def _blocks(sizes, c):
    out = []
    for n in sizes:
        out += [c] * (n // c) + ([n % c] if n % c else [])
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_minilm_stored_gradients_fit_up_to_a_number_of_samples(case):
    sizes, _, _, max_n, _ = CASES[case]
    lay = layer_layout(sizes, 50)
    plan = P.plan(lay, max_n, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB)
    assert not plan.streamed and plan.peak_bytes <= plan.limit
    assert max_n == (LIMIT_24GB - P.MARGIN) // (sum(sizes) * 4)  # G alone: N·d·4 bytes
    with pytest.raises(PrunekitError, match=rf"lower fisher_samples \(at most {max_n}\)"):
        P.plan(lay, max_n + 10, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB)


@pytest.mark.parametrize("case", sorted(CASES))
def test_minilm_large_blocks_refuse_with_the_numbers_of_both_ways(case):
    sizes, g_gib, _, _, c_fit = CASES[case]
    with pytest.raises(PrunekitError) as e:
        P.plan(layer_layout(sizes, 2000), 1024, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB,
               streamable=True)
    msg = str(e.value)
    assert "neither way" in msg and f"{g_gib} GiB" in msg and "limit 16.80 GiB" in msg  # G
    inv = sum(c * c * 8 for c in _blocks(sizes, 2000))
    assert f"{inv / GIB:.2f} GiB" in msg  # the inverses of blocks of 2000
    assert c_fit == (LIMIT_24GB - P.MARGIN - 2 * sum(sizes) * 4) // (sum(sizes) * 8)
    assert f"block_size: {c_fit}" in msg
    # and that block size does stream
    assert P.plan(layer_layout(sizes, c_fit), 1024, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB,
                  streamable=True).streamed
    # the full WoodFisher (one block of every weight) cannot stream: it says so
    with pytest.raises(PrunekitError, match="neither way"):
        P.plan(global_layout(sizes, None), 1024, widest_tensor=384 * 1536, memory_limit=LIMIT_24GB,
               streamable=True)


class NeverRead:
    """Data that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("the data was read before the memory planner refused")


def test_refusal_comes_before_reading_any_data():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match="does not fit in memory"):
        pk.prune(model, "woodfisherblock", 0.5, NeverRead(), memory_limit=P.MARGIN + 1024)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["woodfisherblock", "woodtaylorblock", "woodfisherblockdynamic"])
def test_streamed_fisher_equals_the_stored_gradient_matrix(method, caplog):
    """A memory_limit too small for G (16 gradients of 16,384 weights: 1 MiB) but large enough for the 4×4 block
    inverses (0.5 MiB): the streamed step (rank-k Woodbury updates of each inverse, k rows at a time) gives the masks
    and weights of the stored-G step."""
    data = bert_batches(6)  # 18 examples, dict batches
    opts = dict(fisher_samples=16, block_size=4)
    stored, streamed = tiny_bert(torch.float64), tiny_bert(torch.float64)
    ma = pk.prune(stored, method, 0.6, data, **opts)
    with caplog.at_level(logging.INFO, logger="prunekit.obs"):
        mb = pk.prune(streamed, method, 0.6, data, memory_limit=P.MARGIN + 800 * 1024, **opts)
    assert "streamed Fisher" in caplog.text and "gradients 2 rows at a time" in caplog.text
    for k, m in ma.as_dict().items():
        assert torch.equal(m, mb.as_dict()[k]), k
    for (name, a), b in zip(stored.named_parameters(), streamed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
