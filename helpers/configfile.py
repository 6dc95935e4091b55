"""Reading config files and overrides: YAML read safely (a key given twice in any mapping is an
error naming it and both lines), `--set key=value` strings, durations ('20min', '8h')."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository root: relative config paths start here


def parse_set(items: list[str]) -> dict:
    """`key=value` strings (values read as YAML: 3, 0.1, true, [a, b]) to a dict. A string
    without '=', a value that is not YAML (`folds=[0`) or a key given twice raises ValueError
    naming it."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got '{item}' (e.g. --set {item.strip() or 'epochs'}=20)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set expects key=value, got '{item}' (no key before '=')")
        if key in out:
            raise ValueError(f"--set gives config key '{key}' twice ({key}={out[key]!r} and '{item}'): give it once")
        try:
            out[key] = load_yaml(value, f"--set {key}") if value != "" else ""
        except ValueError as e:
            raise ValueError(f"{str(e).splitlines()[0]}; cannot read {value!r} as a value (lists are written "
                             f"[0, 1], text with spaces in quotes)") from None
    return out


def duplicate_keys(node, where: str = "") -> list[str]:
    """Every key given twice in a mapping of a composed YAML document (PyYAML keeps the last
    silently): the same experiment twice under `experiments:`, a top-level key twice, a key twice
    in model_kwargs; each named with its place and both lines."""
    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name, line = key_node.value, key_node.start_mark.line + 1
            if name in seen:
                out.append(f"key '{where}{name}' is given twice, on line {seen[name]} and on line {line}: keep one")
            else:
                seen[name] = line
            out += duplicate_keys(value_node, f"{where}{name}.")
    elif isinstance(node, yaml.SequenceNode):
        for value_node in node.value:
            out += duplicate_keys(value_node, where)
    return out


def load_yaml(text, what: str):
    """A YAML document (a string or a stream) read safely, refusing keys given twice: raises
    ValueError naming `what`, the key and its lines, or YAML's own error."""
    loader = yaml.SafeLoader(text)  # a stream keeps its name for YAML's own messages
    try:
        node = loader.get_single_node()
        duplicates = duplicate_keys(node)
        if duplicates:
            raise ValueError(f"{what}: " + "; ".join(duplicates))
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:  # a typo in the file: say where, without a traceback
        raise ValueError(f"{what}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """The raw mapping of a config file; a key given twice in any mapping is an error naming
    the key and both lines."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = load_yaml(f, str(path)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def parse_duration(text: str | float | int, key: str = "time_limit") -> float:
    """Seconds in '20min', '8h', '1h30m', '90s' or '600' (seconds); 0 for ''."""
    if isinstance(text, (int, float)):
        return float(text)
    text = str(text).strip().lower().replace(" ", "")
    if not text:
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    if not parts or "".join(n + u for n, u in parts) != text or any(u not in units for _, u in parts):
        raise ValueError(f"config key '{key}': cannot read {text!r} as a duration (e.g. '20min', '8h', '1h30m', '600s')")
    return sum(float(n) * units[u] for n, u in parts)
