"""Project YAML files (``projects/NAME.yml``): read with ``yaml.safe_load`` into typed fields.

The published format::

    project_name: coco
    train_set: train2017
    val_set: val2017
    num_gpus: 1
    mean: [0.485, 0.456, 0.406]
    std: [0.229, 0.224, 0.225]
    anchors_scales: '[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]'
    anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'
    obj_list: ['person', 'bicycle', ...]

The anchor strings are arithmetic, parsed by :func:`parse_number_list` (never ``eval``).
``obj_list[i]`` is the class with COCO ``category_id = i + 1``; ``''`` marks an unused id.
"""
from __future__ import annotations

import ast
import logging
import math
import os
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import yaml

logger = logging.getLogger(__name__)

PROJECTS_DIR = Path(__file__).resolve().parents[2] / "projects"

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# Bounds of the arithmetic parser: anything beyond is a ValueError before any large computation, so a
# hostile or mistyped YAML string ('[(((2 ** 64) ** 64) ** 64) ** 64]') fails at once instead of
# exhausting memory. The published anchor strings are far inside them.
MAX_TEXT_LENGTH = 1000      # characters of one string
MAX_DEPTH = 16              # nesting of brackets and operations
MAX_ELEMENTS = 100          # list / tuple elements, all levels together
MAX_NODES = 400             # syntax-tree nodes
MAX_MAGNITUDE = 1e12        # |x| of every literal and intermediate result
MAX_EXPONENT = 64           # |exponent| of **

Number = Union[int, float]


def _short(text: str, limit: int = 60) -> str:
    """``text`` for an error message: repr, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"… ({len(text)} characters)"


def _bounded(value: Any, text: str) -> Number:
    """``value`` when it is a real number with ``|value| <= MAX_MAGNITUDE``; else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"cannot evaluate {_short(text)}: result {value!r} is not a real number")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"number too large in {_short(text)}: |x| above {MAX_MAGNITUDE:g}")
    return value


def _check_power(base: Number, exponent: Number, text: str) -> None:
    """Reject ``base ** exponent`` before computing it when the exponent or the result is too large."""
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent too large in {_short(text)}: |{exponent!r}| above {MAX_EXPONENT}")
    if base != 0 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ValueError(f"number too large in {_short(text)}: {base!r} ** {exponent!r} above {MAX_MAGNITUDE:g}")


def _evaluate(node: ast.AST, text: str, depth: int = 0) -> Any:
    """Value of the syntax tree ``node`` of ``text``: a number or a (nested) list of numbers.

    Only number literals, ``+ - * / **``, unary ``+ -`` and list / tuple brackets; every literal and
    intermediate result is bounded by :data:`MAX_MAGNITUDE`, exponents by :data:`MAX_EXPONENT`, the
    nesting by :data:`MAX_DEPTH`. Raises ValueError (one line naming ``text``) otherwise.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"expression nested too deeply in {_short(text)}: more than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return _bounded(node.value, text)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, text, depth + 1), _evaluate(node.right, text, depth + 1)
        if isinstance(left, list) or isinstance(right, list):
            raise ValueError(f"arithmetic on a list in {_short(text)}: only numbers can be combined")
        if isinstance(node.op, ast.Pow):
            _check_power(left, right, text)
        try:
            return _bounded(_BINARY_OPS[type(node.op)](left, right), text)
        except (ZeroDivisionError, OverflowError) as exc:
            raise ValueError(f"cannot evaluate {_short(text)}: {exc}") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand, text, depth + 1)
        if isinstance(operand, list):
            raise ValueError(f"arithmetic on a list in {_short(text)}: only numbers can be combined")
        return _UNARY_OPS[type(node.op)](operand)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, text, depth + 1) for e in node.elts]
    raise ValueError(f"unsupported expression {ast.dump(node)[:40]!r} in {_short(text)}: "
                     "only numbers, + - * / ** and brackets are allowed")


def _parse_bounded(text: str) -> Any:
    """Parse and evaluate one arithmetic string within the bounds above (ValueError otherwise)."""
    if len(text) > MAX_TEXT_LENGTH:
        raise ValueError(f"expression too long: {_short(text)} (at most {MAX_TEXT_LENGTH} characters)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, MemoryError, RecursionError) as exc:  # the parser's own nesting limits
        reason = exc.msg if isinstance(exc, SyntaxError) else "nested too deeply"
        raise ValueError(f"cannot parse {_short(text)}: {reason}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ValueError(f"expression too large in {_short(text)}: {len(nodes)} syntax nodes "
                         f"(at most {MAX_NODES})")
    elements = sum(len(n.elts) for n in nodes if isinstance(n, (ast.List, ast.Tuple)))
    if elements > MAX_ELEMENTS:
        raise ValueError(f"too many elements in {_short(text)}: {elements} (at most {MAX_ELEMENTS})")
    return _evaluate(tree.body, text)


def parse_number_list(value: Union[str, list, tuple]) -> list:
    """Parse ``'[2 ** 0, 2 ** (1.0 / 3.0)]'`` or ``'[(1.0, 1.0), (1.4, 0.7)]'`` into nested lists of floats.

    Accepts an already-parsed YAML list too. Raises ValueError for anything but arithmetic, and for
    strings beyond the parser's bounds (:data:`MAX_TEXT_LENGTH` characters, :data:`MAX_DEPTH` levels,
    :data:`MAX_ELEMENTS` elements, numbers above :data:`MAX_MAGNITUDE`, exponents above
    :data:`MAX_EXPONENT`), without doing the large computation.
    """
    original = value
    if isinstance(value, str):
        value = _parse_bounded(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {value!r}")
    return _to_floats(value, original)


def _to_floats(value: Any, context: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_to_floats(v, context) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r} in {context!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"number too large in {context!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r} in {context!r}")
    return number


@dataclass(frozen=True)
class ProjectConfig:
    """A project: dataset folders, normalisation, anchors and class names."""

    project_name: str
    train_set: str
    val_set: str
    num_gpus: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    anchors_scales: Tuple[float, ...]
    anchors_ratios: Tuple[Tuple[float, float], ...]
    obj_list: Tuple[str, ...]
    #: BiFPN max-pool padding: "published" (zeros, the published checkpoints) or "official" (-inf, TensorFlow).
    pool_padding: str = "published"
    #: Training loss formulation: "yaep" (published) or "official" (``train.py --loss`` overrides it).
    loss: str = "yaep"
    path: str = ""
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.obj_list)

    def category_id(self, label: int) -> int:
        """COCO category id of class index ``label`` (``obj_list`` index + 1)."""
        return label + 1


REQUIRED_KEYS = ("project_name", "train_set", "val_set", "num_gpus", "mean", "std", "anchors_scales",
                 "anchors_ratios", "obj_list")
#: Optional keys with a fixed set of values (the first is the default).
CHOICE_KEYS: Dict[str, Tuple[str, ...]] = {"pool_padding": ("published", "official"), "loss": ("yaep", "official")}


def resolve_project_path(project: Union[str, Path]) -> Path:
    """``coco`` -> ``projects/coco.yml``; an existing path is returned as is."""
    path = Path(project)
    if path.suffix in (".yml", ".yaml") or path.is_file():
        return path
    return PROJECTS_DIR / f"{project}.yml"


def load_project(project: Union[str, Path]) -> ProjectConfig:
    """Read a project YAML (a name under ``projects/`` or a path).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid YAML, a missing key or a malformed value; the message names the file and key.
    """
    path = resolve_project_path(project)
    if not path.is_file():
        raise FileNotFoundError(f"project file not found: {path}")
    data = _read_mapping(path)
    for key in ("project_name", "train_set", "val_set"):
        if not isinstance(data[key], (str, int)) or isinstance(data[key], bool) or str(data[key]) == "":
            raise _bad(path, data, key, "expected a non-empty string")
    num_gpus = data["num_gpus"]
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise _bad(path, data, "num_gpus", "expected an integer >= 0")
    stats = _parse_stats(path, data)
    scales, ratios = _parse_anchors(path, data)
    names = _parse_obj_list(path, data)
    choices = _parse_choices(path, data)
    extra = {k: v for k, v in data.items() if k not in REQUIRED_KEYS and k not in CHOICE_KEYS}
    return ProjectConfig(
        project_name=str(data["project_name"]), train_set=str(data["train_set"]), val_set=str(data["val_set"]),
        num_gpus=num_gpus, mean=stats["mean"], std=stats["std"], anchors_scales=tuple(scales),
        anchors_ratios=tuple((r[0], r[1]) for r in ratios), obj_list=names, path=str(path), extra=extra,
        **choices)


def _read_mapping(path: Path) -> Dict[str, Any]:
    """The YAML mapping of ``path``, checked to hold every key of :data:`REQUIRED_KEYS`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
    return data


def _bad(path: Path, data: Dict[str, Any], key: str, why: str) -> ValueError:
    """The ValueError for a malformed value of ``key``, naming the file, the key and the value."""
    shown = "" if str(data[key])[:20] in why else f" (got {data[key]!r})"  # parser messages quote the text
    return ValueError(f"{path}: key {key!r}: {why}{shown}")


def _parse_key(path: Path, data: Dict[str, Any], key: str) -> list:
    """:func:`parse_number_list` of ``data[key]``, its ValueError naming the file and key."""
    try:
        return parse_number_list(data[key])
    except ValueError as exc:
        raise _bad(path, data, key, str(exc)) from None


def _parse_stats(path: Path, data: Dict[str, Any]) -> Dict[str, Tuple[float, ...]]:
    """``mean`` and ``std``: 3 numbers each, the std ones positive."""
    stats = {}
    for key in ("mean", "std"):
        values = _parse_key(path, data, key)
        if len(values) != 3 or any(isinstance(v, list) for v in values):
            raise _bad(path, data, key, "expected 3 numbers (R, G, B)")
        if key == "std" and any(v <= 0 for v in values):
            raise _bad(path, data, key, "std values must be positive")
        stats[key] = tuple(values)
    return stats


def _parse_anchors(path: Path, data: Dict[str, Any]) -> Tuple[list, list]:
    """``anchors_scales`` (positive numbers) and ``anchors_ratios`` (positive pairs), both non-empty."""
    scales = _parse_key(path, data, "anchors_scales")
    if not scales or any(isinstance(s, list) or s <= 0 for s in scales):
        raise _bad(path, data, "anchors_scales", "expected a non-empty list of positive numbers")
    ratios = _parse_key(path, data, "anchors_ratios")
    if not ratios or any(not isinstance(r, list) or len(r) != 2 or min(r) <= 0 for r in ratios):
        raise _bad(path, data, "anchors_ratios", "expected a non-empty list of positive (width, height) pairs")
    return scales, ratios


def _parse_obj_list(path: Path, data: Dict[str, Any]) -> Tuple[str, ...]:
    """``obj_list`` as class-name strings (``None`` -> ``''``, an unused id)."""
    obj_list = data["obj_list"]
    if not isinstance(obj_list, list) or not obj_list:
        raise _bad(path, data, "obj_list", "expected a non-empty list of class names")
    if any(isinstance(n, (list, dict)) for n in obj_list):
        raise _bad(path, data, "obj_list", "expected class names (strings), not nested lists or mappings")
    return tuple("" if n is None else str(n) for n in obj_list)


def _parse_choices(path: Path, data: Dict[str, Any]) -> Dict[str, str]:
    """The :data:`CHOICE_KEYS` values (their default when absent), each checked against its allowed values."""
    choices = {}
    for key, allowed in CHOICE_KEYS.items():
        choices[key] = data.get(key, allowed[0])
        if choices[key] not in allowed:
            raise _bad(path, data, key, f"expected one of {', '.join(allowed)}")
    return choices


ANCHOR_KEYS = ("anchors_scales", "anchors_ratios")


def write_anchors(path: Union[str, Path], lines: Sequence[str]) -> Path:
    """Replace the ``anchors_scales`` and ``anchors_ratios`` entries of the project YAML ``path`` with ``lines``
    (``"anchors_scales: '[...]'"``, ``"anchors_ratios: '[...]'"``), keeping every other line and comment.

    An entry is its key's line plus the indented lines under it. The file is written atomically and read back
    with :func:`load_project`; ValueError (naming the file) when a key is missing or the result does not load.
    """
    path = Path(path)
    replacement = {line.split(":", 1)[0].strip(): line for line in lines}
    if sorted(replacement) != sorted(ANCHOR_KEYS):
        raise ValueError(f"expected the lines of {ANCHOR_KEYS}, got {list(replacement)}")
    out: List[str] = []
    skipping = False
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split(":", 1)[0].strip() if line[:1] not in (" ", "\t", "#", "-") else None
        if skipping and key is None and line.strip() and not line.startswith("#"):
            continue  # the indented continuation of a replaced entry
        skipping = key in replacement
        out.append(replacement.pop(key) if skipping else line)
    if replacement:
        raise ValueError(f"{path}: no {' or '.join(sorted(replacement))} entry to replace")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(out) + "\n", encoding="utf-8")
    try:
        load_project(temporary)  # ValueError naming the problem before the project file changes
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
