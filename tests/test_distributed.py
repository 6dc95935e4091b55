"""One fold over two processes (DistributedDataParallel, gloo on the CPU): the same files as one
process, every validation row once, a score within noise, checkpoints that resume with another
number of processes, and the launcher from a notebook run by the runner."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import artifacts, distributed, freshness, pipeline
from helpers.config import CFG
from helpers.data import EpochSampler, read_train
from helpers.tools.demo import write_digits
from helpers.folds import get_folds
from helpers.train import train_fold


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("ddp") / "comp", size=24, n=300, string_labels=True)


def fold_cfg(comp, models, **kw) -> CFG:
    base = dict(competition_dir=str(comp), models_dir=str(models), cache_dir=str(models / "cache"), experiment="d",
                n_folds=2, epochs=5, img_size=32, batch_size=16, num_workers=0, arch="timm", model_name="resnet18",
                warmup_epochs=0, lr=3e-3, augment="none", pretrained=False)
    return CFG(**{**base, **kw})


def test_a_sampler_deals_each_process_its_own_rows():
    train = [EpochSampler(10, shuffle=True, batch_size=2, rank=r, world=2) for r in (0, 1)]
    valid = [EpochSampler(11, shuffle=False, batch_size=2, rank=r, world=2) for r in (0, 1)]
    for s in train:
        s.set_epoch(3)
    rows = [[i for i, _, _ in s] for s in train]
    assert len(rows[0]) == len(rows[1]) == 5 and not set(rows[0]) & set(rows[1])  # equal shares, no overlap
    assert sorted(i for s in valid for i, _, _ in s) == list(range(11))  # validation: every row, once
    batches = [{b for _, _, b in s} for s in train]
    assert not batches[0] & batches[1]  # each process's batches draw their own augmentations


@pytest.fixture(scope="module")
def two_runs(comp, tmp_path_factory):
    """The same fold in one process and in two. The model has no BatchNorm (a ViT) and no
    dropout or augmentation: the two processes' batches together are the one process's batch,
    DDP averages their gradients, so the runs must agree to float precision (fp32: bf16 rounds
    sums over half the batch otherwise than over all of it)."""
    runs = {}
    for ddp in (1, 2):
        cfg = fold_cfg(comp, tmp_path_factory.mktemp(f"ddp{ddp}"), ddp=ddp, model_name="vit_tiny_patch16_224",
                       drop_rate=0.0, epochs=2, lr=1e-3, grad_clip=0.0, amp_dtype="fp32")
        result = train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
        runs[ddp] = (cfg, result)
    return runs


def test_two_processes_train_what_one_trains_and_write_the_same_files(two_runs):
    (one, r1), (two, r2) = two_runs[1], two_runs[2]
    assert sorted(p.name for p in artifacts.fold_dir(two, 0).iterdir()) == sorted(p.name for p in artifacts.fold_dir(one, 0).iterdir())
    oof1, oof2 = (artifacts.read_predictions(c, "oof", 0).sort_values("id").reset_index(drop=True) for c in (one, two))
    assert list(oof2.columns) == list(oof1.columns)
    assert oof2["id"].tolist() == oof1["id"].tolist() and oof2["id"].is_unique  # every validation row, once
    np.testing.assert_allclose(oof2.filter(like="prob_").to_numpy(), oof1.filter(like="prob_").to_numpy(), atol=1e-5)
    assert np.load(artifacts.logits_path(two, 0)).shape == np.load(artifacts.logits_path(one, 0)).shape
    rows = [json.loads(line) for line in artifacts.metrics_path(two, 0).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and r2["score"] == pytest.approx(r1["score"])
    assert "x 2 processes" in artifacts.log_path(two).read_text()


def test_a_checkpoint_resumes_with_another_number_of_processes(comp, tmp_path):
    cfg = fold_cfg(comp, tmp_path, epochs=2, keep_last=True)
    train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
    freshness.stamp_path(cfg, "train", 0).unlink()  # as if killed after its last epoch, before it was recorded
    again = fold_cfg(comp, tmp_path, epochs=2, keep_last=True, ddp=2)
    result = train_fold(again, get_folds(again, read_train(again)), 0, None)
    assert "resuming from" in artifacts.log_path(cfg).read_text() and "after epoch 2" in artifacts.log_path(cfg).read_text()
    assert len(result["history"]) == 2 and freshness.stale(again, "train", 0) is None


def test_settings_that_cannot_work_with_several_processes_are_named(comp, tmp_path):
    for bad, message in (({"batch_size": 15}, "batch_size"), ({"sync_bn": True}, "sync_bn")):
        cfg = fold_cfg(comp, tmp_path / "m", ddp=2, epochs=1, **bad)
        with pytest.raises(Exception, match="_ddp_worker FAILED|" + message):
            train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)


def test_the_runner_trains_a_fold_over_two_processes_from_its_notebook(comp, tmp_path, capsys):
    import yaml

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "cache_dir": str(tmp_path / "cache"),
        "n_folds": 2, "folds": [0], "epochs": 1, "img_size": 32, "batch_size": 16, "num_workers": 0, "ddp": 2,
        "experiment": "ddp_nb", "pretrained": False}))
    assert pipeline.main(["--config", str(config), "--stages", "01_folds", "02_train"]) == 0
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), experiment="ddp_nb", n_folds=2)
    assert artifacts.checkpoint_path(cfg, 0).exists()
    oof = pd.read_csv(artifacts.predictions_path(cfg, "oof", 0))
    assert oof["id"].is_unique and len(oof) == (pd.read_csv(artifacts.folds_path(cfg))["fold"] == 0).sum()
    assert "2 processes (DistributedDataParallel)" in artifacts.log_path(cfg).read_text()


def test_the_runner_runs_its_notebooks_as_ray_tasks(comp, tmp_path, capsys):
    """--executor ray with a local Ray: the folds run as parallel tasks, every stage runs, the
    skip rules are unchanged, and a failing notebook is named with its cell. (Ray is an
    optional extra: skipped where it is not installed.)"""
    pytest.importorskip("ray")
    import yaml

    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump({
        "competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "submissions_dir": str(tmp_path / "subs"),
        "cache_dir": str(tmp_path / "cache"), "n_folds": 2, "epochs": 1, "img_size": 32, "batch_size": 16,
        "num_workers": 0, "lgbm_params": {"n_estimators": 20}, "experiments": {"ray_cnn": {}}}))
    try:
        assert pipeline.main(["--config", str(config), "--executor", "ray"]) == 0
        out = capsys.readouterr().out
        assert "02_train fold 0 [ray_cnn] ... as a Ray task (parallel)" in out and "2 folds in parallel (Ray tasks)" in out
        assert (tmp_path / "subs" / "submission.csv").exists()
        assert pipeline.main(["--config", str(config), "--executor", "ray"]) == 0
        assert capsys.readouterr().out.count("up to date, skipped") == 7  # all 7 notebooks
        # a notebook failing on a Ray worker is reported as locally: notebook, cell, error, executed copy
        assert pipeline.main(["--config", str(config), "--executor", "ray", "--stages", "04_stacking",
                              "--set", "lgbm_params={num_leaves: -5}"]) == 1
        err = capsys.readouterr().err
        assert "notebook 04_stacking.ipynb failed (04_stacking [ray_cnn]) at cell" in err and "num_leaves" in err
    finally:
        import ray

        ray.shutdown()


def _start_method(path: str) -> None:
    import torch.distributed as dist

    distributed.start()
    try:
        Path(path).write_text(multiprocessing.get_start_method())
    finally:
        dist.destroy_process_group()


def test_a_fold_process_starts_its_dataloader_workers_the_platform_way(tmp_path):
    """The launcher spawns its processes; their DataLoader workers must not be spawned too (each
    would import torch, timm and albumentations again: 30 s before a fold's first batch here)."""
    out = tmp_path / "method.txt"
    distributed.launch(_start_method, 1, str(out))
    assert out.read_text() == multiprocessing.get_context().get_start_method()  # fork on Linux, as under torchrun


def test_a_frozen_backbone_trains_over_two_processes_and_then_unfreezes(comp, tmp_path):
    """freeze_epochs under DDP: the wrapper is built for the parameters that train, and built
    again when the backbone joins them (DDP registers its gradient hooks once)."""
    cfg = fold_cfg(comp, tmp_path, ddp=2, epochs=2, freeze_epochs=1)
    result = train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
    assert [r["epoch"] for r in result["history"]] == [1, 2] and np.isfinite(result["score"])


def test_each_process_draws_its_own_random_numbers_from_the_same_sampler_order():
    """Dropout and drop-path masks, the device-side warp and Mixup draw from the global
    generators: each rank seeds them apart; the sampler's shared order stays one seed; rank 0's
    draws are those of a single process (one process trains as before)."""
    import torch

    from helpers.train import seed_epoch

    cfg = CFG(seed=7)
    draws = {}
    for rank in (0, 1):
        order = seed_epoch(cfg, seed_id=2, epoch=3, rank=rank)
        draws[rank] = (order, torch.rand(4).tolist(), np.random.rand(2).tolist())
    assert draws[0][0] == draws[1][0]  # one permutation of the rows, dealt among the ranks
    assert draws[0][1] != draws[1][1] and draws[0][2] != draws[1][2]
    torch.manual_seed(draws[0][0])
    assert torch.rand(4).tolist() == draws[0][1]  # rank 0: the single-process seed
