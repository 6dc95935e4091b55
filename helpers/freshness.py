"""The one freshness rule: an output is up to date only while what it was made from is unchanged.

Every output records a fingerprint of what it was made from (`<folder>/stamps/<output>.json`):
the config keys that change it, digests of the input files it read (the CSVs' contents; the
listed images' paths, sizes and mtimes), and the build ids of the outputs it used, as the stage
graph (helpers.stages) declares them. `stale()` says why an output must be (re)made: the key
with its old and new values, the file, or the upstream output that was remade or must be remade
first. Every build gets a new id, so a rebuild (retrain, --force, a GPU run that is not
bit-exact) redoes what was made from it; an upstream output that is not up to date makes
everything after it wait ('pending'), and `build` refuses to make an output from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from . import artifacts
from .config import CFG
from .images import locate_images
from .stages import BY_NAME, MAKER, OUTPUTS, Part, output_name, parse_name
from .utils import atomic_write_text, read_table


# --- digests ----------------------------------------------------------------------------------
_file_memo: dict[tuple, str] = {}


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A file's content digest ('absent' when there is none); remembered per size and mtime."""
    if not path.is_file():
        return "absent"
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _file_memo:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _file_memo[key] = h.hexdigest()[:16]
    return _file_memo[key]


_depth = 0  # > 0 inside a decision(): digests of image lists are remembered until it ends


@contextmanager
def decision():
    """Within it, each split's images are listed and stat'ed once: wrap the freshness decisions
    of one step (a notebook cell, a runner job) that ask about many outputs."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            _images_memo.clear()


def paths_digest(paths: list[str]) -> str:
    """These files' paths, sizes and mtimes (the decoded-image cache's key)."""
    rows = []
    for p in paths:
        st = os.stat(p)
        rows.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}")
    return _sha("\n".join(rows))


_images_memo: dict[tuple, str] = {}


def images_digest(cfg: CFG, split: str) -> str:
    """The images a split's CSV lists (train.csv, or test.csv / sample_submission): each one's
    path, size and mtime. Only those count: a folder shared by train and test images, or
    files the CSV does not name, change nothing."""
    if split == "train":
        csv, folder = cfg.path(cfg.train_csv), cfg.path(cfg.image_dir_train)
    else:
        csv, folder = cfg.path(cfg.test_csv), cfg.path(cfg.image_dir_test)
        csv = csv if csv.exists() else cfg.path(cfg.sample_submission)
    key = (str(csv), file_digest(csv), str(folder), cfg.image_ext, cfg.id_col)
    if _depth and key in _images_memo:
        return _images_memo[key]
    if not csv.is_file() or not folder.is_dir():
        return "absent"
    try:
        ids = read_table(csv, cfg.id_col)[cfg.id_col]
    except (ValueError, KeyError):
        return "unreadable"
    rows = []
    for value, (path, _) in zip(ids.astype(str), locate_images(ids, folder, cfg.image_ext)):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        rows.append(f"{value}\0{os.path.relpath(path, folder) if path else '-'}\0{st.st_size if st else '-'}\0"
                    f"{st.st_mtime_ns if st else '-'}")
    value = _sha("\n".join(rows))
    if _depth:
        _images_memo[key] = value
    return value


def competition_digest(cfg: CFG) -> str:
    """Which data an experiment's predictions belong to: train.csv's content, target and task."""
    return _sha(f"{file_digest(cfg.path(cfg.train_csv))}\0{cfg.target_col}\0{cfg.task}")


# --- fingerprints ----------------------------------------------------------------------------------
def _test_files(cfg: CFG) -> dict:
    test_csv = cfg.path(cfg.test_csv)
    ids = test_csv if test_csv.exists() else cfg.path(cfg.sample_submission)
    return {ids.name: file_digest(ids), f"{cfg.image_dir_test}/": images_digest(cfg, "test")}


# what each input name of the stage graph stands for: {how the fingerprint names it: its digest}
INPUTS = {
    "train_csv": lambda cfg: {cfg.train_csv: file_digest(cfg.path(cfg.train_csv))},
    "train_images": lambda cfg: {f"{cfg.image_dir_train}/": images_digest(cfg, "train")},
    "test": _test_files,
    "test_csv": lambda cfg: {cfg.path(cfg.test_csv).name: file_digest(cfg.path(cfg.test_csv))},
    "sample_submission": lambda cfg: {cfg.sample_submission: file_digest(cfg.path(cfg.sample_submission))},
    "solution": lambda cfg: {cfg.solution_csv: file_digest(cfg.path(cfg.solution_csv))},
}


def stamp_path(cfg: CFG, kind: str, part: Part = None) -> Path:
    return artifacts.output_folder(cfg, OUTPUTS[kind].folder) / "stamps" / f"{output_name(kind, part)}.json"


def upstream_id(cfg: CFG, kind: str, part: Part) -> str:
    """What an output made from this upstream one records of it: the id of the build on disk
    when it is up to date (a rebuild, even from the same inputs, gives a new id, so what was
    made from the old one is redone), else 'pending' (it must be remade first)."""
    if _stale(cfg, kind, part) is None:
        return json.loads(stamp_path(cfg, kind, part).read_text())["id"]
    return f"pending {digest(_fingerprint(cfg, kind, part))}"


def fingerprint(cfg: CFG, kind: str, part: Part = None) -> dict:
    """What an output is made from: {'keys': {...}, 'files': {...}, 'upstream': {name: id}}."""
    with decision():
        return _fingerprint(cfg, kind, part)


def _fingerprint(cfg: CFG, kind: str, part: Part) -> dict:
    if kind not in OUTPUTS:
        raise ValueError(f"unknown output '{kind}'")
    out = OUTPUTS[kind]
    files = {}
    for name in out.inputs(part):
        files.update(INPUTS[name](cfg))
    if out.experiments:  # the ensemble: every experiment of this competition, by its final build
        upstream = {f"experiment {d.name}": recorded_id(d, refit=bool(cfg.refit)) for d in blend_dirs(cfg)}
    else:
        upstream = {output_name(k, p): upstream_id(cfg, k, p) for k, p in out.upstream(cfg, part)}
    return {"keys": out.keys(cfg, part), "files": files, "upstream": upstream}


def digest(made_from: dict) -> str:
    return _sha(json.dumps(made_from, sort_keys=True, default=str))


def recorded_id(folder: Path, refit: bool = False) -> str:
    """The build id recorded for an experiment folder's final output (a CNN's cv, a stacker's),
    with `refit`, followed by its refit's test predictions' id, when it has them."""
    for name in ("cv", "stacking"):
        path = folder / "stamps" / f"{name}.json"
        if path.exists():
            build = json.loads(path.read_text())["id"]
            refit_stamp = folder / "stamps" / "refit_test.json"
            return f"{build} {json.loads(refit_stamp.read_text())['id']}" if refit and refit_stamp.exists() else build
    return "unrecorded"


def record(cfg: CFG, kind: str, part: Part = None, made_from: dict | None = None) -> str:
    """Write an output's stamp, after the output itself: from now on it counts as up to date
    while nothing it was made from changes. Returns its digest."""
    made_from = made_from if made_from is not None else fingerprint(cfg, kind, part)
    d = digest(made_from)
    build_id = _sha(f"{d}\0{time.time_ns()}\0{os.getpid()}\0{os.urandom(8).hex()}")  # this build, unlike any other
    atomic_write_text(stamp_path(cfg, kind, part), json.dumps(
        {"output": output_name(kind, part), "digest": d, "id": build_id, "made_from": made_from,
         "time": datetime.now().isoformat(timespec="seconds")}, indent=1, default=str))
    return d


def require(cfg: CFG, kind: str, part: Part, then: str = "") -> None:
    """Raise, saying why and what to run, unless an output about to be used is up to date."""
    why = stale(cfg, kind, part)
    if why:
        raise RuntimeError(f"{output_name(kind, part)} of {cfg.experiment} is not up to date ({why}): "
                           f"{then or f'run {MAKER.get(kind, kind)} first'}")


def _require_needs(cfg: CFG, kind: str, part: Part, then: str = "") -> None:
    for up_kind, up_part in OUTPUTS[kind].upstream(cfg, part):
        if up_kind in OUTPUTS[kind].needs:
            require(cfg, up_kind, up_part, then)


def todo(cfg: CFG, kind: str, parts: list[Part], force: bool = False) -> dict[Part, str]:
    """The parts of an output that must be (re)made, each with why ('retrain is set' when
    `force`); the outputs they are made from must be up to date, checked here, before any work."""
    with decision():
        why = {p: "retrain is set" if force else _stale(cfg, kind, p) for p in parts}
        for p in (p for p, w in why.items() if w):
            _require_needs(cfg, kind, p)
    return {p: w for p, w in why.items() if w}


@contextmanager
def build(cfg: CFG, kind: str, part: Part = None, then: str = ""):
    """The one way to make an output: refuse when an output it needs is not up to date (saying
    what to run first), take its fingerprint before the work, let the body write the
    output, then record the stamp. An exception in the body records nothing. Yields the
    fingerprint."""
    with decision():
        _require_needs(cfg, kind, part, then)
        made_from = _fingerprint(cfg, kind, part)
    yield made_from
    record(cfg, kind, part, made_from)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stale(cfg: CFG, kind: str, part: Part = None) -> str | None:
    """None when the output is up to date; else why it must be (re)made."""
    with decision():
        return _stale(cfg, kind, part)


def _stale(cfg: CFG, kind: str, part: Part) -> str | None:
    folder, name = artifacts.output_folder(cfg, OUTPUTS[kind].folder), output_name(kind, part)
    for pattern in OUTPUTS[kind].files:
        for each in cfg.fold_ids if "{each}" in pattern else [None]:
            path = folder / pattern.format(k=part, f="all" if part is None else f"fold{part}", each=each)
            if not path.exists():
                return f"{path.relative_to(folder.parent)} not made yet"
    path = stamp_path(cfg, kind, part)
    if not path.exists():
        return "not made yet" if not OUTPUTS[kind].files else f"{name} has no record of what it was made from"
    old = json.loads(path.read_text())["made_from"]
    new = json.loads(json.dumps(fingerprint(cfg, kind, part), default=str))
    if old == new:
        return None
    return explain(cfg, old, new) or f"{name} was made by another version of this code"


def stage_stale(cfg: CFG, stage: str, part: Part = None) -> str | None:
    """Why a notebook stage must run for this part (the first of its outputs that is not up to
    date), or None."""
    with decision():
        return next((why for kind, p in BY_NAME[stage].makes(cfg, part) if (why := _stale(cfg, kind, p))), None)


def explain(cfg: CFG, old: dict, new: dict) -> str:
    """The differences between two fingerprints, the root cause of an upstream change included."""
    changes = []
    for k in sorted(set(old.get("keys", {})) | set(new["keys"])):
        a, b = old.get("keys", {}).get(k, "(unset)"), new["keys"].get(k, "(unset)")
        if a != b:
            changes.append(f"{k} {_short(a)} -> {_short(b)}")
    for f in sorted(set(old.get("files", {})) | set(new["files"])):
        if old.get("files", {}).get(f) != new["files"].get(f):
            changes.append(f"{f} changed")
    gone = sorted(set(old.get("upstream", {})) - set(new["upstream"]))
    if gone and not changes:  # the outputs of another run (another competition's, in a shared models folder) are not named
        changes.append(f"{', '.join(gone)} no longer among its inputs")
    for u in sorted(new["upstream"]):
        if old.get("upstream", {}).get(u) != new["upstream"].get(u):
            kind, part = parse_name(u)
            pending = str(new["upstream"].get(u, "")).startswith("pending")
            why = stale(cfg, kind, part) if pending and kind in OUTPUTS else None
            changes.append(f"{u} must be remade first ({why})" if why else f"{u} was remade")
    return "; ".join(dict.fromkeys(changes))


# --- what the stamps say of an experiment folder ---------------------------------------------------
def trained_folds(folder: Path) -> list[int]:
    """The folds an experiment's OOF and test predictions were made from (its cv stamp), not
    every fold*/best.pt on disk: an earlier run's folds 1-4 stay beside a time_limit run's
    holdout fold. Without the stamp (an experiment from an older version), the checkpoints."""
    folder = Path(folder)
    stamp = folder / "stamps" / "cv.json"
    if stamp.exists():
        upstream = json.loads(stamp.read_text())["made_from"]["upstream"]
        return sorted({int(name.rsplit("fold", 1)[1]) for name in upstream if name.startswith("train_fold")})
    return sorted(int(p.parent.name[4:]) for p in folder.glob("fold*/best.pt") if p.parent.name[4:].isdigit())


def experiment_dirs(cfg: CFG) -> list[Path]:
    """Every experiment of this competition under models/ with its OOF and test predictions
    and score (CNNs and stackers), matched by the data they were made from."""
    root, data = artifacts.models_root(cfg), competition_digest(cfg)
    if not root.is_dir():
        return []
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if all((d / f).exists() for f in ("oof.csv", "test.csv", "score.json")) and artifacts.read_score(d).get("data") == data:
            found.append(d)
    return found


def is_member(cfg: CFG, folder: Path) -> bool:
    """An experiment of the config file (`members`), or a stacker of one; with no members (a CFG
    made in Python) every experiment is."""
    manifest = artifacts.read_stacker_manifest(folder)
    return not cfg.members or (manifest["source"] if manifest else folder.name) in cfg.members


def blend_dirs(cfg: CFG, skipped: dict | None = None) -> list[Path]:
    """The experiments the ensemble blends: the config's own (is_member), then those named in
    `blend_others` ('*': every other of this competition) whose test predictions were made from
    today's test files; each one left out goes into `skipped` with the reason."""
    found = experiment_dirs(cfg)
    mine = [d for d in found if is_member(cfg, d)]
    asked = [d for d in found if d not in mine and ("*" in cfg.blend_others or d.name in cfg.blend_others)]
    others = []
    for d in asked:
        why = _other_test_files(cfg, d)
        if why and skipped is not None:
            skipped[d.name] = why
        others += [] if why else [d]
    return mine + others


def _other_test_files(cfg: CFG, folder: Path) -> str | None:
    """Why an experiment's test predictions are not of today's test files (None when they are),
    from what its stamps recorded."""
    today = _test_files(cfg)
    for path in sorted((folder / "stamps").glob("*.json")):
        made = json.loads(path.read_text()).get("made_from", {}).get("files", {})
        changed = [name for name, d in made.items() if name in today and d != today[name]]
        if changed:
            return f"its predictions ({path.stem}) were made from another {changed[0]} than today's"
    return None
