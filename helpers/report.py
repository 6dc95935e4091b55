"""The report of a run: one self-contained HTML file beside the submission (images inline, opens
offline in any browser), written by 05_ensemble from what the run left under models/: the
results table (CV of every experiment, its stacker, the refit and the blend, ± the spread over
folds; the local LB where a solution exists), the blend's weights, its OOF correlation heatmap,
the time each stage took (against the time_limit plan where there is one), and per experiment
where its weights came from, the settings that differ from the defaults, its learning curves
per fold and its error analysis (confusion matrix, per-label figures or residuals). Rendered
with Jinja2 (templates/report.html.j2, autoescaped)."""
from __future__ import annotations

import base64
import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from . import artifacts, budget, freshness
from .config import CFG, to_dict
from .utils import atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
TEXT_COLS = {"experiment", "model", "metric", "weights"}
# the error analysis' figures (helpers.analysis), in the order they are shown
ANALYSIS = ("confusion_matrix.png", "label_confusion.png", "residuals.png", "wrong_confident.png", "largest_errors.png")
UNSHOWN_KEYS = {"experiment", "members"}  # settings the report does not list as changed


def image(path: Path, caption: str) -> dict | None:
    """An <img> source with the PNG inline (base64): the report opens offline, alone."""
    if not path.is_file():
        return None
    return {"src": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"), "caption": caption}


def _cell(value, column: str = "") -> str:
    """A table's cell: seconds to a tenth, whole numbers as such, scores to five places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if column.endswith("_s"):
            return f"{value:.1f}"
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.5f}"
    return str(value)


def _results(results: pd.DataFrame) -> dict:
    """The results table, the CV's spread over folds beside it."""
    table = results.copy()
    if {"cv_mean", "cv_std"} <= set(table.columns):
        table.insert(table.columns.get_loc("cv") + 1, "folds mean ± std", [
            "" if pd.isna(m) else f"{m:.5f} ± {s:.5f}" for m, s in zip(table["cv_mean"], table["cv_std"].fillna(0.0))])
        table = table.drop(columns=["cv_mean", "cv_std"])
    return {"columns": list(table.columns),
            "rows": [[(c, _cell(v, c)) for c, v in zip(table.columns, row)] for row in table.itertuples(index=False)]}


def changed_settings(cfg: CFG) -> list[tuple[str, str, str]]:
    """(key, value, default) of every setting that is not CFG's default."""
    default, mine = to_dict(CFG()), to_dict(cfg)
    return [(k, json.dumps(v, default=str)[:120], json.dumps(default[k], default=str)[:60]) for k, v in mine.items()
            if k not in UNSHOWN_KEYS and v != default[k]]


def _experiment(folder: Path, cfg: CFG | None) -> dict:
    score = artifacts.read_score(folder, missing_ok=True) or {}
    figures = [image(folder / f"fold{k}" / "learning_curves.png", f"fold {k}: learning curves")
               for k in freshness.trained_folds(folder)]  # this run's folds, not an earlier run's left on disk
    figures += [image(folder / artifacts.REFIT / "learning_curves.png", "the refit on all rows: its loss and learning rate")]
    figures += [image(folder / "analysis" / name, f"out-of-fold: {name[:-4].replace('_', ' ')}") for name in ANALYSIS]
    figures += [image(folder / "importance.png", "the stacker's feature importance")]
    return {"name": folder.name, "model": score.get("model", ""), "weights": score.get("weights") or "",
            "settings": changed_settings(cfg) if cfg is not None else [], "figures": [f for f in figures if f]}


def _time(cfg: CFG, names: list[str]) -> dict | None:
    """Seconds of each executed notebook (papermill's record), against the time_limit plan's."""
    ledger = budget.read_ledger(cfg) if cfg.time_limit else None
    planned = (ledger or {}).get("after_work", {})
    rows = []
    for folder in [artifacts.models_root(cfg) / n for n in names] + [artifacts.ensemble_dir(cfg)]:
        for nb in sorted((folder / "notebooks").glob("*.ipynb")):
            seconds = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {}).get("duration")
            if seconds is not None:
                key = f"{folder.name}/{nb.stem}"
                rows.append({"stage": key, "seconds": f"{seconds:.1f}",
                             "planned": f"{planned[key]:.1f}" if key in planned else ""})
    if not rows:
        return None
    note = "Each notebook's wall-clock time, its kernel's start included."
    if ledger:
        note += (f" time_limit {cfg.time_limit}: {budget.spent_s(ledger):.0f}s of {ledger['limit_s']:.0f}s spent; 'planned' is "
                 f"the plan's estimate of a stage's work after training (its notebook's start aside).")
    return {"rows": rows, "planned": bool(planned), "note": note}


def write_report(cfg: CFG, members: list[CFG], ensemble: dict, path: Path | None = None) -> Path:
    """report.html beside the submission; returns its path."""
    path = Path(path or Path(ensemble["paths"][0]).parent / "report.html")
    by_name = {m.experiment: m for m in members}
    names = list(ensemble["weights"]["experiment"])
    out = artifacts.ensemble_dir(cfg)
    weights = [{"experiment": r.experiment, "cv": _cell(r.cv), "weight": f"{r.weight:.3f}"} for r in ensemble["weights"].itertuples()]
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(
        title=f"{Path(cfg.competition_dir).name}: the run's report", made=datetime.now().strftime("%Y-%m-%d %H:%M"),
        submission=str(ensemble["paths"][0]), metric=cfg.metric, local_lb=ensemble.get("local_lb"),
        results=_results(ensemble["results"]), text_cols=TEXT_COLS, weights=weights,
        blend_figures=[f for f in (image(out / "scores.png", "CV of every experiment and the blend"),
                                   image(out / "correlation.png", "correlation of the experiments' OOF predictions")) if f],
        time=_time(cfg, [n for n in names if n in by_name]),
        experiments=[_experiment(artifacts.models_root(cfg) / n, by_name.get(n)) for n in names])
    atomic_write_text(path, page)
    return path

