"""The tiny experiment shared by the CLI, sweep, backend and report tests: LeNet-300-100 on the synthetic dataset,
one epoch, magnitude pruning at 80%."""
import copy

TRAIN = {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "progress": False}


def tiny(name: str, **sections) -> dict:
    """The tiny config named ``name``, with whole sections (``train=...``, ``prune=...``, ``grid=...``) replaced."""
    cfg = {"name": name, "model": "lenet_300_100", "data": {"name": "synthetic"}, "train": dict(TRAIN),
           "prune": {"method": "magnitude", "sparsity": 0.8}, "seed": 0}
    cfg.update(copy.deepcopy(sections))
    return cfg


def fine_tune_of_dense(cfg: dict, folder) -> dict:
    """``cfg`` starting from the dense run of the same recipe (``model.pretrained`` naming a dense config written
    to ``folder/dense.yaml``)."""
    import yaml

    dense = copy.deepcopy(cfg)
    dense.pop("grid", None)
    dense["prune"] = {"method": "none"}
    (folder / "dense.yaml").write_text(yaml.safe_dump(dense))
    ft = copy.deepcopy(cfg)
    ft["model"] = {"name": "lenet_300_100", "pretrained": str(folder / "dense.yaml")}
    return ft


def die_after_epoch(monkeypatch, epoch: int):
    """Make every run die (KeyboardInterrupt) right after ``epoch`` is logged to the store, before its checkpoint is
    written; returns a function that undoes it."""
    from prunekit.experiments import Store

    real = Store.log_epoch

    def dying(self, rid, e, metrics):
        real(self, rid, e, metrics)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Store, "log_epoch", dying)
    return lambda: monkeypatch.setattr(Store, "log_epoch", real)
