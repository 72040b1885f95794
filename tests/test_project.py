"""Project YAML (utils/config/project.py): the shipped projects, the anchor parser, every error path."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from utils.config.project import (MAX_DEPTH, MAX_ELEMENTS, MAX_TEXT_LENGTH, PROJECTS_DIR, REQUIRED_KEYS, load_project,
                           parse_number_list, resolve_project_path)

COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
EXPECTED_SCALES = (2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0))
EXPECTED_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def _shape_data() -> dict:
    return yaml.safe_load((PROJECTS_DIR / "shape.yml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: dict, name: str = "proj.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_coco_project():
    project = load_project("coco")
    assert project.project_name == "coco"
    assert (project.train_set, project.val_set, project.num_gpus) == ("train2017", "val2017", 1)
    assert project.mean == (0.485, 0.456, 0.406) and project.std == (0.229, 0.224, 0.225)
    assert project.num_classes == 90
    unused = tuple(i + 1 for i, name in enumerate(project.obj_list) if name == "")
    assert unused == COCO_UNUSED_IDS
    assert project.obj_list[0] == "person" and project.obj_list[89] == "toothbrush"
    assert project.obj_list[project.obj_list.index("stop sign")] == "stop sign"
    assert project.obj_list.index("stop sign") + 1 == 13
    assert project.category_id(project.obj_list.index("tv")) == 72
    assert Path(project.path) == PROJECTS_DIR / "coco.yml"


def test_shape_project():
    project = load_project("shape")
    assert (project.project_name, project.train_set, project.val_set) == ("shape", "train", "val")
    assert project.obj_list == ("rectangle", "circle")
    assert project.num_classes == 2


@pytest.mark.parametrize("name", ["coco", "shape"])
def test_anchor_strings_parse_to_exact_floats(name):
    project = load_project(name)
    assert project.anchors_scales == EXPECTED_SCALES        # exact, not approximate
    assert project.anchors_ratios == EXPECTED_RATIOS
    assert all(type(v) is float for v in project.anchors_scales)


def test_load_by_path_and_extra_keys(tmp_path):
    data = _shape_data()
    data["project_name"] = "mine"
    data["extra_setting"] = 3
    project = load_project(_write(tmp_path, data))
    assert project.project_name == "mine" and project.extra == {"extra_setting": 3}


def test_name_resolves_to_projects_dir_even_with_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "shape").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_project_path("shape") == PROJECTS_DIR / "shape.yml"
    assert load_project("shape").project_name == "shape"


@pytest.mark.parametrize("text, expected", [
    ("[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]", [1.0, 2 ** (1 / 3), 2 ** (2 / 3)]),
    ("[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]", [[1.0, 1.0], [1.4, 0.7], [0.7, 1.4]]),
    ("[-1 + 3, 6 / 4, 2 * 0.5]", [2.0, 1.5, 1.0]),
    ([1, 2.5], [1.0, 2.5]),
])
def test_parse_number_list(text, expected):
    assert parse_number_list(text) == expected


@pytest.mark.parametrize("text", [
    "[__import__('os').system('echo hacked')]",
    "__import__('os')",
    "[a, 1]",
    "[math.pi]",
    "[abs(-1)]",
    "[x for x in (1, 2)]",
    "['1.0']",
    "[True, 1.0]",
    "[1 if 1 else 2]",
    "[2 ** 1000]",
    "[1 / 0]",
    "[[0] * 10 ** 9]",
    "[(-8) ** 0.5]",
    "[1e308 * 10]",
    "[1, 2",
    "1.0",
])
def test_parse_number_list_rejects_non_arithmetic(text):
    with pytest.raises(ValueError):
        parse_number_list(text)


def test_published_anchor_strings_parse_to_the_same_floats():
    assert parse_number_list("[2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0)]") == list(EXPECTED_SCALES)
    assert parse_number_list("[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]") == [list(r) for r in EXPECTED_RATIOS]
    assert parse_number_list("[2 ** 0, 2 ** (1 / 3), 2 ** (2 / 3)]") == list(EXPECTED_SCALES)


@pytest.mark.parametrize("text, why", [
    ("[(((2 ** 64) ** 64) ** 64) ** 64]", "number too large"),   # ran until MemoryError before the bounds
    ("[((2 ** 40) ** 40) ** 40]", "number too large"),
    ("[9 ** 9 ** 9]", "exponent too large"),
    ("[10 ** 13]", "number too large"),
    ("[0.001 ** -10]", "number too large"),
    ("[123456789012345678901234567890]", "number too large"),
    ("[1e6 * 1e6 * 10]", "number too large"),
    ("[" + "2 * " * 100 + "1]", "nested too deeply"),
    ("[" + ", ".join(["1.0"] * (MAX_ELEMENTS + 1)) + "]", "too many elements"),
    ("[" * (MAX_DEPTH + 2) + "1" + "]" * (MAX_DEPTH + 2), "nested too deeply"),
    ("[" + "-" * 900 + "1]", "too large"),
    ("[" + "(" * 300 + "1" + ")" * 300 + "]", "nested"),
    ("[" + "1.0, " * 300 + "1.0]", "too long"),
])
def test_parse_number_list_bounds_its_work(text, why):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=why) as info:
        parse_number_list(text)
    assert time.perf_counter() - start < 1.0  # generous: the bounds reject before any large computation
    message = str(info.value)
    assert "\n" not in message and len(message) < 300


def test_parse_number_list_limits_leave_room_for_real_lists():
    assert parse_number_list("[10 ** 12, -(2 ** 39), 2 ** -64]") == [1e12, -float(2 ** 39), 2.0 ** -64]
    assert len(parse_number_list("[" + ", ".join(["1.5"] * MAX_ELEMENTS) + "]")) == MAX_ELEMENTS
    nested = "[" * (MAX_DEPTH - 1) + "2" + "]" * (MAX_DEPTH - 1)
    value = parse_number_list(nested)
    for _ in range(MAX_DEPTH - 2):
        value = value[0]
    assert value == [2.0]
    assert len("[" + "1.0, " * 300 + "1.0]") > MAX_TEXT_LENGTH


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_is_named(tmp_path, key):
    data = _shape_data()
    del data[key]
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=rf"proj\.yml: missing key '{key}'"):
        load_project(path)


def test_all_missing_keys_listed(tmp_path):
    path = _write(tmp_path, {"project_name": "x"})
    with pytest.raises(ValueError) as info:
        load_project(path)
    for key in REQUIRED_KEYS[1:]:
        assert key in str(info.value)


@pytest.mark.parametrize("key, value, why", [
    ("project_name", "", "non-empty string"),
    ("project_name", [1], "non-empty string"),
    ("num_gpus", "one", "integer"),
    ("num_gpus", -1, "integer"),
    ("num_gpus", True, "integer"),
    ("mean", [0.5, 0.5], "3 numbers"),
    ("mean", "[0.5, 0.5, x]", "unsupported expression"),
    ("std", [0.2, 0.0, 0.2], "positive"),
    ("anchors_scales", "[]", "non-empty"),
    ("anchors_scales", "[-1.0]", "positive"),
    ("anchors_scales", "[__import__('os')]", "unsupported expression"),
    ("anchors_ratios", "[(1.0, 1.0, 1.0)]", "pairs"),
    ("anchors_ratios", "[1.0, 2.0]", "pairs"),
    ("anchors_ratios", 5, "expected a list"),
    ("obj_list", "rectangle", "list of class names"),
    ("obj_list", [], "list of class names"),
    ("obj_list", [["a"], "b"], "class names"),
])
def test_wrong_types_name_file_and_key(tmp_path, key, value, why):
    data = _shape_data()
    data[key] = value
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        load_project(path)
    message = str(info.value)
    assert str(path) in message and repr(key) in message and why in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yml"):
        load_project(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("project_name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.yml: invalid YAML"):
        load_project(bad)
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("just a string\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"scalar\.yml: expected a mapping"):
        load_project(scalar)


def test_pool_padding_and_loss_are_typed_choices(tmp_path):
    assert (load_project("coco").pool_padding, load_project("coco").loss) == ("published", "yaep")
    assert load_project("coco_official").pool_padding == "official"
    data = _shape_data()
    data["loss"] = "official"
    project = load_project(_write(tmp_path, data))
    assert project.loss == "official" and "loss" not in project.extra
    data["pool_padding"] = "zeros"
    with pytest.raises(ValueError, match=r"key 'pool_padding': expected one of published, official \(got 'zeros'\)"):
        load_project(_write(tmp_path, data))


def test_write_anchors_keeps_every_other_line(tmp_path):
    """The anchors of a project YAML replaced in place (block-list form too), comments and keys kept; a file
    missing a key or whose result does not load is left untouched, with an error naming it."""
    from utils.config.project import write_anchors

    original = (PROJECTS_DIR / "shape.yml").read_text()
    text = original.replace("anchors_ratios: '[(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]'",
                            "anchors_ratios:\n  - [1.0, 1.0]\n  - [1.4, 0.7]\n  - [0.7, 1.4]")
    path = tmp_path / "p.yml"
    path.write_text(text)
    write_anchors(path, ["anchors_scales: '[0.5, 1.0, 2.0]'", "anchors_ratios: '[(2.0, 0.5), (1.0, 1.0), (0.5, 2.0)]'"])
    project = load_project(path)
    assert project.anchors_scales == (0.5, 1.0, 2.0) and project.anchors_ratios == ((2.0, 0.5), (1.0, 1.0), (0.5, 2.0))
    kept = [l for l in original.splitlines() if not l.startswith("anchors_")]
    assert [l for l in path.read_text().splitlines() if not l.startswith("anchors_")] == kept
    with pytest.raises(ValueError, match="anchors_scales"):
        write_anchors(path, ["anchors_scales: '[-1.0]'", "anchors_ratios: '[(1.0, 1.0)]'"])
    assert load_project(path).anchors_scales == (0.5, 1.0, 2.0) and not list(tmp_path.glob(".*.tmp"))
    path.write_text("\n".join(l for l in original.splitlines() if not l.startswith("anchors_ratios")))
    with pytest.raises(ValueError, match="no anchors_ratios entry"):
        write_anchors(path, ["anchors_scales: '[1.0]'", "anchors_ratios: '[(1.0, 1.0)]'"])
