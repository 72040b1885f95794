"""Training recipes (``--recipe``, utils/training/recipes.py): the shipped files, their checks and one-line
errors, precedence (flag > recipe > defaults; a resume keeps the saved run's), ``settings.yml``, ``--lr_batch``
and ``--head_only_epochs``, on a tiny synthetic project at 128 px."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

import train
from backbone import EfficientDet
from tests.test_train import base_args, ckpt_dir, latest_state, read_log, write_tiny_project
from utils.training.parts import head_only_warmup
from utils.training.recipes import RECIPES_DIR, SETTINGS_FILE, load_recipe, recipe_names
from utils.training.settings import DEFAULTS, resolve_settings
from utils.training.state import build_optimizer, build_scheduler

# The type each setting's value must have in a recipe, written out (None: null allowed too).
TYPES = {"input_size": (int, None), "batch_size": (int,), "num_workers": (int,), "no_flip": (bool,),
         "scale_jitter": (bool,), "loss": (str, None), "lr": (float,), "optim": (str,), "weight_decay": (float, None),
         "clip_grad": (float,), "num_epochs": (int,), "max_steps": (int,), "lr_schedule": (str,),
         "warmup_epochs": (float,), "amp": (bool,), "grad_checkpoint": (bool,), "channels_last": (bool, None),
         "ema": (bool,), "ema_decay": (float,), "bn_momentum": (float, None), "head_only": (bool,), "seed": (int,),
         "lr_batch": (int,), "head_only_epochs": (float,), "vflip": (float,), "mosaic": (float,), "hsv_h": (float,),
         "hsv_s": (float,), "hsv_v": (float,), "affine_scale": (float,), "affine_translate": (float,),
         "affine_rotate": (float,)}
AUGMENTATION_OFF = {"vflip": 0.0, "mosaic": 0.0, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "affine_scale": 0.0,
                    "affine_translate": 0.0, "affine_rotate": 0.0}
OFFICIAL = {"optim": "sgd", "lr": 0.08, "lr_batch": 64, "lr_schedule": "cosine", "warmup_epochs": 1.0,
            "weight_decay": 4e-5, "clip_grad": 10.0, "ema": True, "ema_decay": 0.9998, "scale_jitter": True,
            "no_flip": False, "loss": "official", "bn_momentum": 0.01, "num_epochs": 300}
PUBLISHED = {"input_size": None, "batch_size": 12, "no_flip": False, "scale_jitter": False, "loss": None, "lr": 1e-4,
             "lr_batch": 0, "optim": "adamw", "weight_decay": None, "clip_grad": 0.0, "num_epochs": 500,
             "lr_schedule": "plateau", "warmup_epochs": 1.0, "ema": False, "ema_decay": 0.9998, "bn_momentum": None,
             "head_only": False, "head_only_epochs": 0.0, "seed": 42, **AUGMENTATION_OFF}
SHORT = ["--save_interval", "0", "--val_interval", "0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One thread: small forwards, and the same float round-off in every run of a comparison."""


def _raw(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yml").read_text(encoding="utf-8"))


def _settings_yml(root: Path, run: str) -> dict:
    return yaml.safe_load((ckpt_dir(root, run) / SETTINGS_FILE).read_text(encoding="utf-8"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_every_shipped_recipe_loads_with_valid_keys_and_types():
    assert recipe_names() == ["finetune", "official", "published", "scratch"]
    for name in recipe_names():
        text = (RECIPES_DIR / f"{name}.yml").read_text(encoding="utf-8")
        assert text.startswith("# ") and len([ln for ln in text.splitlines() if ln.startswith("#")]) >= 3, name
        raw = _raw(name)
        assert raw and isinstance(raw, dict), name
        for key, value in raw.items():
            assert key in DEFAULTS and key in TYPES, (name, key)
            allowed = TYPES[key]
            assert (value is None and None in allowed) or any(
                type(value) is t for t in allowed if t is not None), (name, key, value)
        assert load_recipe(name, DEFAULTS) == raw
    assert _raw("official") == OFFICIAL
    assert _raw("scratch") == {"batch_size": 8, "lr": 8e-3, "lr_schedule": "cosine", "loss": "official",
                               "bn_momentum": 0.1, "clip_grad": 0.3}
    assert _raw("finetune") == {"optim": "adamw", "lr": 1e-3, "lr_schedule": "plateau", "warmup_epochs": 1.0,
                                "head_only_epochs": 0.0, "clip_grad": 10.0, "ema": True, "batch_size": 8,
                                "num_epochs": 50}


def test_published_is_todays_defaults():
    assert _raw("published") == PUBLISHED
    assert all(DEFAULTS[key] == value for key, value in PUBLISHED.items())


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "my.yml: unknown setting 'lrr' (did you mean lr?)"),
    ("lr: fast\n", "my.yml: lr: expected a number, got 'fast'"),
    ("ema: 'true'\n", "my.yml: ema: expected true or false, got 'true'"),
    ("ema: 1\n", "my.yml: ema: expected true or false, got 1"),
    ("batch_size: 8.5\n", "my.yml: batch_size: expected an integer, got 8.5"),
    ("batch_size: true\n", "my.yml: batch_size: expected an integer, got True"),
    ("batch_size: null\n", "my.yml: batch_size: expected an integer, got null"),
    ("optim: rmsprop\n", "my.yml: optim: expected one of adamw, sgd, got 'rmsprop'"),
    ("- lr\n- 0.1\n", "my.yml: a recipe is a mapping of settings to values, got list"),
    ("lr: [1\n", "my.yml: not valid YAML"),
    ("recipe: scratch\n", "my.yml: recipe: a recipe cannot name another recipe"),
])
def test_a_bad_recipe_is_one_line_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(ValueError) as info:
        load_recipe(str(_write(tmp_path, text)), DEFAULTS)
    assert str(info.value).startswith(str(tmp_path / message)) and "\n" not in str(info.value)


def test_every_setting_can_be_in_a_recipe(tmp_path):
    """Any setting of the table, with its default (null for None), loads: new settings need no change here."""
    settings = {key: value for key, value in DEFAULTS.items() if key != "recipe"}
    path = _write(tmp_path, yaml.safe_dump(settings))
    assert load_recipe(str(path), DEFAULTS) == settings


def test_values_are_typed_as_the_defaults(tmp_path):
    path = _write(tmp_path, "lr: 1\nweight_decay: 1e-5\ninput_size: null\noptim: SGD\nema: true\n# a comment\n")
    loaded = load_recipe(str(path), DEFAULTS)
    assert loaded == {"lr": 1.0, "weight_decay": 1e-5, "input_size": None, "optim": "sgd", "ema": True}
    assert type(loaded["lr"]) is float and type(loaded["weight_decay"]) is float
    assert load_recipe(str(_write(tmp_path, "# nothing yet\n")), DEFAULTS) == {}


def test_unknown_name_and_missing_file(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^unknown recipe 'fats': the recipes are finetune, official, published, "
                                         r"scratch \(or give a FILE.yml\)$"):
        load_recipe("fats", DEFAULTS)
    with pytest.raises(FileNotFoundError, match="recipe file not found: .*nope.yml"):
        load_recipe(str(tmp_path / "nope.yml"), DEFAULTS)
    yaml_path = write_tiny_project(tmp_path)  # train.py: one line, exit status 1
    assert train.main(train.parse_args(base_args(tmp_path, yaml_path, "x") + ["--recipe", "fats"])) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown recipe 'fats': the recipes are finetune, official, published, scratch (or give a FILE.yml)"]


def _resolve(argv: List[str], saved=None):
    lines: List[str] = []
    settings, given, _ = resolve_settings(train.parse_args(["-p", "x"] + argv), saved, lines.append)
    return settings, given, lines


def test_flag_beats_recipe_beats_defaults_and_the_block_names_sources():
    settings, given, lines = _resolve(["--recipe", "scratch", "--lr", "0.01"])
    assert (settings.lr, settings.batch_size, settings.loss, settings.bn_momentum) == (0.01, 8, "official", 0.1)
    assert (settings.optim, settings.num_epochs, settings.recipe) == ("adamw", 500, "scratch")
    assert {"lr", "batch_size", "lr_schedule", "loss", "bn_momentum", "recipe"} <= given and "optim" not in given
    block = [ln for ln in lines if ln.startswith("settings (recipe scratch): ")]
    assert len(block) == 1
    for part in ("batch_size 8 (recipe)", "lr 0.01 (flag)", "lr_schedule cosine (recipe)", "loss official (recipe)",
                 "bn_momentum 0.1 (recipe)"):
        assert part in block[0], part
    assert "optim" not in block[0]


def test_resume_keeps_the_saved_values_and_an_explicit_recipe_replaces_them():
    first, _, _ = _resolve(["--recipe", "scratch", "--batch_size", "4"])
    saved = {key: getattr(first, key) for key in DEFAULTS}
    again, given, lines = _resolve([], saved)  # -w last alone
    assert {k: getattr(again, k) for k in DEFAULTS} == saved and not given
    assert not [ln for ln in lines if "replaces" in ln]
    # An explicit --recipe on resume applies its values like flags (one line each); a flag still wins.
    other, given, lines = _resolve(["--recipe", "published", "--lr", "0.005"], saved)
    assert (other.lr, other.batch_size, other.lr_schedule, other.loss, other.recipe) == (
        0.005, 12, "plateau", None, "published")
    assert {"lr", "batch_size", "lr_schedule", "loss"} <= given
    replaced = [ln for ln in lines if "replaces" in ln]
    assert "--batch_size 12 (recipe published) replaces the resumed run's 4" in replaced
    assert "--lr 0.005 replaces the resumed run's 0.008" in replaced
    assert "--recipe published replaces the resumed run's scratch" in replaced


def test_lr_batch_scales_the_learning_rate_linearly():
    model = torch.nn.Linear(2, 2)
    settings, _, lines = _resolve(["--recipe", "official"])  # lr 0.08 for batch 64, batch 12 by default
    optimizer = build_optimizer(settings, model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.08 * 12 / 64)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["weight_decay"] == 4e-5
    assert "lr 0.08 is for batch 64: 0.015 at batch 12 (linear scaling, --lr_batch)" in lines
    logged: List[str] = []
    build_scheduler(settings, optimizer, 10, 0, logged.append)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.015 * 0.1)  # the warm-up starts at lr/10
    assert "from 0.0015 to 0.015" in logged[0]
    plain, _, _ = _resolve(["--lr", "0.08", "--batch_size", "4"])
    assert build_optimizer(plain, model.parameters()).param_groups[0]["lr"] == pytest.approx(0.08)


def _train(root: Path, yaml_path: Path, run: str, *extra: str) -> int:
    return train.main(train.parse_args(base_args(root, yaml_path, run) + list(extra)))


def test_published_recipe_trains_exactly_as_no_recipe(tmp_path):
    yaml_path = write_tiny_project(tmp_path, num_train=4)
    common = ["--batch_size", "2", "--max_steps", "2", *SHORT]
    assert _train(tmp_path, yaml_path, "none", *common) == 0
    assert _train(tmp_path, yaml_path, "pub", *common, "--recipe", "published") == 0
    strip = lambda d: {k: v for k, v in d.items() if k not in ("saved_path", "log_path", "recipe")}  # noqa: E731
    assert strip(latest_state(tmp_path, "none")["config"]) == strip(latest_state(tmp_path, "pub")["config"])
    plain, published = read_log(tmp_path, "none"), read_log(tmp_path, "pub")
    assert sorted(plain) == sorted(published) == [1, 2]
    for step in (1, 2):
        assert published[step]["loss"] == plain[step]["loss"] and published[step]["lr"] == plain[step]["lr"] == 1e-4


def test_resume_keeps_the_recipe_and_settings_yml_shows_what_ran(tmp_path, capsys):
    yaml_path = write_tiny_project(tmp_path, num_train=4)
    assert _train(tmp_path, yaml_path, "r", "--recipe", "scratch", "--batch_size", "2", "--max_steps", "1",
                  *SHORT) == 0
    out = capsys.readouterr().out
    assert "settings (recipe scratch): " in out and "batch_size 2 (flag)" in out and "lr 0.008 (recipe)" in out
    first = _settings_yml(tmp_path, "r")
    assert (first["batch_size"], first["lr"], first["loss"], first["lr_schedule"], first["bn_momentum"]) == (
        2, 8e-3, "official", "cosine", 0.1)
    assert set(first) == set(DEFAULTS) - {"recipe"}
    header = [ln for ln in (ckpt_dir(tmp_path, "r") / SETTINGS_FILE).read_text().splitlines() if ln.startswith("#")]
    assert header[0].startswith("# ") and "recipe: scratch" in header[0]
    from_flags = next(ln for ln in header if ln.startswith("# From the command line: ")).split(": ")[1].split()
    assert sorted(from_flags) == sorted(["input_size", "num_workers", "data_path", "log_path", "device", "batch_size",
                                         "max_steps", "save_interval", "val_interval"])
    from_recipe = next(ln for ln in header if ln.startswith("# From the recipe: ")).split(": ")[1].split()
    assert sorted(from_recipe) == ["bn_momentum", "clip_grad", "loss", "lr", "lr_schedule"]  # batch_size came from a flag
    assert not list(ckpt_dir(tmp_path, "r").glob(".*tmp*"))
    saved = latest_state(tmp_path, "r")["config"]
    assert saved["recipe"] == "scratch" and saved["lr"] == 8e-3 and saved["batch_size"] == 2

    # -w last alone: the first run's settings, nothing replaced (max_steps 1 reached: nothing to train).
    assert _train(tmp_path, yaml_path, "r", "-w", "last") == 0
    out = capsys.readouterr().out
    assert "replaces" not in out and "settings (recipe scratch): " in out and "nothing to train" in out
    assert _settings_yml(tmp_path, "r") == first
    # settings.yml is itself a recipe: it starts a run with the same settings.
    assert load_recipe(str(ckpt_dir(tmp_path, "r") / SETTINGS_FILE), DEFAULTS) == first
    # A new start in the folder that fails before its first save (a damaged image) leaves settings.yml
    # describing the checkpoints there, not the settings of the start that failed.
    (tmp_path / "datasets" / "tiny" / "train" / "0.jpg").write_bytes(b"not an image")
    assert _train(tmp_path, yaml_path, "r", "--recipe", "official", "--batch_size", "2", *SHORT) == 1
    assert "0.jpg" in capsys.readouterr().err
    assert _settings_yml(tmp_path, "r") == first


def test_lr_batch_applies_on_resume_with_another_batch_size(tmp_path):
    yaml_path = write_tiny_project(tmp_path, num_train=8)
    assert _train(tmp_path, yaml_path, "o", "--recipe", "official", "--batch_size", "2", "--max_steps", "1",
                  *SHORT) == 0
    assert read_log(tmp_path, "o")[1]["lr"] == pytest.approx(0.08 * 2 / 64 * 0.1)  # warm-up start: lr/10
    # Batch 4 on resume: lr 0.005; 2 steps per epoch, so a 2-step warm-up; step 2 is warm-up step 1 of 2.
    assert _train(tmp_path, yaml_path, "o", "-w", "last", "--batch_size", "4", "--max_steps", "2") == 0
    assert read_log(tmp_path, "o")[2]["lr"] == pytest.approx(0.08 * 4 / 64 * (0.1 + 0.9 * 1 / 2))


def _params(path: Path, names: List[str]) -> Dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {k: state[k] for k in names}


def test_head_only_epochs_freezes_then_thaws_at_its_step_across_a_resume(tmp_path, capsys):
    """4 images, batch 2: 2 steps per epoch, so backbone + BiFPN frozen for steps 1-2 and trained from step 3;
    a run stopped after step 1 and resumed takes the same steps as one never stopped."""
    yaml_path = write_tiny_project(tmp_path, num_train=4)
    init = tmp_path / "init.pth"
    model = EfficientDet(num_classes=2, compound_coef=0)
    torch.save(model.state_dict(), init)
    names = [n for n, _ in model.named_parameters()]
    body = [n for n in names if n.startswith(("backbone_net.", "bifpn."))]
    heads = [n for n in names if n.startswith(("regressor.", "classifier."))]
    assert body and heads
    common = ["--batch_size", "2", "--head_only_epochs", "1", "--lr", "1e-3", "--save_interval", "1",
              "--val_interval", "0", "-w", str(init)]
    assert _train(tmp_path, yaml_path, "ref", *common, "--max_steps", "3") == 0
    assert _train(tmp_path, yaml_path, "run", *common, "--max_steps", "1") == 0
    out = capsys.readouterr().out
    assert "--head_only_epochs 1: backbone and BiFPN (" in out and "frozen for steps 1-2" in out
    assert _train(tmp_path, yaml_path, "run", "-w", "last", "--max_steps", "3") == 0
    out = capsys.readouterr().out
    assert "frozen for steps 1-2" in out and "trainable from step 3" in out

    start = _params(init, names)
    for step in (1, 2, 3):
        saved = _params(ckpt_dir(tmp_path, "run") / f"efficientdet-d0_{(step - 1) // 2}_{step}.pth", names)
        assert any(not torch.equal(start[k], saved[k]) for k in heads), step
        unchanged = all(torch.equal(start[k], saved[k]) for k in body)
        assert unchanged == (step <= 2), step
    reference, resumed = read_log(tmp_path, "ref"), read_log(tmp_path, "run")
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5, abs=1e-6), step
    # A resume past the warm-up trains everything from its first step, with nothing to log.
    assert _train(tmp_path, yaml_path, "run", "-w", "last", "--max_steps", "4") == 0
    out = capsys.readouterr().out
    assert "frozen for" not in out and "trainable from" not in out and "head_only_epochs 1.0 (resumed)" in out


def test_head_only_warmup_sets_requires_grad_and_keeps_every_parameter_in_the_optimizer():
    model = EfficientDet(num_classes=2, compound_coef=0)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)  # built before any freezing: holds them all
    body = [p for n, p in model.named_parameters() if n.startswith(("backbone_net.", "bifpn."))]
    heads = [p for n, p in model.named_parameters() if not n.startswith(("backbone_net.", "bifpn."))]
    lines: List[str] = []
    net = torch.nn.Identity()
    for done, frozen in ((0, True), (1, True), (2, False), (5, False)):
        assert head_only_warmup(net, model, done, 4, 0.5, lines.append) is net
        assert all(p.requires_grad != frozen for p in body) and all(p.requires_grad for p in heads), done
    assert len(lines) == 2  # one line when frozen, one when thawed
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(body) + len(heads)
    for p in body:
        p.requires_grad_(False)  # --head_only froze them for good: epochs 0 touches nothing
    head_only_warmup(net, model, 10, 4, 0.0, lines.append)
    assert not any(p.requires_grad for p in body) and len(lines) == 2


def test_head_only_warmup_rebuilds_a_ddp_wrapper(tmp_path):
    """DistributedDataParallel fixes the parameters it reduces when built: a change builds it anew, and a
    step then runs (one process, gloo)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = torch.nn.Module()
        model.backbone_net, model.head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
        model.forward = lambda x: model.head(model.backbone_net(x))
        net = torch.nn.parallel.DistributedDataParallel(model)
        frozen_net = head_only_warmup(net, model, 0, 2, 1.0, lambda _: None)
        assert frozen_net is not net and frozen_net.module is model
        frozen_net(torch.ones(2, 3)).sum().backward()
        assert model.backbone_net.weight.grad is None and model.head.weight.grad is not None
        thawed = head_only_warmup(frozen_net, model, 2, 2, 1.0, lambda _: None)
        assert thawed is not frozen_net
        thawed(torch.ones(2, 3)).sum().backward()
        assert model.backbone_net.weight.grad is not None
    finally:
        dist.destroy_process_group()
