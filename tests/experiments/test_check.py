"""prunekit check: the seeds' headline claims, CPU-sized, on real MNIST."""
import pytest
import torch

import prunekit as pk
from prunekit.data import data_dir
from prunekit.experiments.check import check, claims

pytestmark = pytest.mark.usefixtures("one_thread")
MNIST = data_dir() / "mnist" / "mnist.pkl.gz"


def test_a_claim_whose_assets_are_missing_is_skipped_with_the_fetch_command(tmp_path):
    lines = []
    assert check(tmp_path / "runs", only=["px_pretrained"], data_dir=tmp_path / "empty", log=lines.append) == {}
    assert lines[0].startswith("SKIP  [004]") and "prunekit models fetch efficientnet_lite0" in lines[0]
    assert "prunekit data fetch fashion_mnist" in lines[0] and lines[-1].endswith("1 skipped")


def test_claims_cover_every_seed_and_unknown_names_fail():
    assert {c.seed for c in claims()} == {"000", "001", "002", "003", "004"}
    with pytest.raises(pk.PrunekitError, match="unknown claim 'wodfisher'.*woodfisher"):
        check("unused", only=["wodfisher"])


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.exists(), reason="real MNIST absent: run `prunekit data fetch mnist` (make test does)")
def test_check_runs_and_reports(tmp_path):
    torch.set_num_threads(2)
    lines = []
    res = check(tmp_path, only=["px", "woodfisher"], log=lines.append)
    assert res == {"px": True, "woodfisher": True}
    assert lines[-1].startswith("2/2 claims hold") and all(line.startswith("PASS") for line in lines[:2])
    again = []
    assert check(tmp_path, only=["px"], log=again.append) == {"px": True}  # cached: compares stored runs
