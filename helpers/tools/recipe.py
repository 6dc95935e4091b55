"""The recipe benchmark: a harder 10-class digit competition, and the minimal plain PyTorch loop
the workflow is compared against under the same wall-clock budget.

    python -m helpers.recipe [--out /tmp/recipe_comp] [--competition digits|shapes] [--size PX]
                             [--n-train 3000] [--n-test 1000] [--plain SECONDS]

The competition is made from scikit-learn's bundled digits, each drawn scaled, rotated and
placed at random on a noisy, tinted background with distractor strokes and blobs; train and
test renderings come from disjoint digit samples. The second competition (--competition shapes)
is ten classes of shapes as 28 px grayscale images, the size of Digit Recognizer and
Kannada-MNIST, so that defaults are not fitted to one dataset. Layout as in helpers.demo: train.csv (id,
label "zero".."nine"), test.csv, sample_submission.csv, solution.csv and train/, test/ PNGs.
Prints the accuracy of a pixel baseline (logistic regression on 32x32 grayscale), and with
--plain the accuracy, epochs and time of the plain loop in that many seconds.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from ..runtime import seed_everything
from ..utils import Timer, atomic_to_csv, read_table
from .demo import NAMES

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _render(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One size x size BGR image of an 8x8 digit (values 0..16): scaled to 40-75% of the side,
    rotated up to +-20 degrees, shifted up to 6% of the side off centre (staying inside), over a
    noisy, graded background with 2-4 distractor strokes or blobs; random contrast, brightness
    and colour tint."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    canvas = rng.uniform(30, 110) + rng.uniform(0, 50) * (np.cos(angle) * xx + np.sin(angle) * yy)
    for _ in range(rng.integers(2, 5)):  # distractors, under the digit
        level = float(rng.uniform(0, 230))
        if rng.random() < 0.6:
            p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.line(canvas, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), level,
                     int(rng.integers(1, max(1, size // 32) + 1)), cv2.LINE_AA)
        else:
            center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            radius = int(rng.integers(max(2, size // 32), max(3, size // 10) + 1))
            cv2.circle(canvas, center, radius, level, -1 if rng.random() < 0.5 else max(1, size // 64), cv2.LINE_AA)
    side = size * rng.uniform(0.40, 0.75)
    glyph = cv2.resize((digit / 16.0).astype(np.float32), (32, 32), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    shift = min(0.06 * size, max(0.0, size / 2 - side * 0.575))  # 0.575: half the rotated glyph, about
    cx, cy = size / 2 + rng.uniform(-shift, shift, 2)
    matrix = cv2.getRotationMatrix2D((16.0, 16.0), rng.uniform(-20, 20), side / 32.0)
    matrix[:, 2] += (cx - 16.0, cy - 16.0)
    mask = cv2.warpAffine(glyph, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    canvas = canvas * (1 - mask) + rng.uniform(170, 255) * mask
    canvas += rng.normal(0, rng.uniform(8, 25), canvas.shape)
    canvas = (canvas - 128) * rng.uniform(0.7, 1.2) + 128 + rng.uniform(-25, 25)
    tint = rng.uniform(0.6, 1.0, 3)
    return (canvas[..., None] * (tint / tint.max())).clip(0, 255).astype(np.uint8)


def _write_tables(out: Path, train: pd.DataFrame, solution: pd.DataFrame, placeholder: str) -> Path:
    """train.csv, test.csv (ids), solution.csv and sample_submission.csv (every row `placeholder`)."""
    for name, df in (("train", train), ("test", solution[["id"]]), ("solution", solution),
                     ("sample_submission", solution[["id"]].assign(label=placeholder))):
        atomic_to_csv(df, out / f"{name}.csv")
    return out


def write_recipe_competition(out_dir: str | Path, n_train: int = 3000, n_test: int = 1000, size: int = 64,
                             seed: int = 0) -> Path:
    """Write the recipe competition to out_dir: n_train and n_test renderings of the 1797 digits,
    train from 70% of the samples and test from the other 30% (stratified), each sample drawn
    several times with different randomness."""
    out = Path(out_dir)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pool_train, pool_test = train_test_split(np.arange(len(digits.target)), test_size=0.3,
                                             stratify=digits.target, random_state=seed)
    frames, start = {}, 0
    for split, pool, n in (("train", pool_train, n_train), ("test", pool_test, n_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        picks = np.concatenate([rng.permutation(pool) for _ in range(math.ceil(n / len(pool)))])[:n]
        ids = [f"img_{start + i:05d}" for i in range(n)]
        for image_id, k in zip(ids, picks):
            cv2.imwrite(str(out / split / f"{image_id}.png"), _render(digits.images[k], size, rng))
        frames[split] = pd.DataFrame({"id": ids, "label": [NAMES[y] for y in digits.target[picks]]})
        start += n
    return _write_tables(out, frames["train"], frames["test"], NAMES[0])


SHAPES = ["circle", "ring", "square", "frame", "triangle", "cross", "plus", "star", "bar", "crescent"]


def _shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One size x size grayscale image of a shape (SHAPES): drawn at 4x on a 0..1 mask, scaled to
    45-85% of the side, rotated up to +-20 degrees, shifted off centre, over noise, a gradient and two
    distractor strokes, with random contrast: small-image classes told apart by outline and
    holes, unlike the digits."""
    big, c = 4 * size, 2.0 * size
    mask = np.zeros((big, big), np.float32)
    r, thick = 1.5 * size, max(2, int(0.35 * size))
    star = [(c + r * (1 if i % 2 == 0 else 0.45) * np.cos(np.pi * i / 5), c + r * (1 if i % 2 == 0 else 0.45) * np.sin(np.pi * i / 5))
            for i in range(10)]
    draw = {
        "circle": lambda: cv2.circle(mask, (int(c), int(c)), int(r), 1.0, -1, cv2.LINE_AA),
        "ring": lambda: cv2.circle(mask, (int(c), int(c)), int(r * 0.8), 1.0, thick, cv2.LINE_AA),
        "square": lambda: cv2.rectangle(mask, (int(c - r * 0.8),) * 2, (int(c + r * 0.8),) * 2, 1.0, -1, cv2.LINE_AA),
        "frame": lambda: cv2.rectangle(mask, (int(c - r * 0.7),) * 2, (int(c + r * 0.7),) * 2, 1.0, thick, cv2.LINE_AA),
        "triangle": lambda: cv2.fillPoly(mask, [np.array([(c, c - r), (c - r * 0.9, c + r * 0.7), (c + r * 0.9, c + r * 0.7)],
                                                          np.int32)], 1.0, cv2.LINE_AA),
        "cross": lambda: [cv2.line(mask, (int(c - r * 0.8), int(c + s_ * r * 0.8)), (int(c + r * 0.8), int(c - s_ * r * 0.8)),
                                   1.0, thick, cv2.LINE_AA) for s_ in (1, -1)],
        "plus": lambda: [cv2.line(mask, p1, p2, 1.0, thick, cv2.LINE_AA) for p1, p2 in
                         (((int(c - r), int(c)), (int(c + r), int(c))), ((int(c), int(c - r)), (int(c), int(c + r))))],
        "star": lambda: cv2.fillPoly(mask, [np.array(star, np.int32)], 1.0, cv2.LINE_AA),
        "bar": lambda: cv2.rectangle(mask, (int(c - r), int(c - r * 0.25)), (int(c + r), int(c + r * 0.25)), 1.0, -1, cv2.LINE_AA),
        "crescent": lambda: (cv2.circle(mask, (int(c), int(c)), int(r * 0.9), 1.0, -1, cv2.LINE_AA),
                             cv2.circle(mask, (int(c + r * 0.45), int(c - r * 0.2)), int(r * 0.75), 0.0, -1, cv2.LINE_AA)),
    }
    draw[kind]()
    scale = rng.uniform(0.45, 0.85) * size / (2 * r)  # the drawing spans 2r of the 4x canvas
    shift = rng.uniform(-0.08, 0.08, 2) * size
    matrix = cv2.getRotationMatrix2D((c, c), rng.uniform(-20, 20), scale)  # plus and cross differ by 45
    matrix[:, 2] += (size / 2 + shift[0] - c, size / 2 + shift[1] - c)
    glyph = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_AREA, borderValue=0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    canvas = rng.uniform(20, 120) + rng.uniform(0, 60) * (np.cos(angle) * xx + np.sin(angle) * yy)
    for _ in range(2):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(canvas, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), float(rng.uniform(0, 230)), 1, cv2.LINE_AA)
    canvas = canvas * (1 - glyph) + rng.uniform(140, 255) * glyph
    canvas += rng.normal(0, rng.uniform(10, 30), canvas.shape)
    return ((canvas - 128) * rng.uniform(0.6, 1.2) + 128).clip(0, 255).astype(np.uint8)


def write_shapes_competition(out_dir: str | Path, n_train: int = 3000, n_test: int = 1000, size: int = 28,
                             seed: int = 0) -> Path:
    """The second generated competition: 10 classes of shapes (SHAPES) as single-channel PNGs,
    28 px by default (the size of Digit Recognizer, Kannada-MNIST, Fashion-MNIST); the same
    layout as write_recipe_competition, labels balanced."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    frames, start = {}, 0
    for split, n in (("train", n_train), ("test", n_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        kinds = rng.permutation(np.arange(n) % len(SHAPES))
        ids = [f"img_{start + i:05d}" for i in range(n)]
        for image_id, k in zip(ids, kinds):
            cv2.imwrite(str(out / split / f"{image_id}.png"), _shape(SHAPES[k], size, rng))
        frames[split] = pd.DataFrame({"id": ids, "label": [SHAPES[k] for k in kinds]})
        start += n
    return _write_tables(out, frames["train"], frames["test"], SHAPES[0])


def _read_images(folder: Path, ids, size: int | None = None, gray: bool = False) -> np.ndarray:
    """Images folder/<id>.png as one uint8 array (N, H, W[, 3]; RGB), resized to size x size."""
    images = []
    for image_id in ids:
        image = cv2.imread(str(folder / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(folder / f"{image_id}.png")
        if size is not None and image.shape[:2] != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        images.append(image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return np.stack(images)


def pixel_baseline(out_dir: str | Path) -> float:
    """Test accuracy of a logistic regression on the grayscale pixels (32x32, in [0, 1])."""
    from sklearn.linear_model import LogisticRegression

    out = Path(out_dir)
    train, solution = read_table(out / "train.csv", "id"), read_table(out / "solution.csv", "id")
    x_train = _read_images(out / "train", train["id"], 32, gray=True).reshape(len(train), -1) / 255.0
    x_test = _read_images(out / "test", solution["id"], 32, gray=True).reshape(len(solution), -1) / 255.0
    model = LogisticRegression(max_iter=2000).fit(x_train, train["label"].astype(str))
    return float((model.predict(x_test) == solution["label"].astype(str).to_numpy()).mean())


class _PlainLoop:
    """The plain loop's data (all of it on the device), model, optimizer and steps: timm's
    resnet18 from scratch at lr 2e-3, or `model_name` with the weights file `weights` (timm's
    pretrained_cfg file overlay, the model's own mean and std) at `lr`."""

    batch_size, div_factor = 64, 25.0

    def __init__(self, comp: Path, img_size: int | None, seed: int, model_name: str = "resnet18", weights: str = "",
                 lr: float = 2e-3):
        train, self.solution = read_table(comp / "train.csv", "id"), read_table(comp / "solution.csv", "id")
        self.classes = sorted(train["label"].astype(str).unique())
        x_train = _read_images(comp / "train", train["id"], img_size)
        x_test = _read_images(comp / "test", self.solution["id"], img_size)
        self.img_size, self.lr = x_train.shape[1], lr
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": weights}} if weights else {"pretrained": False}
        self.model = timm.create_model(model_name, num_classes=len(self.classes), **kwargs).to(self.device)
        data = timm.data.resolve_model_data_config(self.model) if weights else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        self.mean = torch.tensor(data["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(data["std"], device=self.device).view(1, 3, 1, 1)
        self.x_train, self.x_test = self.to_tensor(x_train), self.to_tensor(x_test)
        self.y_train = torch.tensor([self.classes.index(y) for y in train["label"].astype(str)], device=self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr / self.div_factor, weight_decay=0.05)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.steps = max(1, len(self.x_train) // self.batch_size)  # drop the last partial batch (BatchNorm)
        self.generator = torch.Generator().manual_seed(seed)

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0) - self.mean) / self.std

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """Flips and 4px-padded random crops."""
        flip = torch.rand(len(batch), generator=self.generator) < 0.5
        batch = torch.where(flip.to(self.device).view(-1, 1, 1, 1), batch.flip(3), batch)
        padded = F.pad(batch, (4, 4, 4, 4))
        offsets = torch.randint(0, 9, (len(batch), 2), generator=self.generator).tolist()
        size = self.img_size
        return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])

    def run_epoch(self, scheduler=None) -> None:
        self.model.train()
        order = torch.randperm(len(self.x_train), generator=self.generator).to(self.device)
        for b in range(self.steps):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            loss = self.criterion(self.model(self.augment(self.x_train[idx])), self.y_train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if scheduler is not None:
                scheduler.step()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])


def plain_loop(comp_dir: str | Path, budget_s: float, img_size: int | None = None, seed: int = 0,
               threads: int | None = None, model_name: str = "resnet18", weights: str = "", lr: float = 2e-3) -> dict:
    """The minimal plain PyTorch loop: timm resnet18 from scratch (or `model_name` fine-tuned
    from the weights file `weights`, at `lr`) on all of train (in memory), AdamW + OneCycleLR,
    label smoothing, flips and 4px-padded random crops, batch 64. Epoch 1
    runs at OneCycleLR's starting rate and is timed; the schedule then covers as many more
    epochs as fit, so that training and predicting test end within budget_s (loading included;
    should epochs slow down, it stops before one that would not fit, its schedule unfinished).
    Returns {"accuracy", "wall_s", "epochs", "img_size"}."""
    start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    loop = _PlainLoop(Path(comp_dir), img_size, seed, model_name, weights, lr)
    bar = tqdm(total=1, desc="plain loop", unit="epoch")
    with Timer() as first:
        loop.run_epoch()  # the warm-up epoch, at the schedule's starting rate
    bar.update()
    with Timer() as probe:  # the cost of one prediction batch, to reserve time for test
        loop.predict(loop.x_test[:256])
    predict_s = probe.seconds * math.ceil(len(loop.x_test) / 256)
    left = budget_s - (time.perf_counter() - start) - predict_s - 0.02 * budget_s
    more, epochs, last_s = max(0, int(left // first.seconds)), 1, first.seconds
    if more:
        bar.total = 1 + more
        bar.refresh()
        scheduler = torch.optim.lr_scheduler.OneCycleLR(loop.optimizer, max_lr=loop.lr, total_steps=more * loop.steps,
                                                        div_factor=loop.div_factor)
        for _ in range(more):
            if time.perf_counter() - start + last_s + predict_s > budget_s:
                break
            with Timer() as epoch:
                loop.run_epoch(scheduler)
            epochs, last_s = epochs + 1, epoch.seconds
            bar.update()
    bar.close()
    pred = loop.predict(loop.x_test).cpu().numpy()
    accuracy = float((np.array(loop.classes)[pred] == loop.solution["label"].astype(str).to_numpy()).mean())
    return {"accuracy": accuracy, "wall_s": time.perf_counter() - start, "epochs": epochs, "img_size": loop.img_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/recipe_comp", help="competition folder to write")
    parser.add_argument("--n-train", type=int, default=3000, help="train images")
    parser.add_argument("--n-test", type=int, default=1000, help="test images")
    parser.add_argument("--competition", choices=("digits", "shapes"), default="digits",
                        help="digits (RGB, 64 px by default) or shapes (grayscale, 28 px by default)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the competition's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", type=float, default=None, metavar="SECONDS",
                        help="also run the plain PyTorch loop within this budget")
    parser.add_argument("--img-size", type=int, default=None, help="plain loop's image size (default: native)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the plain loop")
    args = parser.parse_args()
    with Timer() as made:
        write = write_shapes_competition if args.competition == "shapes" else write_recipe_competition
        out = write(args.out, args.n_train, args.n_test, args.size or (28 if args.competition == "shapes" else 64), args.seed)
    print(f"recipe competition written to {out} in {made.seconds:.1f}s: {args.n_train} train, {args.n_test} test images")
    with Timer() as fitted:
        accuracy = pixel_baseline(out)
    print(f"pixel baseline (logistic regression, 32x32 gray): accuracy {accuracy:.4f} ({fitted.seconds:.1f}s)")
    if args.plain is not None:
        result = plain_loop(out, args.plain, img_size=args.img_size, seed=args.seed, threads=args.threads)
        print("plain loop: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in result.items()))


if __name__ == "__main__":
    main()
