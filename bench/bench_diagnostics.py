"""What the post-prune diagnostics cost next to the pruning step they describe (issue: 97 s of a 222 s ResNet-20
run with ``data.subset: 100`` went to evaluating the full validation and test sets right after pruning).

ResNet-20 on CIFAR-shaped synthetic data (5,000 validation and 10,000 test images, as CIFAR-10 with its default
split), 100 scoring samples. Measured in one process, interleaved: the pruning step (``pk.prune`` with SNIP, and
with magnitude), the old diagnostics (accuracy on the full validation and test sets) and the new ones (on the fixed
subsets of ``prunekit.experiments.measure.DIAGNOSE_SAMPLES`` samples each); prints seconds and ratios.

    python bench/bench_diagnostics.py [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import prunekit as pk
from prunekit.data import load_dataset, loaders, scoring_data
from prunekit.experiments.measure import DIAGNOSE_SAMPLES, diagnose_sets
from prunekit.models import get_model
from prunekit.train import Trainer, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_dataset("synthetic", n_train=1000, n_val=5000, n_test=10000, input_shape=(3, 32, 32),
                          num_classes=10)
    _, val_dl, test_dl = loaders(splits, 128, eval_batch_size=1000)
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    data = scoring_data(splits, {"random": args.samples}, batch_size=args.samples, seed=0)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    pk.prune(copy.deepcopy(model), "magnitude", sparsity=0.9)  # warm-up (first calls load kernels)
    t_snip, _ = timed(lambda: pk.prune(copy.deepcopy(model), "snip", sparsity=0.9, data=data))
    pruned = copy.deepcopy(model)
    t_mag, masks = timed(lambda: pk.prune(pruned, "magnitude", sparsity=0.9))
    trainer = Trainer(pruned, TrainConfig(epochs=1, progress=False), [], masks=masks)
    t_full, _ = timed(lambda: (trainer.evaluate(val_dl), trainer.evaluate(test_dl)))
    sets = diagnose_sets(splits, 1000, "cpu", val_dl, test_dl)
    t_new, _ = timed(lambda: (trainer.evaluate(sets["val"][0]), trainer.evaluate(sets["test"][0])))
    print(f"torch {torch.__version__}, {args.threads} thread(s), ResNet-20, {len(splits.val)} val + "
          f"{len(splits.test)} test images, DIAGNOSE_SAMPLES={DIAGNOSE_SAMPLES}")
    print(f"pruning step: snip ({args.samples} samples) {t_snip:.2f} s, magnitude {t_mag:.3f} s")
    print(f"diagnostics before (full val + test): {t_full:.2f} s = {t_full / t_snip:.1f}x the snip step")
    print(f"diagnostics now ({sets['val'][1]} + {sets['test'][1]} samples): {t_new:.2f} s = "
          f"{t_new / t_snip:.2f}x the snip step; {t_full / t_new:.1f}x cheaper")


if __name__ == "__main__":
    main()
