"""time_limit and the quality presets: durations, presets under the user's keys, the ledger
a restarted run continues, each fold's epochs from the time left, and a whole run through
the runner that stays within its limit."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import artifacts, budget, pipeline, planning, stages
from helpers.config import CFG, ROOT, load_cfg
from helpers.configfile import parse_duration
from helpers.models import stem_changes
from helpers.tools.demo import write_digits


@pytest.mark.parametrize("text, seconds", [("20min", 1200), ("8h", 28800), ("1h30m", 5400), ("90s", 90), ("600", 600),
                                           ("2.5h", 9000), ("", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_a_bad_duration_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"competition_dir": str(tmp_path), "time_limit": "soon"}))
    with pytest.raises(ValueError, match="config key 'time_limit': cannot read 'soon' as a duration"):
        load_cfg(path)


def test_quality_presets_sit_under_the_users_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"competition_dir": str(tmp_path), "quality": "fast", "img_size": 96}))
    cfg = load_cfg(path)
    assert (cfg.model_name, cfg.img_size, cfg.n_folds, cfg.ema, cfg.label_smoothing) == ("resnet18", 96, 3, True, 0.1)
    assert load_cfg(path, overrides={"quality": "best"}).model_name == ("convnext_small" if torch.cuda.is_available() else "resnet34")
    timed = load_cfg(path, overrides={"quality": "", "time_limit": "1h"})  # a time limit alone: medium
    assert timed.quality == "medium" and timed.model_name == ("resnet50d" if torch.cuda.is_available() else "resnet18")
    regression = load_cfg(path, overrides={"task": "regression", "metric": "rmse"})
    assert regression.label_smoothing == 0.0  # for classification only
    plain = load_cfg(path, overrides={"quality": ""})
    assert (plain.model_name, plain.ema, plain.label_smoothing) == (CFG().model_name, False, 0.0)  # no preset: the defaults



def test_a_pretrained_model_gets_the_fine_tuning_recipe(tmp_path):
    """Under a preset, pretrained weights are fine-tuned (presets.FINETUNE): the backbone below
    the head's LR, stochastic depth, fewer epochs; layer decay for ConvNeXt and ViT-style models,
    taking timm's first layer to the same floor whatever their depth; on a GPU, a model you name
    at its own input size. A model from scratch keeps the preset as it was."""
    from helpers import presets

    base = {"competition_dir": str(tmp_path), "quality": "medium"}
    cnn = load_cfg(None, overrides={**base, "model_name": "resnet50d"})
    rates = {**presets.FINETUNE, **({} if torch.cuda.is_available() else presets.FINETUNE_CPU)}  # small CPU images: higher
    assert (cnn.lr, cnn.backbone_lr_scale, cnn.drop_path, cnn.epochs, cnn.layer_decay) == (
        rates["lr"], rates["backbone_lr_scale"], presets.FINETUNE["drop_path"], presets.FINETUNE_EPOCHS["medium"], 0.0)
    assert cnn.lr * cnn.backbone_lr_scale < cnn.lr  # the backbone below the head
    assert load_cfg(None, overrides={**base, "quality": "best", "model_name": "densenet121"}).drop_path == 0.0  # takes none
    assert presets.timm_facts("resnet50.no_such_tag") is None  # model_problems names it; the preset does not crash
    tuned = load_cfg(None, overrides={**base, "model_name": "convnext_tiny"})
    assert (tuned.lr, tuned.backbone_lr_scale) == (presets.FINETUNE_LAYER_DECAY["lr"], 1.0)  # the layer decay lowers the backbone
    for name in ("convnext_tiny", "convnext_small", "vit_small_patch16_224"):  # 16, 38 and 14 layer groups in timm's count
        decay = load_cfg(None, overrides={**base, "model_name": name}).layer_decay
        assert 0.8 < decay < 0.95 and abs(decay ** round(math.log(presets.LAYER_DECAY_FLOOR, decay)) - presets.LAYER_DECAY_FLOOR) < 0.01
    assert load_cfg(None, overrides={**base, "model_name": "convnext_small"}).layer_decay > tuned.layer_decay  # deeper: less per layer
    own = load_cfg(None, overrides={**base, "model_name": "tf_efficientnet_lite1", "lr": 5e-3})
    assert own.lr == 5e-3 and own.img_size == (240 if torch.cuda.is_available() else 64)  # your keys win; its own size on a GPU
    scratch = load_cfg(None, overrides={**base, "model_name": "convnext_tiny", "pretrained": False})
    assert (scratch.backbone_lr_scale, scratch.layer_decay, scratch.epochs) == (1.0, 0.0, presets.QUALITY["medium"]["epochs"])

def test_time_limit_is_not_what_a_fold_is_made_from(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), time_limit="1h")
    assert "time_limit" not in stages.output_keys(cfg, "train")  # 8h -> 7h must not retrain (nor refuse a last.pt)
    assert "quality" not in stages.output_keys(cfg, "train")  # what a preset sets is recorded key by key
    with pytest.raises(ValueError, match="'time_limit' must be more than 0"):
        load_cfg(None, overrides={"competition_dir": str(tmp_path), "time_limit": "0"})


def ledger_cfg(tmp_path, **kw) -> CFG:
    return CFG(**{"competition_dir": str(tmp_path), "models_dir": str(tmp_path / "models"), "experiment": "e",
                  "time_limit": "100s", "epochs": 50, "pretrained": False, **kw})


def test_each_fold_gets_its_share_of_the_time_left(tmp_path):
    cfg = ledger_cfg(tmp_path)
    budget.open_ledger([cfg], [budget.train_key(cfg, k) for k in range(3)])
    ledger = budget.read_ledger(cfg)
    ledger.update(after_s=10.0)
    ledger["spent"].update({"e/00_eda": 10.0, "e/01_folds": 10.0, "e/train_fold0": 20.0})
    budget.write_ledger(cfg, ledger)
    # 100 - 40 spent - 10 later - 10 (the next fold's kernel: a notebook's start, as 01_folds
    # measured it) = 40 for 2 folds: 20 each; 5 s gone (first epoch included), 1.5 s of test
    # predictions: 13.5 s of 3 s epochs
    assert budget.fold_epochs(cfg, 1, elapsed_s=5.0, epoch_s=3.0, test_s=1.5) == 1 + 4
    assert budget.fold_epochs(cfg, 1, elapsed_s=5.0, epoch_s=0.01, test_s=1.5) == 50  # at most `epochs`
    budget.spend(cfg, "e/train_fold1", 30.0)  # over its share: the last fold gets what is left
    assert budget.fold_epochs(cfg, 2, elapsed_s=3.0, epoch_s=3.0, test_s=0.0) == 1 + 5  # 100-70-10 = 20 - 3 = 17 -> 5
    # nothing left: without a probe to say whether the first epoch paid for start-up, a second
    # all the same (then planned again from it), not a model of one epoch
    assert budget.fold_epochs(cfg, 2, elapsed_s=30.0, epoch_s=3.0, test_s=0.0) == 2
    assert budget.fold_epochs(cfg, 2, elapsed_s=30.0, epoch_s=3.0, test_s=0.0, epochs_done=2) == 2
    ledger = budget.read_ledger(cfg)  # the probe foretold 3 s epochs (1000 rows): the first was no start-up
    k = cfg.n_folds
    ledger.update(rows=[1000, 0], rates={"e": {"train_img_s": 1000 * (k - 1) / k * budget.PIPELINE / 2.5, "infer_img_s": 1000 / k / 0.5}})
    budget.write_ledger(cfg, ledger)
    assert budget._epoch_s(cfg, ledger["rates"]["e"], 1000) == pytest.approx(3.0)
    assert budget.fold_epochs(cfg, 2, elapsed_s=30.0, epoch_s=3.0, test_s=0.0) == 1  # its pace: nothing left
    assert budget.fold_epochs(cfg, 2, elapsed_s=30.0, epoch_s=7.0, test_s=0.0) == 2  # over twice it: start-up, a second


def test_a_training_kernels_start_counts_before_it_is_recorded(tmp_path, monkeypatch):
    """A training kernel's start (the kernel, the imports, CUDA's context: 22-24 s on an H100
    machine, 10-11 s on the 2-core CPU) is recorded when the kernel ends; its folds, planned
    before that, count it from the runner's mark, and a training kernel to come as long."""
    import time

    cfg = ledger_cfg(tmp_path)
    keys = [budget.train_key(cfg, k) for k in range(2)]
    budget.open_ledger([cfg], keys + [budget.train_key(cfg, 0).replace("e/", "f/")])
    ledger = budget.read_ledger(cfg)
    ledger.update(after_s=10.0, kernels="per_experiment")
    budget.write_ledger(cfg, ledger)
    free = budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=1.0, test_s=0.0)
    now = time.time()
    monkeypatch.setattr(budget, "_now", lambda: now)
    budget.kernel_started(cfg, keys)
    monkeypatch.setattr(budget, "_now", lambda: now + 20.0 + 2.0)  # 20 s of start, then 2 s of fold 0
    ledger = budget.read_ledger(cfg)
    assert budget.kernel_so_far(ledger, keys[0], 2.0) == pytest.approx(20.0)
    assert budget.kernel_so_far(ledger, "f/train_fold0", 2.0) == 0.0  # not this kernel's
    # 20 s spent, and the other experiment's kernel as long as this one's start (not a notebook's
    # 9 s): 31 s fewer for 3 folds
    cut = 20.0 + (20.0 - budget.NOTEBOOK_S)
    assert budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=1.0, test_s=0.0) == pytest.approx(free - cut / 3, abs=1)
    budget.spend(cfg, keys[0], 30.0)  # fold 0 ran 30 s: the kernel's start stays 20 s
    monkeypatch.setattr(budget, "_now", lambda: now + 20.0 + 30.0 + 5.0)
    assert budget.kernel_so_far(budget.read_ledger(cfg), keys[1], 5.0) == pytest.approx(20.0)
    budget.kernel_ended(cfg, 20.0 + 30.0 + 5.0)  # the kernel's 55 s, less fold 0's 30: its start and fold 1's 5
    assert "kernel" not in budget.read_ledger(cfg)
    assert budget.read_ledger(cfg)["spent"]["e/02_train_kernel"] == pytest.approx(25.0)


def test_the_stackers_time_is_measured_on_this_machine(tmp_path):
    """LightGBM per fold: timed at the fold's shape, so it grows with the rows, the classes and
    the embeddings' width (a constant tuned on 2 cores kept 60 s for 8 folds a 16-core machine
    stacked in 10)."""
    cfg = ledger_cfg(tmp_path, n_folds=5)
    # gaps wide enough that a loaded machine (the suite on two workers) cannot turn them round; one
    # thread (LightGBM takes torch's count): two OpenMP threads spin-waiting beside the other worker's
    # training took 23 s for the small fit and 11 s for the wide one in a CI run
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small = planning.stack_fold_s(cfg, 1000, 10, 64)
        wide = planning.stack_fold_s(cfg, 1000, 10, 1024)
        scaled = planning.stack_fold_s(cfg, 100000, 10, 64)
    finally:
        torch.set_num_threads(before)
    assert 0 < small < wide
    assert scaled > 2 * small  # more rows than the probe's: scaled
    assert planning.stack_fold_s(ledger_cfg(tmp_path, stacker="svr"), 1000, 10, 64) == planning.STACK_FOLD_S


def test_a_notebooks_start_is_measured_on_this_machine(tmp_path, monkeypatch):
    """On an H100 machine each notebook took 13-15 s to start (its imports 11-12 s), against the
    8-10 s of the 2-core CPU: planned with the CPU's figure, a 180 s demo run gave its folds the
    time of the later notebooks, and trained some for one epoch."""
    assert budget.notebook_s(None) == budget.NOTEBOOK_S
    assert budget.notebook_s({"notebook_s": 14.4, "spent": {}}) == 14.4  # the runner's own imports + KERNEL_S
    ledger = {"notebook_s": 14.4, "spent": {"e/00_eda": 14.4, "e/01_folds": 13.5, "f/01_folds": 13.0, "e/04_stacking": 19.0}}
    assert budget.notebook_s(ledger) == pytest.approx(13.25)  # the notebooks that do little else: 01_folds
    # and the later stages, less the work the plan foretold them (on an H100 machine 01_folds took
    # 8.6-9.5 s, 03_features 12-18 s beyond its work): 13.5, 13.0, 19.0 - 4.0 and 18.5 - 0.5
    ledger["after_work"] = {"e/03_features": 0.5, "e/04_stacking": 4.0, "f/04_stacking": 4.0, "05_ensemble": 0.0}
    ledger["spent"]["e/03_features"] = 18.5
    assert budget.notebook_s(ledger) == pytest.approx((13.5 + 13.0 + 15.0 + 18.0) / 4)
    assert pipeline.time_imports() is None  # imported already (here): the runner says nothing rather than 0 s
    fresh = subprocess.run([sys.executable, "-c", "from helpers import pipeline; print(pipeline.time_imports())"],
                           capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert 0.1 < float(fresh.stdout.split()[-1]) < 120  # a fresh process: what a notebook's first cell imports

    monkeypatch.setattr(planning, "probe", fake_probe([]))
    plans = {}
    for start in (9.0, 14.0):
        cfg = ledger_cfg(tmp_path / str(start), img_size=64, n_folds=5, time_limit="4min")
        ledger = budget.open_ledger([cfg], [])
        ledger.update(notebook_s=start, kernels="per_experiment")
        budget.write_ledger(cfg, ledger)
        plans[start] = planning.plan_run([cfg], (2000, 500), [10])
        assert budget.read_ledger(cfg)["after_s"] == pytest.approx(sum(budget.read_ledger(cfg)["after_work"].values()) + 3 * start, abs=0.1)
    assert plans[14.0]["expected_epochs"]["e"] < plans[9.0]["expected_epochs"]["e"]  # slower starts: less for the folds


def test_the_runner_times_a_notebooks_imports_before_it_plans(tmp_path):
    """Run as users run it (a fresh process), with time_limit: its imports of what the notebooks
    import are timed before anything else imports them, booked, and planned with."""
    comp = write_digits(tmp_path / "comp", size=16, n=120)
    config = {"competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "n_folds": 2, "img_size": 16,
              "num_workers": 0, "time_limit": "5min", "pretrained": False, "experiments": {"t": {}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "helpers.pipeline", "--config", str(path), "--stages", "01_folds"],
                   cwd=str(ROOT), check=True, capture_output=True, text=True)
    ledger = json.loads((tmp_path / "models" / "ensemble" / "budget.json").read_text())
    imports = ledger["spent"]["runner/imports"]
    assert imports > 0.1 and ledger["notebook_s"] == pytest.approx(imports + budget.KERNEL_S, abs=0.02)
    assert budget.notebook_s(ledger) == ledger["spent"]["t/01_folds"]  # then the run's own 01_folds


def test_the_stages_after_training_are_kept_for_until_they_run():
    """The runner takes one experiment to its stacker before the next one's folds train: the
    second's folds must not keep time for the first's 03_features and 04_stacking again."""
    work = {"a/03_features": 5.0, "a/04_stacking": 5.0, "b/03_features": 5.0, "b/04_stacking": 5.0, "05_ensemble": 0.0}
    ledger = {"after_work": work, "spent": {"a/train_fold0": 30.0}}
    assert budget.later_s(ledger, notebook=10.0) == 4 * 15 + 10
    ledger["spent"].update({"a/03_features": 17.0, "a/04_stacking": 21.0})
    assert budget.later_s(ledger, notebook=10.0) == 2 * 15 + 10
    ledger["spent"]["a/05_ensemble"] = 12.0
    assert budget.later_s(ledger, notebook=10.0) == 2 * 15
    assert budget.later_s({"after_s": 42.0, "spent": {}}, notebook=10.0) == 42.0  # a ledger from before: as planned


def test_the_plan_keeps_the_first_probes_start_up_and_counts_gpus_in_parallel(tmp_path, monkeypatch):
    calls = []
    plain = fake_probe(calls)

    def probe(cfg, n_out, steps=3):  # CUDA's context starts with the first probe only
        result = plain(cfg, n_out, steps)  # appends to calls
        return {**result, "start_s": 6.0 if len(calls) == 1 else 0.0}

    monkeypatch.setattr(planning, "probe", probe)
    cfg = ledger_cfg(tmp_path, img_size=256, n_folds=5, time_limit="10min")
    budget.open_ledger([cfg], [])
    planning.plan_run([cfg], (2000, 500), [10])
    assert len(calls) > 1 and budget.read_ledger(cfg)["rates"]["e"]["start_s"] == 6.0  # re-probed at a smaller size
    fits = {}
    for gpus in (1, 2):
        fits[gpus] = planning._epochs_that_fit([cfg], {"e": probe(cfg, 10)}, (2000, 500), 3600.0, "e", "per_job", 9.0, gpus)
    assert fits[2] > 1.5 * fits[1]  # two folds at a time: nearly twice the epochs each


def test_a_budget_too_short_for_any_plan_says_what_would_do(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(planning, "probe", fake_probe([]))
    cfg = ledger_cfg(tmp_path, img_size=64, n_folds=5, time_limit="70s")
    budget.open_ledger([cfg], [])
    plan = planning.plan_run([cfg], (2000, 500), [10])
    assert plan["folds"]["e"] == [0] and plan["img_size"]["e"] == 32  # everything cut, still short
    note = plan["notes"][-1]
    assert note.startswith(f"too short: e gets about {plan['expected_epochs']['e']:.1f} epochs per model, under the 20")
    needed = float(note.split("(about ")[1].split("s would")[0])
    enough = ledger_cfg(tmp_path / "enough", img_size=64, n_folds=5, time_limit=f"{needed + 1:.0f}s")
    budget.open_ledger([enough], [])
    assert planning.plan_run([enough], (2000, 500), [10])["expected_epochs"]["e"] >= 20  # what it names is enough
    assert "is too short: e gets about" in caplog.text


def test_a_notebook_run_by_hand_opens_its_own_ledger(tmp_path):
    cfg = ledger_cfg(tmp_path, n_folds=2)
    assert budget.read_ledger(cfg) is None
    # 100 s, nothing spent, 27 s kept for the later stages, one more fold's kernel (9 s): 32 s each
    assert budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=2.0, test_s=0.0) == 1 + 15
    budget.spend(cfg, "e/train_fold0", 80.0)
    budget.finish(cfg)  # an earlier run's finished ledger: a new run does not inherit its spent time
    assert budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=2.0, test_s=0.0) == 1 + 15


def test_a_first_epoch_slowed_by_start_up_is_planned_again_from_the_second(tmp_path, monkeypatch):
    """On a GPU the first epoch pays for CUDA's start and cuDNN's autotuning (10 s against 0.4 s
    after it on an H200): planned from it alone, a fold would get a twentieth of its epochs."""
    import time

    from helpers import train
    from helpers.data import read_train
    from helpers.folds import get_folds
    from helpers.utils import get_logger

    comp = write_digits(tmp_path / "comp", size=16, n=60)
    cfg = load_cfg(None, overrides=dict(competition_dir=str(comp), models_dir=str(tmp_path / "m"), experiment="w",
                                        n_folds=2, img_size=16, batch_size=16, num_workers=0, cache=False,
                                        time_limit="600s", epochs=30, ema=False, pretrained=False))
    plain, calls = train.train_one_epoch, []

    # the first epoch 12 s slower: planned from it, the fold's share of 600 s (about 300 s) gives
    # it about 24 epochs; from the second (well under 10 s an epoch, even on a loaded 2-core
    # machine running the suite on two workers) every one of the 30 it may have
    def start_up(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(12.0)
        return plain(*a, **k)

    monkeypatch.setattr(train, "train_one_epoch", start_up)
    train.train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None, get_logger("kaggle", artifacts.log_path(cfg)))
    log = artifacts.log_path(cfg).read_text()
    first = int(log.split("time_limit: fold 0 gets ")[1].split(" ")[0])
    assert first < 30 and "planned again after epoch 2" in log  # from the slow first epoch: fewer than it has time for
    assert len(artifacts.read_metrics(cfg, 0)) == 30  # from the second: all it may have (epochs=30)


def test_a_restarted_run_continues_its_ledger_a_finished_one_does_not(tmp_path):
    cfg = ledger_cfg(tmp_path)
    budget.open_ledger([cfg], ["e/train_fold0"])
    budget.spend(cfg, "e/train_fold0", 30.0)
    budget.spend(cfg, "e/train_fold0", 12.0)  # a resumed fold's job: shorter than the fold
    assert budget.open_ledger([cfg], ["e/train_fold0"])["spent"] == {"e/train_fold0": 30.0}  # killed, restarted
    ledger = budget.read_ledger(cfg)
    ledger["plan"] = {"img_size": {"e": 64}, "folds": {"e": [0, 1]}, "notes": [], "expected_epochs": {"e": 9}}
    budget.write_ledger(cfg, ledger)
    budget.finish(cfg)
    again = budget.open_ledger([cfg], ["e/train_fold0"])
    assert again["spent"] == {} and again["plan"]["img_size"] == {"e": 64}  # new time, the same plan (outputs stay fresh)
    assert budget.apply_plan(cfg).img_size == 64 and budget.apply_plan(cfg).fold_ids == [0, 1]
    changed = ledger_cfg(tmp_path, lr=0.5)
    assert budget.open_ledger([changed], [])["plan"] is None  # other settings: planned again


def fake_probe(calls):
    def probe(cfg, n_out, steps=3):  # 4x faster per halving of the side, 4x slower per stride the stem gives back
        calls.append(cfg.img_size)
        cost = 4 ** len(stem_changes(cfg))
        return {"train_img_s": 10.0 * (256 / cfg.img_size) ** 2 / cost, "infer_img_s": 30.0 * (256 / cfg.img_size) ** 2 / cost,
                "img_size": cfg.img_size}
    return probe


def test_small_images_give_their_stem_back_before_their_pixels(tmp_path, monkeypatch):
    """At 32 px a small-image stem (4x4 last map) costs what 64 px costs with half of it: a short
    budget gives the stem's strides back (max-pool first) before it halves any image, and says so;
    the run builds the model the plan chose."""
    monkeypatch.setattr(planning, "probe", fake_probe([]))
    cfg = ledger_cfg(tmp_path, img_size=32, n_folds=5, time_limit="20min", min_feature_map=4)
    budget.open_ledger([cfg], [])
    plan = planning.plan_run([cfg], (2000, 500), [10])
    stems = [n for n in plan["notes"] if "min_feature_map" in n]
    assert stems and "min_feature_map 4 -> 2 (its stem: maxpool removed)" in stems[0]
    assert "min_feature_map 2 -> 0 (its stem: timm's own)" in stems[1]  # for good
    assert plan["img_size"]["e"] == 32 and plan["min_feature_map"]["e"] < 4
    assert budget.apply_plan(cfg).min_feature_map == plan["min_feature_map"]["e"]
    roomy = ledger_cfg(tmp_path / "b", img_size=32, n_folds=5, time_limit="9h", min_feature_map=4)
    budget.open_ledger([roomy], [])
    assert planning.plan_run([roomy], (2000, 500), [10])["min_feature_map"]["e"] == 4  # time enough: the 4x4 map


def test_the_plan_drops_folds_then_holds_out_one_then_shrinks_images_when_the_budget_is_short(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(planning, "probe", fake_probe(calls))
    cfg = ledger_cfg(tmp_path, img_size=256, n_folds=5, time_limit="10min")
    budget.open_ledger([cfg], [budget.train_key(cfg, k) for k in range(5)])
    plan = planning.plan_run([cfg], (2000, 500), [10])
    assert calls[0] == 256 and plan["img_size"]["e"] < 256 and plan["notes"]
    assert plan["notes"][0].startswith("e: folds [0, 1, 2, 3, 4] -> [0, 1, 2, 3]") and "folds [0, 1, 2, 3] -> [0, 1, 2]" in plan["notes"][1]
    assert "folds -> [0] (a holdout of 1/5 of the rows" in plan["notes"][2] and "img_size 256 -> 128" in plan["notes"][3]
    assert plan["folds"]["e"] == [0] and plan["refit"]["e"] == "alone"  # one fold for the CV, a refit on all rows
    assert plan["expected_epochs"]["e"] >= budget.min_epochs(cfg)
    halvings = (256 // plan["img_size"]["e"]).bit_length() - 1
    assert plan["batch_size"]["e"] == min(planning.MAX_BATCH, 32 * 2 ** halvings)  # a quarter of the pixels, twice the batch
    planned = budget.apply_plan(cfg)
    assert planned.batch_size == plan["batch_size"]["e"] and planned.fold_ids == [0] and planned.refit == "alone"
    tiny = ledger_cfg(tmp_path / "b", img_size=64, n_folds=5, time_limit="90s")
    budget.open_ledger([tiny], [])
    plan = planning.plan_run([tiny], (2000, 500), [10])
    assert plan["img_size"]["e"] == 32 and plan["folds"]["e"] == [0]  # 32 px is the floor


def test_another_time_limit_plans_again(tmp_path, monkeypatch):
    """A 10-minute holdout plan is no plan for 9 hours: a finished run's plan is kept for the
    same settings and time_limit only."""
    monkeypatch.setattr(planning, "probe", fake_probe([]))
    cfg = ledger_cfg(tmp_path, img_size=64, n_folds=5, time_limit="90s")
    budget.open_ledger([cfg], [])
    assert planning.plan_run([cfg], (2000, 500), [10])["folds"]["e"] == [0]
    budget.finish(cfg)
    assert budget.open_ledger([cfg], [])["plan"]["folds"]["e"] == [0]  # the same time: the same plan
    budget.finish(cfg)
    longer = ledger_cfg(tmp_path, img_size=64, n_folds=5, time_limit="9h")
    assert budget.open_ledger([longer], [])["plan"] is None
    assert planning.plan_run([longer], (2000, 500), [10])["folds"]["e"] == [0, 1, 2, 3, 4]


def test_folds_the_user_chose_are_never_replaced_by_a_holdout(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "probe", fake_probe([]))
    tiny = ledger_cfg(tmp_path, img_size=64, n_folds=5, folds=[0, 1, 2, 3, 4], time_limit="90s")
    budget.open_ledger([tiny], [])
    plan = planning.plan_run([tiny], (2000, 500), [10])
    # nor dropped (apply_plan keeps them: a plan that counted on fewer would overspend): the image
    # size is halved, and the plan says the budget is too short for them
    assert plan["img_size"]["e"] == 32 and plan["folds"]["e"] == [0, 1, 2, 3, 4]
    assert plan["refit"]["e"] == "" and not any("holdout" in n for n in plan["notes"])
    assert plan["notes"][-1].startswith("too short: e gets about")
    assert budget.apply_plan(tiny).fold_ids == [0, 1, 2, 3, 4] and budget.apply_plan(tiny).img_size == 32


def test_folds_that_fit_but_stay_undertrained_become_a_holdout_and_a_refit(tmp_path, monkeypatch):
    """Every fold would get its MIN_EPOCHS but not WELL_TRAINED's: one model on every row (the
    refit) with the epochs instead; a `refit` the user set is kept."""
    monkeypatch.setattr(planning, "probe", fake_probe([]))
    for refit, limit, expected in (("", "75min", "alone"), ("blend", "75min", "blend"), ("", "3h", "")):
        cfg = ledger_cfg(tmp_path / (refit + limit), img_size=128, n_folds=3, time_limit=limit, refit=refit)
        budget.open_ledger([cfg], [])
        plan = planning.plan_run([cfg], (2000, 500), [10])
        if expected:
            assert plan["folds"]["e"] == [0] and plan["refit"]["e"] == expected and plan["img_size"]["e"] == 128
            assert "under the 40 a model from scratch wants" in plan["notes"][0]
            assert planning.well_trained(cfg) > plan["expected_epochs"]["e"] >= budget.min_epochs(cfg)
        else:  # time for well-trained folds: the fold ensemble
            assert plan["folds"]["e"] == [0, 1, 2] and not plan["notes"] and plan["expected_epochs"]["e"] >= 40


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timed")
    comp = write_digits(tmp / "comp", size=24, n=240, string_labels=True)
    config = {"competition_dir": str(comp), "models_dir": str(tmp / "models"), "submissions_dir": str(tmp / "subs"),
              "n_folds": 2, "time_limit": "80s", "quality": "fast", "img_size": 32, "batch_size": 32,
              "num_workers": 0, "refit": "blend", "folds": [0, 1], "pretrained": False, "experiments": {"timed": {}}}  # folds: a fold ensemble, no holdout
    path = tmp / "timed.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = pipeline.main(["--config", str(path), "--stages", "01_folds", "02_train"])  # the stages a budget plans
    return tmp, path, rc


def test_a_time_limited_run_plans_each_fold_from_the_time_left(timed_run, capsys):
    tmp, path, rc = timed_run
    assert rc == 0
    ledger = json.loads((tmp / "models" / "ensemble" / "budget.json").read_text())
    assert not ledger["finished"]  # some stages only: the next run goes on with the time left
    assert ledger["limit_s"] == 80 and ledger["plan"]["folds"] == {"timed": [0, 1]}
    assert set(ledger["spent"]) >= {"timed/01_folds", "timed/train_fold0", "timed/train_fold1", "timed/train_refit"}
    assert ledger["after_s"] > 0  # time kept for the stages after training (the recipe benchmark measures the landing)
    rates = ledger["rates"]["timed"]  # the probe: training, predictions, embeddings (fp32 where training is bf16), start-up
    assert min(rates["train_img_s"], rates["infer_img_s"], rates["embed_img_s"]) > 0 and rates["start_s"] >= 0
    log = (tmp / "models" / "timed" / "train.log").read_text()
    for k in (0, 1):
        planned = int(log.split(f"time_limit: fold {k} gets ")[-1].split(" ")[0])  # the last plan (one more when epoch 1 was slow)
        lines = (tmp / "models" / "timed" / f"fold{k}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == planned >= 1  # no early stop on a budget: the schedule runs to its planned end
        assert "metric_raw" not in lines[0]  # no second validation of the raw weights on a budget
    refit = int(log.split("time_limit: the refit gets ")[-1].split(" ")[0])  # the time left, at most the CV's choice
    if "refit: skipped, the time left gives it" in log:  # folds that ran long left it under 75% of its epochs
        assert not (tmp / "models" / "timed" / "refit" / "best.pt").exists()
    else:
        assert 1 <= refit == len((tmp / "models" / "timed" / "refit" / "metrics.jsonl").read_text().splitlines())
    assert pipeline.main(["--config", str(path), "--stages", "01_folds", "02_train"]) == 0  # again: nothing to redo
    assert "02_train fold 0 [timed] ... up to date" in capsys.readouterr().out


def test_a_longer_time_limit_trains_again_the_folds_it_gives_materially_more_epochs(timed_run):
    """A run planned for a short time_limit, then run with a longer one: each fold the new plan
    gives materially more epochs than it trained is trained again, saying why; a fold the plan
    gives fewer (or about as many) is kept."""
    tmp, path, _ = timed_run
    same = [j for j in pipeline.plan(str(path), {}, stages=["02_train"]) if j.parameters.get("fold") == 0]
    ran = len((tmp / "models" / "timed" / "fold0" / "metrics.jsonl").read_text().splitlines())
    assert pipeline.more_epochs(same[0], {"expected_epochs": {"timed": 10 * ran + 5}}).why == ""  # 80s planned it already
    jobs = [j for j in pipeline.plan(str(path), {"time_limit": "8h"}, stages=["02_train"]) if j.parameters.get("fold") == 0]
    longer = pipeline.more_epochs(jobs[0], {"expected_epochs": {"timed": 10 * ran + 5}})
    assert longer.why.startswith("time_limit 8h plans about") and f"it trained {ran}" in longer.why
    assert longer.cfg.retrain and longer.parameters["overrides"]["retrain"] and pipeline.stale(longer) == longer.why
    assert pipeline.more_epochs(jobs[0], {"expected_epochs": {"timed": ran + 1}}).why == ""  # about as many: kept
    assert pipeline.more_epochs(jobs[0], {"expected_epochs": {"timed": max(1, ran - 3)}}).why == ""  # fewer: kept
    merged = pipeline.one_kernel([pipeline.more_epochs(j, {"expected_epochs": {"timed": 10 * ran + 5}})
                                  for j in pipeline.plan(str(path), {"time_limit": "8h"}, stages=["02_train"])], force=False)
    assert [j.parameters["fold"] for j in merged] == [[0, 1, "refit"]] and merged[0].parameters["overrides"]["retrain"]


def test_a_fold_that_stopped_early_is_not_trained_again_for_a_longer_time_limit(tmp_path):
    """A fold whose best epoch came `patience` epochs or more before its last stopped because it
    had learnt what it could: a longer budget's plan does not retrain it; one cut short does."""
    cfg = ledger_cfg(tmp_path, patience=3, epochs=40)
    fold_dir = artifacts.fold_dir(cfg, 0)
    fold_dir.mkdir(parents=True)
    stopped = [0.5, 0.8, 0.7, 0.7, 0.6]  # best at epoch 2, three epochs without a better one
    (fold_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "metric": m}) + "\n" for i, m in enumerate(stopped)))
    assert budget.undertrained(cfg, 0, planned=30) is None
    cut_short = [0.5, 0.6, 0.7, 0.75, 0.8]  # still improving at its last epoch
    (fold_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "metric": m}) + "\n" for i, m in enumerate(cut_short)))
    assert "plans about 30 epochs for it; it trained 5" in budget.undertrained(cfg, 0, planned=30)
    for limit, retrained in ((100, False), (3600, False), (50, True)):  # the same time_limit (or a longer one) ran its plan
        rows = [{"epoch": i + 1, "metric": m, "time_limit_s": limit} for i, m in enumerate(cut_short)]
        (fold_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert (budget.undertrained(cfg, 0, planned=30) is not None) == retrained
