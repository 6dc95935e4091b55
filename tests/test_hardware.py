"""GPU rules checked on the CPU: precision by the card's compute capability, no host-device
synchronisation in a training step, loaders built once, per-model preprocessing from timm,
fine-tuning (EMA warm-up, frozen BatchNorm, LR warm-up after unfreezing) and Kaggle's limits."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import artifacts, executors, pipeline
from helpers.config import CFG
from helpers.data import read_train
from helpers.folds import get_folds
from helpers.models import create_model
from helpers.runtime import autocast, channels_last, create_scaler, precision
from helpers.tools.demo import write_digits
from helpers.data import create_loader
from helpers.engine import rules_of, train_one_epoch
from helpers.train import param_groups, train_fold
from helpers.transforms import DeviceAffine, InputNorm, create_resize, input_stats
from helpers.utils import version_problems

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def card(monkeypatch, capability: tuple[int, int], name: str) -> torch.device:
    """Pretend to be on this GPU: what torch reports of the device (a T4 also says
    is_bf16_supported() is True, counting emulation)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return torch.device("cuda")


# --- 1. precision --------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, name, dtype, scaler", [
    ((7, 5), "Tesla T4", torch.float16, True),
    ((7, 0), "Tesla V100", torch.float16, True),
    ((6, 0), "Tesla P100", torch.float16, True),
    ((8, 0), "A100", torch.bfloat16, False),
    ((9, 0), "H100", torch.bfloat16, False),
])
def test_auto_precision_follows_the_card(monkeypatch, capability, name, dtype, scaler):
    device = card(monkeypatch, capability, name)
    assert precision("auto", device) == (dtype, scaler)
    assert autocast(CFG(amp_dtype="auto"), device).fast_dtype == dtype
    made = {}
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device_type, enabled: made.update(enabled=enabled))
    create_scaler(CFG(amp_dtype="auto"), device)
    assert made["enabled"] is scaler  # fp16 always with a GradScaler, bf16 never


@pytest.mark.parametrize("capability", [(7, 5), (9, 0)])
def test_channels_last_by_default_wherever_autocast_runs_on_cuda(monkeypatch, capability):
    device = card(monkeypatch, capability, "GPU")
    assert channels_last(CFG(), device)  # fp16 (T4) or bf16 (H100): NHWC for the tensor cores
    assert not channels_last(CFG(amp_dtype="fp32"), device)  # fp32: as PyTorch has it
    assert not channels_last(CFG(channels_last=False), device)  # as set
    assert not channels_last(CFG(amp_dtype="fp32"), torch.device("cpu"))
    assert channels_last(CFG(channels_last=True, amp_dtype="fp32"), torch.device("cpu"))


def test_a_p100_has_no_tensor_cores_and_keeps_nchw(monkeypatch):
    device = card(monkeypatch, (6, 0), "Tesla P100")
    assert precision("auto", device) == (torch.float16, True) and not channels_last(CFG(), device)
    assert channels_last(CFG(channels_last=True), device)


def test_adam_is_fused_on_cuda_so_the_scaler_never_reads_back():
    from helpers.runtime import optimizer_kwargs

    assert optimizer_kwargs(CFG(optimizer="adamw"), torch.device("cuda")) == {"fused": True}
    assert optimizer_kwargs(CFG(optimizer="adamw"), torch.device("cpu")) == {}
    assert optimizer_kwargs(CFG(optimizer="lamb"), torch.device("cuda")) == {}  # timm's own: as it comes


def test_explicit_precision(monkeypatch):
    t4 = card(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(ValueError, match="config key 'amp_dtype': bf16 needs compute capability 8.0.*Tesla T4"):
        precision("bf16", t4)
    assert precision("fp16", t4) == (torch.float16, True)
    assert precision("fp32", t4) == (None, False)
    a100 = card(monkeypatch, (8, 0), "A100")
    assert precision("fp16", a100) == (torch.float16, True) and precision("bf16", a100) == (torch.bfloat16, False)
    assert precision("fp32", torch.device("cpu")) == (None, False)
    assert precision("fp16", torch.device("cpu")) == (None, False)  # no fp16 autocast on a CPU: fp32
    assert precision("bf16", torch.device("cpu")) == (torch.bfloat16, False)  # asked for: even where emulated
    assert precision("auto", torch.device("mps")) == (None, False)


@pytest.mark.parametrize("native", [True, False])
def test_a_cpu_uses_bf16_only_where_it_computes_it_natively(monkeypatch, native):
    """AVX512-BF16 or AMX (Zen 4, Sapphire Rapids): bf16 autocast and channels_last; an older
    CPU (Kaggle's Xeons: AVX-512 without BF16) only emulates bf16 and stays fp32, NCHW."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert precision("auto", cpu) == ((torch.bfloat16, False) if native else (None, False))
    assert channels_last(CFG(), cpu) is native
    assert create_scaler(CFG(), cpu).is_enabled() is False
    assert (autocast(CFG(), cpu).fast_dtype == torch.bfloat16) if native else not hasattr(autocast(CFG(), cpu), "fast_dtype")


# --- 2. no synchronisation in a step, loaders built once --------------------------------------------
def test_a_training_step_never_waits_for_the_device(monkeypatch):
    """The reads from the device (`.item()`) and the constants made on the host (`torch.tensor`)
    of an epoch do not grow with its steps: none is in a step."""
    from timm.scheduler import create_scheduler_v2

    cfg = CFG(arch="timm", model_name="resnet18", img_size=16, batch_size=4, epochs=1, warmup_epochs=0, amp_dtype="fp32",
              pretrained=False)
    model = create_model(cfg, 3)
    norm = InputNorm(input_stats(cfg), "cpu")
    calls = {"item": 0, "tensor": 0}
    item, tensor = torch.Tensor.item, torch.tensor
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.__setitem__("item", calls["item"] + 1) or item(self))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.__setitem__("tensor", calls["tensor"] + 1) or tensor(*a, **k))
    counts = []
    for steps in (4, 12):
        data = TensorDataset(torch.randint(0, 255, (4 * steps, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (4 * steps,)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, step_on_epochs=False, updates_per_epoch=steps)
        calls.update(item=0, tensor=0)
        train_one_epoch(model, DataLoader(data, batch_size=4), torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                        create_scaler(cfg, torch.device("cpu")), torch.device("cpu"), 0, rules_of(cfg, torch.device("cpu")), norm)
        counts.append(dict(calls))
    assert counts[0] == counts[1] and counts[0]["tensor"] == 0 and counts[0]["item"] <= 2  # the mean loss (+ the loader's seed)


def test_normalisation_constants_live_on_the_device_and_inputs_follow_the_memory_format():
    norm = InputNorm(((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 255.0), "cpu", channels_last=True)
    assert norm.mean.device.type == "cpu" and norm.mean.flatten().tolist() == [127.5] * 3
    out = norm(torch.full((2, 3, 8, 8), 255, dtype=torch.uint8))
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out, torch.ones_like(out))


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("hw") / "comp", size=24, n=120, string_labels=True)


def tiny(comp, tmp_path, **kw) -> CFG:
    base = dict(competition_dir=str(comp), models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "cache"),
                experiment="hw", n_folds=2, epochs=2, img_size=32, batch_size=16, num_workers=0, arch="hybrid",
                model_kwargs=dict(patch_size=8, emb_dim=16, num_heads=2), warmup_epochs=0, augment="medium")
    return CFG(**{**base, **kw})


def test_a_loader_built_once_gives_each_epoch_what_a_fresh_one_would(comp, tmp_path):
    """Persistent workers, reseeded per epoch from the sampler: epoch 2 of a loader that also
    served epoch 1 equals epoch 2 of a new loader (a resumed run), whatever the workers."""
    cfg = tiny(comp, tmp_path, num_workers=2)
    df = read_train(cfg).head(48)
    kept = create_loader(cfg, df, train=True)
    assert kept.persistent_workers
    kept.sampler.set_epoch(11)
    first = [b[0].clone() for b in kept]
    kept.sampler.set_epoch(12)
    second = [b[0].clone() for b in kept]
    fresh = create_loader(cfg, df, train=True)
    fresh.sampler.set_epoch(12)
    again = [b[0] for b in fresh]
    assert all(torch.equal(a, b) for a, b in zip(second, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    alone = create_loader(tiny(comp, tmp_path, num_workers=0), df, train=True)  # no workers at all: the same too
    alone.sampler.set_epoch(12)
    assert all(torch.equal(a, b[0]) for a, b in zip(second, alone))


def test_a_fold_builds_its_loaders_once(comp, tmp_path, monkeypatch):
    from helpers import train

    made = []
    real = train.create_loader
    monkeypatch.setattr(train, "create_loader", lambda *a, **k: made.append(k.get("train", a[2] if len(a) > 2 else None)) or real(*a, **k))
    cfg = tiny(comp, tmp_path, epochs=3)
    train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
    assert made == [True, False]  # one training and one validation loader for 3 epochs


@pytest.mark.parametrize("sx, sy, rotate, shear_x, shear_y, translate", [
    (1.2, 0.8, 15, 5, -3, 0.0), (0.9, 1.1, -20, -5, 4, 0.125), (1.1, 1.1, 10, 0, 0, -0.125)])
def test_the_presets_warp_on_the_device_as_albumentations_would(sx, sy, rotate, shear_x, shear_y, translate):
    import math

    import albumentations as A

    from helpers.transforms import warp_affine

    img = np.zeros((64, 64, 3), np.float32)
    img[20:44, 10:30] = 1.0
    img[5:10, 40:60] = 1.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    ours = warp_affine(x, t(sx), t(sy), t(math.radians(rotate)), t(math.tan(math.radians(shear_x))),
                       t(math.tan(math.radians(shear_y))), t(2 * translate), t(2 * translate))[0].permute(1, 2, 0).numpy()
    theirs = A.Compose([A.Affine(scale={"x": (sx, sx), "y": (sy, sy)}, translate_percent=(translate, translate), rotate=rotate,
                                 shear={"x": (shear_x, shear_x), "y": (shear_y, shear_y)}, p=1)])(image=img)["image"]
    assert ((ours > 0.5) != (theirs > 0.5)).mean() < 0.002  # the same geometry (whole-pixel shifts: A rounds them)
    assert torch.equal(DeviceAffine((0.5, 2), (-0.2, 0.2), (-30, 30), p=0.0)(x), x)  # not drawn: untouched


def test_the_device_warp_fills_black_as_albumentations_does():
    norm = InputNorm(((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 255.0), "cpu",
                     augment=DeviceAffine((0.5, 0.5), (0.0, 0.0), (0, 0), p=1.0))  # shrink: a border comes in
    out = norm(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert out[0, :, 0, 0].tolist() == [-2.0] * 3  # black, normalised: (0 - 127.5) / 63.75
    assert torch.allclose(out[0, :, 16, 16], torch.full((3,), 2.0))  # the image, normalised


# --- 3. per-model preprocessing -------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """Local weights of a model whose pretrained_cfg mean and std are 0.5 (ViT augreg), as an
    internet-off kernel gives them (pretrained_path)."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


def test_a_pretrained_model_gets_its_own_normalisation_and_interpolation(comp, tmp_path, vit_weights):
    from helpers.predict import Predictor

    cfg = tiny(comp, tmp_path, arch="timm", model_name="vit_tiny_patch16_224.augreg_in21k", model_kwargs={},
               pretrained=True, pretrained_path=str(vit_weights), epochs=1, augment="none")
    assert input_stats(cfg) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 255.0)  # not ImageNet's
    assert create_resize(cfg).interpolation == cv2.INTER_CUBIC  # its pretrained_cfg says bicubic
    assert input_stats(CFG(model_name="vit_tiny_patch16_224.augreg_in21k", pretrained=False))[0] == (0.485, 0.456, 0.406)  # from scratch
    train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)  # a ViT at 32 px: img_size reaches the model
    predictor = Predictor.from_experiment(artifacts.exp_dir(cfg))
    assert predictor.norm.mean.flatten().tolist() == [127.5] * 3  # inference normalises as training did


def test_the_cache_shrinks_with_area_interpolation(comp, tmp_path):
    cfg = tiny(comp, tmp_path, img_size=16)
    board = (np.indices((96, 96)).sum(0) % 2 * 255).astype(np.uint8)[:, :, None].repeat(3, 2)
    out = create_resize(cfg)(image=board)["image"]
    np.testing.assert_array_equal(out, cv2.resize(board, (16, 16), interpolation=cv2.INTER_AREA))  # grey, no aliasing


# --- 4. fine-tuning -----------------------------------------------------------------------------------
def test_ema_warms_up_and_both_scores_are_logged(comp, tmp_path):
    cfg = tiny(comp, tmp_path, ema=True, ema_decay=0.9998, epochs=2)
    train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
    rows = [json.loads(line) for line in artifacts.metrics_path(cfg, 0).read_text().splitlines()]
    assert {"metric_raw", "metric_ema", "ema_decay"} <= set(rows[0])
    assert 0 < rows[0]["ema_decay"] < rows[1]["ema_decay"] < 0.9998  # a few steps in: far from 0.9998, so the EMA follows
    assert rows[0]["metric"] == rows[0]["metric_ema"]


def test_the_backbone_lr_ramps_up_in_the_epoch_after_unfreezing():
    cfg = CFG(arch="timm", model_name="resnet18", img_size=16, batch_size=4, lr=0.1, warmup_epochs=0, amp_dtype="fp32",
              pretrained=False)
    model = create_model(cfg, 3)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr)
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=100, step_on_epochs=False, updates_per_epoch=4,
                                       min_lr=0.1)  # a flat schedule: only the ramp moves the LR
    seen = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (step(*a, **k), seen.append([g["lr"] for g in optimizer.param_groups if g.get("backbone")][0]))
    data = TensorDataset(torch.randint(0, 255, (16, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (16,)))
    train_one_epoch(model, DataLoader(data, batch_size=4), torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                    create_scaler(cfg, torch.device("cpu")), torch.device("cpu"), 1, rules_of(cfg, torch.device("cpu")),
                    InputNorm(input_stats(cfg), "cpu"), warm_backbone=True)
    heads = [g["lr"] for g in optimizer.param_groups if not g.get("backbone")]
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1]) and heads[0] == pytest.approx(0.1)


# --- 5. Kaggle's limits -------------------------------------------------------------------------------
def test_a_finished_fold_keeps_its_best_weights_only(comp, tmp_path):
    cfg = tiny(comp, tmp_path, epochs=1)
    train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None)
    assert artifacts.checkpoint_path(cfg, 0).exists() and not artifacts.checkpoint_path(cfg, 0, "last").exists()
    kept = tiny(comp, tmp_path, epochs=1, keep_last=True, experiment="kept")
    train_fold(kept, get_folds(kept, read_train(kept)), 0, None)
    assert artifacts.checkpoint_path(kept, 0, "last").exists()


def test_the_cache_goes_to_kaggle_scratch_space(tmp_path, monkeypatch):
    scratch, working = tmp_path / "kaggle_temp", tmp_path / "kaggle_working"
    monkeypatch.setattr(artifacts, "KAGGLE_SCRATCH", scratch)
    monkeypatch.setattr(artifacts, "KAGGLE_WORKING", working)
    assert artifacts.cache_dir(CFG(experiment="e")) == artifacts.under_root(".cache")  # not in a kernel
    working.mkdir()
    assert artifacts.cache_dir(CFG(experiment="e")) == scratch / "cache"  # in a kernel: outside /kaggle/working
    assert scratch.is_dir()  # made when the kernel has none
    assert artifacts.cache_dir(CFG(cache_dir=str(tmp_path / "mine"))) == tmp_path / "mine"


def test_parallel_folds_share_the_cores_and_respect_cuda_visible_devices(comp, tmp_path, monkeypatch):
    cfg = tiny(comp, tmp_path, num_workers=8)
    job = executors.Job("02_train", cfg, {"overrides": {"epochs": 1}, "fold": 0})
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 4)
    shared = executors.share_workers(job, 2)
    assert shared.parameters["overrides"] == {"epochs": 1, "num_workers": 2} and job.parameters["overrides"] == {"epochs": 1}
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["2", "5"])  # CUDA_VISIBLE_DEVICES=2,5
    assert executors.choose_gpus(None) == ["2", "5"] and executors.choose_gpus(1) == ["2"]
    with pytest.raises(ValueError, match="--gpus 3: only 2 GPU"):
        executors.choose_gpus(3)
    pipeline.prepare_folds([cfg])  # the caches, built once before the fold processes start
    assert len(list(artifacts.cache_dir(cfg).glob("images_*.u8"))) == 2


def test_libraries_older_than_the_code_needs_are_named(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.4.18" if name == "albumentations" else real(name))
    problems = version_problems()
    assert problems == ["albumentations 1.4.18 is older than 2.0.0, the oldest release helpers works with: "
                        "pip install -U 'albumentations>=2.0.0'"]
