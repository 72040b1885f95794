"""Training recipes: named sets of settings (``recipes/NAME.yml`` at the repository's top level, or any
``FILE.yml``) that ``--recipe`` applies under the explicit flags, and the resolved settings of a run written
beside its checkpoints (``settings.yml``).

A recipe is a flat YAML mapping of settings of :data:`utils.training.settings.DEFAULTS` to values, read with
``yaml.safe_load`` and checked key by key: the type of a value is the type of the setting's default (an int
is taken for a float; a bool must be a YAML ``true``/``false``), or for a setting whose default is None the
type in :data:`NONE_DEFAULT_TYPES` (and null is allowed); a setting with a fixed set of values (``optim``,
``lr_schedule``, ``loss``) must be one of them. Every error is one line naming the file and the key.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import yaml

from utils.weights.loading import atomic_write

#: The shipped recipes: ``recipes/NAME.yml`` at the repository's top level.
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
#: Name of the resolved settings written in a run's checkpoint folder.
SETTINGS_FILE = "settings.yml"
#: The type of a setting whose default is None (any other such setting takes any scalar).
NONE_DEFAULT_TYPES: Dict[str, type] = {
    "input_size": int, "loss": str, "weight_decay": float, "bn_momentum": float, "device": str,
    "channels_last": bool,
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
# PyYAML (YAML 1.1) reads 1e-4 (no dot) as text; such a value is taken as the number it spells.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def recipe_names() -> List[str]:
    """The names of the shipped recipes (``recipes/*.yml``), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yml"))


def recipe_file(spec: str) -> Path:
    """The file of ``--recipe SPEC``: a path (it ends in ``.yml``/``.yaml`` or names a folder) as given, else
    the shipped ``recipes/SPEC.yml``. Raises FileNotFoundError (a missing file) or ValueError (an unknown
    name, listing the shipped ones)."""
    text = str(spec)
    if text.endswith((".yml", ".yaml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path
    path = RECIPES_DIR / f"{text}.yml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {text!r}: the recipes are {', '.join(recipe_names())} "
                         f"(or give a FILE.yml)")
    return path


def _shown(path: Path) -> str:
    """``recipes/NAME.yml`` for a shipped recipe, else the path as given."""
    return f"recipes/{path.name}" if path.parent == RECIPES_DIR else str(path)


def load_recipe(spec: str, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings of ``--recipe SPEC`` (a shipped name or a FILE.yml), checked against ``defaults`` (every
    setting and its default) and typed (ints given for floats become floats). An empty file is an empty
    recipe. Raises ValueError / FileNotFoundError in one line naming the file (and the key)."""
    path = recipe_file(spec)
    where = _shown(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{where}: not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a recipe is a mapping of settings to values, got {type(data).__name__}")
    return {str(key): check_setting(where, str(key), value, defaults) for key, value in data.items()}


def check_setting(where: str, key: str, value: Any, defaults: Mapping[str, Any]) -> Any:
    """``value`` of setting ``key`` from ``where`` (a file), typed; ValueError in one line when ``key`` is
    not a setting (with the closest names) or ``value`` has the wrong type or is not one of its choices."""
    if key == "recipe":
        raise ValueError(f"{where}: recipe: a recipe cannot name another recipe")
    if key not in defaults:
        close = difflib.get_close_matches(key, [k for k in defaults if k != "recipe"], n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{where}: unknown setting {key!r}{hint}")
    default = defaults[key]
    kind = NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    if value is None:
        if default is None:
            return None
        raise ValueError(f"{where}: {key}: expected {_TYPE_NAMES.get(kind, kind.__name__)}, got null")
    value = _typed(where, key, value, kind, default)
    choices = _choices().get(key)
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: {key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _typed(where: str, key: str, value: Any, kind: Optional[type], default: Any) -> Any:
    ok = None
    if kind is None:  # a None default outside NONE_DEFAULT_TYPES: any scalar
        ok = value if isinstance(value, (bool, int, float, str)) else None
    elif kind is bool:
        ok = value if isinstance(value, bool) else None
    elif kind is int:
        ok = value if isinstance(value, int) and not isinstance(value, bool) else None
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = float(value)
        elif isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            ok = float(value)
    elif kind is str:
        ok = _str_type(key)(value) if isinstance(value, str) else None
    elif kind in (list, tuple):
        ok = kind(value) if isinstance(value, (list, tuple)) else None
    else:
        ok = value if isinstance(value, kind) else None
    if ok is None:
        expected = _TYPE_NAMES.get(kind, "a scalar" if kind is None else f"a {kind.__name__}")
        raise ValueError(f"{where}: {key}: expected {expected}, got {value!r}")
    return ok


def _parser_actions() -> Dict[str, Any]:
    from utils.training.cli import build_parser  # here: cli imports settings, which imports this module

    return {action.dest: action for action in build_parser()._actions}


def _choices() -> Dict[str, Iterable[Any]]:
    """The fixed values of the settings that have them (``train.py``'s flags' choices)."""
    return {dest: action.choices for dest, action in _parser_actions().items() if action.choices is not None}


def _str_type(key: str):
    """The flag's own conversion of a string setting (``--optim``: lower case), else the string as is."""
    action = _parser_actions().get(key)
    convert = getattr(action, "type", None)
    return convert if convert is str.lower else str


def _plain(value: Any) -> Any:
    """A value YAML writes as a plain scalar (a Path becomes its text)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def settings_text(settings: Mapping[str, Any], defaults: Mapping[str, Any], header: str) -> str:
    """The YAML of a run's resolved settings: ``header`` as comment lines, then every setting of ``defaults``
    but ``recipe`` with its value, in the table's order (the file is itself a recipe: ``--recipe FILE``)."""
    body = {key: _plain(settings.get(key)) for key in defaults if key != "recipe"}
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def write_settings(folder: Path, settings: Mapping[str, Any], defaults: Mapping[str, Any], header: str) -> Path:
    """Write :func:`settings_text` to ``folder/settings.yml`` atomically (temporary file, then a rename)."""
    return atomic_write(settings_text(settings, defaults, header).encode("utf-8"), Path(folder) / SETTINGS_FILE)
