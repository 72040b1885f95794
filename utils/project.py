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
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import yaml

logger = logging.getLogger(__name__)

PROJECTS_DIR = Path(__file__).resolve().parent.parent / "projects"

_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}

Number = Union[int, float]


def _evaluate(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, text), _evaluate(node.right, text)
        if isinstance(left, list) or isinstance(right, list):
            raise ValueError(f"arithmetic on a list in {text!r}: only numbers can be combined")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError(f"exponent too large in {text!r}")
        try:
            return _BINARY_OPS[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise ValueError(f"cannot evaluate {text!r}: {exc}") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand, text)
        if isinstance(operand, list):
            raise ValueError(f"arithmetic on a list in {text!r}: only numbers can be combined")
        return _UNARY_OPS[type(node.op)](operand)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, text) for e in node.elts]
    raise ValueError(f"unsupported expression {ast.dump(node)[:40]!r} in {text!r}: "
                     "only numbers, + - * / ** and brackets are allowed")


def parse_number_list(value: Union[str, list, tuple]) -> list:
    """Parse ``'[2 ** 0, 2 ** (1.0 / 3.0)]'`` or ``'[(1.0, 1.0), (1.4, 0.7)]'`` into nested lists of floats.

    Accepts an already-parsed YAML list too. Raises ValueError for anything but arithmetic.
    """
    original = value
    if isinstance(value, str):
        try:
            tree = ast.parse(value.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"cannot parse {value!r}: {exc.msg}") from None
        value = _evaluate(tree.body, value)
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if len(missing) > 1 else ""))

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: key {key!r}: {why} (got {data[key]!r})")

    for key in ("project_name", "train_set", "val_set"):
        if not isinstance(data[key], (str, int)) or isinstance(data[key], bool) or str(data[key]) == "":
            raise bad(key, "expected a non-empty string")
    num_gpus = data["num_gpus"]
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise bad("num_gpus", "expected an integer >= 0")
    stats = {}
    for key in ("mean", "std"):
        try:
            values = parse_number_list(data[key])
        except ValueError as exc:
            raise bad(key, str(exc)) from None
        if len(values) != 3 or any(isinstance(v, list) for v in values):
            raise bad(key, "expected 3 numbers (R, G, B)")
        if key == "std" and any(v <= 0 for v in values):
            raise bad(key, "std values must be positive")
        stats[key] = tuple(values)
    try:
        scales = parse_number_list(data["anchors_scales"])
    except ValueError as exc:
        raise bad("anchors_scales", str(exc)) from None
    if not scales or any(isinstance(s, list) or s <= 0 for s in scales):
        raise bad("anchors_scales", "expected a non-empty list of positive numbers")
    try:
        ratios = parse_number_list(data["anchors_ratios"])
    except ValueError as exc:
        raise bad("anchors_ratios", str(exc)) from None
    if not ratios or any(not isinstance(r, list) or len(r) != 2 or min(r) <= 0 for r in ratios):
        raise bad("anchors_ratios", "expected a non-empty list of positive (width, height) pairs")
    obj_list = data["obj_list"]
    if not isinstance(obj_list, list) or not obj_list:
        raise bad("obj_list", "expected a non-empty list of class names")
    if any(isinstance(n, (list, dict)) for n in obj_list):
        raise bad("obj_list", "expected class names (strings), not nested lists or mappings")
    names = tuple("" if n is None else str(n) for n in obj_list)
    extra = {k: v for k, v in data.items() if k not in REQUIRED_KEYS}
    return ProjectConfig(
        project_name=str(data["project_name"]), train_set=str(data["train_set"]), val_set=str(data["val_set"]),
        num_gpus=num_gpus, mean=stats["mean"], std=stats["std"], anchors_scales=tuple(scales),
        anchors_ratios=tuple((r[0], r[1]) for r in ratios), obj_list=names, path=str(path), extra=extra)
