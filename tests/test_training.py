"""Every training switch on tiny data: the loss goes down, checkpoints round-trip, and the
switch really acts (EMA weights checkpointed, frozen backbone unchanged, Mixup soft targets,
regression on the original scale, ...)."""
from __future__ import annotations

import json
import sys
import types

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import artifacts
from helpers.cache import create_cache, resize_image
from helpers.config import CFG, ROOT, load_cfg
from helpers.data import read_train
from helpers.folds import get_folds
from helpers.losses import FocalLoss, SoftCrossEntropy, TargetScale
from helpers.tasks import create_criterion
from helpers.models import create_model
from helpers.runtime import seed_everything
from helpers.data import create_loader
from helpers.engine import set_backbone_trainable
from helpers.train import param_groups, train_fold
from helpers.transforms import InputNorm, create_resize, create_transforms, input_stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    from helpers.tools.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("train") / "comp", size=16, n=200, string_labels=True)


def tiny_cfg(comp, tmp_path, **kw) -> CFG:
    base = dict(competition_dir=str(comp), models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "cache"),
                experiment="t", n_folds=2, epochs=3, img_size=32, batch_size=16, num_workers=0, lr=3e-3,
                arch="hybrid", model_kwargs=dict(patch_size=8, emb_dim=16, num_heads=2), patience=10, warmup_epochs=0,
                pretrained=False)
    return CFG(**{**base, **kw})


def run(cfg: CFG) -> dict:
    folds = get_folds(cfg, read_train(cfg))
    return train_fold(cfg, folds, 0, None)


SWITCHES = {
    "baseline": {},
    "smoothing+class_weights": {"label_smoothing": 0.1, "class_weights": "balanced"},
    "focal": {"loss": "focal", "focal_gamma": 2.0, "focal_alpha": 0.5},
    "mixup+cutmix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mixup_off_epoch": 2},
    "ema": {"ema": True, "ema_decay": 0.9},
    "sgd+poly": {"optimizer": "sgd", "scheduler": "poly", "lr": 0.05},
    "accumulation": {"grad_accum": 2},
    "channels_last": {"channels_last": True},
    "medium_aug+tta": {"augment": "medium", "hflip": True, "tta": ["hflip", "vflip"]},
    "heavy_aug": {"augment": "heavy"},
    "sampling": {"sampling_ratio": 0.5},
    "no_cache": {"cache": False},
    "compile": {"compile": True},
    "timm+layer_decay+drop_path": {"arch": "timm", "model_name": "resnet18", "model_kwargs": {}, "layer_decay": 0.75, "drop_path": 0.1},
}


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_trains(name, comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, **SWITCHES[name])
    result = run(cfg)
    history = result["history"]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    best = torch.load(artifacts.exp_dir(cfg) / "fold0" / "best.pt", weights_only=False)
    model = create_model(cfg, 10)
    model.load_state_dict(best["model"])  # the checkpoint round-trips into a fresh model
    oof = pd.read_csv(artifacts.exp_dir(cfg) / "oof_fold0.csv")
    probs = oof.filter(like="prob_").to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)


def test_ema_weights_are_validated_and_checkpointed(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, ema=True, ema_decay=0.9, epochs=2, keep_last=True)
    run(cfg)
    last = torch.load(artifacts.exp_dir(cfg) / "fold0" / "last.pt", weights_only=False)
    best = torch.load(artifacts.exp_dir(cfg) / "fold0" / "best.pt", weights_only=False)
    ema_weights = {k.removeprefix("module."): v for k, v in last["ema"].items()}
    key = "classifier.fc.weight"
    assert not torch.equal(ema_weights[key], last["model"][key])  # EMA differs from the raw weights
    if best["epoch"] == 2:
        assert torch.equal(best["model"][key], ema_weights[key])  # best.pt holds the EMA weights


def test_frozen_backbone_stays_put_then_trains_at_lower_lr(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, arch="timm", model_name="resnet18", model_kwargs={}, freeze_epochs=1, backbone_lr_scale=0.1, epochs=1)
    model = create_model(cfg, 10)
    groups = param_groups(model, cfg)
    head_ids = {id(p) for p in model.head.parameters()}
    for g in groups:
        is_head = all(id(p) in head_ids for p in g["params"])
        assert g["lr_scale"] == (1.0 if is_head else 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_backbone_trainable(model, False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    run(cfg)  # one epoch, all frozen: the backbone's weights come out as train_fold initialised them
    best = torch.load(artifacts.exp_dir(cfg) / "fold0" / "best.pt", weights_only=False)["model"]
    seed_everything(cfg.seed)  # train_fold seeds with cfg.seed + fold before creating the model
    initial = create_model(cfg, 10).state_dict()
    assert torch.equal(best["backbone.conv1.weight"], initial["backbone.conv1.weight"])
    assert torch.equal(best["backbone.layer4.1.conv2.weight"], initial["backbone.layer4.1.conv2.weight"])
    assert not torch.equal(best["head.1.weight"], initial["head.1.weight"])
    assert before.keys() == initial.keys()
    # its BatchNorm layers stayed in eval mode: their running statistics did not drift either
    assert torch.equal(best["backbone.bn1.running_mean"], initial["backbone.bn1.running_mean"])
    assert torch.equal(best["backbone.layer4.1.bn2.running_var"], initial["backbone.layer4.1.bn2.running_var"])


def test_layer_decay_scales_early_layers_lower(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, arch="timm", model_name="resnet18", model_kwargs={}, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in param_groups(create_model(cfg, 10), cfg)})
    assert scales[0] < 0.1 and scales[-1] == 1.0


def test_losses_take_hard_and_soft_targets():
    logits = torch.randn(8, 4, requires_grad=True)
    hard = torch.randint(0, 4, (8,))
    soft = torch.nn.functional.one_hot(hard, 4).float()
    ce = SoftCrossEntropy()
    assert torch.allclose(ce(logits, hard), ce(logits, soft), atol=1e-6)
    focal = FocalLoss(alpha=1.0, gamma=0.0)  # gamma 0 is plain cross-entropy
    assert torch.allclose(focal(logits, hard), ce(logits, hard), atol=1e-6)
    assert FocalLoss(gamma=2.0)(logits, hard) < ce(logits, hard)  # easy examples down-weighted
    weighted = create_criterion(CFG(class_weights="balanced"), np.array([0, 0, 0, 1, 2, 3]), 4)
    assert weighted.weight[0] < weighted.weight[1]


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_regression_the_pawpularity_way(loss, comp, tmp_path):
    reg = tmp_path / "reg"
    import shutil

    shutil.copytree(comp, reg)
    train = pd.read_csv(reg / "train.csv")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    train["score"] = train["label"].map({n: 10.0 * i + 5 for i, n in enumerate(names)})
    train.to_csv(reg / "train.csv", index=False)
    cfg = tiny_cfg(reg, tmp_path, task="regression", metric="rmse", target_col="score", loss=loss, epochs=4)
    result = run(cfg)
    oof = pd.read_csv(artifacts.exp_dir(cfg) / "oof_fold0.csv")
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    # predictions and RMSE are on the original 5..95 scale, not the [0, 1] the model trains on
    assert oof["pred"].between(0, 100).all() and oof["pred"].max() > 20
    rmse = float(np.sqrt(((oof["pred"] - oof["score"]) ** 2).mean()))
    assert abs(rmse - result["score"]) < 1e-6 and rmse < train["score"].std() * 1.2
    scale = TargetScale(5, 95)
    assert scale.from_outputs(torch.tensor([0.0]), "bce").item() == pytest.approx(50.0)


def test_binary_roc_auc(comp, tmp_path):
    binary = tmp_path / "bin"
    import shutil

    shutil.copytree(comp, binary)
    train = pd.read_csv(binary / "train.csv")
    train["label"] = np.where(train["label"].isin(["zero", "two", "four", "six", "eight"]), "even", "odd")
    train.to_csv(binary / "train.csv", index=False)
    cfg = tiny_cfg(binary, tmp_path, metric="roc_auc", epochs=4)
    result = run(cfg)
    assert 0.5 < result["score"] <= 1.0
    assert list(pd.read_csv(artifacts.exp_dir(cfg) / "oof_fold0.csv").filter(like="prob_").columns) == ["prob_even", "prob_odd"]


def test_wandb_logs_each_epoch_offline(comp, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, row):
            calls["log"].append(row)

        def finish(self):
            calls["finish"] += 1

    fake = types.SimpleNamespace(init=lambda **kw: calls["init"].append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run(tiny_cfg(comp, tmp_path, wandb=True, epochs=2))
    assert calls["init"][0]["mode"] == "offline" and calls["init"][0]["name"] == "t_fold0"
    assert [r["epoch"] for r in calls["log"]] == [1, 2] and calls["finish"] == 1


def test_debug_mode_is_tiny_and_one_epoch(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, debug=True, debug_rows=40, epochs=5)
    result = run(cfg)
    assert len(result["history"]) == 1
    assert len(pd.read_csv(artifacts.exp_dir(cfg) / "folds.csv")) == 40


# --- augmentation pipelines ----------------------------------------------------------------
SKETCH = ROOT / "configs" / "sketch.yaml"


def test_sketch_pipeline_from_yaml(comp):
    cfg = load_cfg(SKETCH, overrides={"competition_dir": str(comp)})
    names = [type(t).__name__ for t in create_transforms(cfg, train=True).transforms]
    # the pipeline's final Normalize runs on the device (InputNorm), with its own statistics
    assert names == ["HorizontalFlip", "Rotate", "CoarseDropout", "GridDistortion", "Resize", "UnsharpMask",
                     "RandomBrightnessContrast", "ToTensorV2"]
    assert input_stats(cfg) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0)
    rotate = create_transforms(cfg, train=True).transforms[1]
    assert tuple(rotate.limit) == (-30, 30)
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    out = create_transforms(cfg, train=True)(image=image)["image"]
    assert tuple(out.shape) == (3, 224, 224) and out.dtype == torch.uint8
    assert InputNorm(input_stats(cfg), "cpu")(out[None]).dtype == torch.float32
    valid = [type(t).__name__ for t in create_transforms(cfg, train=False).transforms]
    assert valid == ["Resize", "ToTensorV2"]


def test_any_albumentations_pipeline_round_trips_through_yaml(tmp_path):
    pipeline = A.Compose([A.VerticalFlip(p=1.0), A.Resize(40, 40), A.Normalize()])
    text = yaml.safe_dump({"augment_pipeline": A.to_dict(pipeline)})
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_cfg(tmp_path / "c.yaml", overrides={"competition_dir": "comp"})
    image = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    ours = InputNorm(input_stats(cfg), "cpu")(create_transforms(cfg, train=True)(image=image)["image"][None])[0]
    theirs = torch.from_numpy(pipeline(image=image)["image"]).permute(2, 0, 1)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("preset", ["none", "light", "medium", "heavy"])
def test_augment_presets(preset):
    t = create_transforms(CFG(augment=preset, img_size=48, hflip=True), train=True)
    image = (np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8)
    assert tuple(t(image=image)["image"].shape) == (3, 48, 48)


# --- the decoded-image cache -----------------------------------------------------------------
def test_cache_holds_resized_images_and_is_reused(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, augment="none")
    paths = read_train(cfg)["path"].tolist()
    cache = create_cache(cfg, paths)
    assert cache.shape == (len(paths), 32, 32, 3)
    assert np.array_equal(cache.image(cache.rows([paths[7]])[0]), resize_image(paths[7], create_resize(cfg), 3))
    again = create_cache(cfg, paths)
    assert again.file == cache.file  # same sources and size: the same cache file
    assert create_cache(tiny_cfg(comp, tmp_path, img_size=24), paths).file != cache.file
    # batches through the cache equal batches decoded from the files
    df = read_train(cfg).head(20)
    with_cache = next(iter(create_loader(cfg, df, train=False, cache=cache)))[0]
    without = next(iter(create_loader(cfg, df, train=False)))[0]
    assert (with_cache.float() - without.float()).abs().max() <= 1  # uint8, same resize


def test_cache_works_in_worker_processes(comp, tmp_path):
    cfg = tiny_cfg(comp, tmp_path, num_workers=2)
    df = read_train(cfg)
    cache = create_cache(cfg, df["path"].tolist())
    batches = list(create_loader(cfg, df.head(40), train=True, seed=3, cache=cache))
    assert sum(len(b[0]) for b in batches) == 32  # drop_last on 40 rows of batch 16


def test_cache_off_when_disabled(comp, tmp_path):
    assert create_cache(tiny_cfg(comp, tmp_path, cache=False), []) is None


# --- preset configs -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pawpularity", "sketch", "highperf", "hybrid"])
def test_preset_configs_load(name):
    cfg = load_cfg(ROOT / "configs" / f"{name}.yaml")
    assert cfg.experiment
    json.dumps(cfg.augment_pipeline)  # plain data


def build_like(cfg: CFG, out, n: int = 24) -> None:
    """A tiny competition in a preset's own layout (its id, target and metadata columns, image
    extension), made from scikit-learn's digits."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "test"):
        (out / split).mkdir(exist_ok=True)
        for i in range(n if split == "train" else 6):
            idx = i + (0 if split == "train" else 100)
            img = cv2.resize((digits.images[idx] * 15).astype(np.uint8), (64, 64))
            name = f"{split}_{i:03d}"
            cv2.imwrite(str(out / split / f"{name}{cfg.image_ext or '.png'}"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
            row = {cfg.id_col: name, **{c: int(digits.target[idx] % 2) for c in cfg.metadata_cols}}
            if split == "train":
                y = digits.target[idx]
                row[cfg.target_col] = float(y * 10 + 5) if cfg.task == "regression" else ("odd" if y % 2 else "even")
            rows.append((split, row))
    train = pd.DataFrame([r for s, r in rows if s == "train"])
    test = pd.DataFrame([r for s, r in rows if s == "test"])
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    sample = test[[cfg.id_col]].assign(**{cfg.target_col: 0.0 if cfg.task == "regression" else "even"})
    sample.to_csv(out / "sample_submission.csv", index=False)


@pytest.mark.parametrize("name", ["pawpularity", "sketch", "highperf", "hybrid"])
def test_preset_configs_run_in_debug_mode(name, tmp_path):
    preset = load_cfg(ROOT / "configs" / f"{name}.yaml")
    build_like(preset, tmp_path / "comp")
    cfg = load_cfg(ROOT / "configs" / f"{name}.yaml", overrides={
        "competition_dir": str(tmp_path / "comp"), "models_dir": str(tmp_path / "models"),
        "cache_dir": str(tmp_path / "cache"), "pretrained": False, "debug": True, "debug_rows": 8,
        "n_folds": 2, "batch_size": 4, "num_workers": 0})
    folds = get_folds(cfg, read_train(cfg))
    result = train_fold(cfg, folds, 0, None)
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["train_loss"])
    assert (artifacts.exp_dir(cfg) / "oof_fold0.csv").exists()
