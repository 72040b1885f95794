"""The house rules that keep the layout readable (DEVELOPING.md): imports point one way, scripts stay thin."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Set

from tests.conftest import REPO

SCRIPTS = ("train.py", "coco_eval.py", "efficientdet_test.py", "efficientdet_test_videos.py", "export.py",
           "convert_official.py")
SCRIPT_FOLDERS = ("benchmark", "tools")


def imported_modules(path: Path) -> Set[str]:
    """Top-level names of every module ``path`` imports (absolute imports)."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def library_files() -> List[Path]:
    files = [REPO / "backbone.py"]
    for package in ("efficientnet", "efficientdet", "utils"):
        files += sorted((REPO / package).rglob("*.py"))
    return files


def test_lower_layers_do_not_import_upper_ones():
    """efficientnet/ imports neither efficientdet/ nor utils/; efficientdet/ and backbone.py not utils/."""
    for path in library_files():
        imports = imported_modules(path)
        layer = path.relative_to(REPO).parts[0]
        forbidden = {"efficientnet": ("utils", "efficientdet", "backbone"), "efficientdet": ("utils", "backbone"),
                     "backbone.py": ("utils",)}.get(layer, ())
        bad = [m for m in imports if m.split(".")[0] in forbidden]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_nothing_in_the_library_imports_a_script():
    scripts = {Path(s).stem for s in SCRIPTS} | set(SCRIPT_FOLDERS)
    for path in library_files():
        bad = [m for m in imported_modules(path) if m.split(".")[0] in scripts]
        assert not bad, f"{path.relative_to(REPO)} imports the script(s) {bad}"


def test_scripts_are_thin_and_files_small():
    scripts = [REPO / s for s in SCRIPTS] + [p for f in SCRIPT_FOLDERS for p in (REPO / f).glob("*.py")
                                             if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")]
    assert len(scripts) >= len(SCRIPTS) + 5
    for path in scripts:
        assert len(path.read_text(encoding="utf-8").splitlines()) < 150, f"{path.name}: a script over 150 lines"
    for path in library_files() + scripts:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.stat().st_size:  # an empty __init__.py has no lines to count
            assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, path
        long = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and n.end_lineno - n.lineno + 1 > 60]
        assert not long, f"{path.relative_to(REPO)}: functions over 60 lines: {long}"


TEXT_SUFFIXES = (".py", ".md", ".yml", ".yaml", ".txt")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "datasets", "weights", "logs", "runs"}
_BASE = "SP" + "EC"  # the needles are built from parts so that this file does not match itself
CITATIONS = (_BASE + " \u00a7", _BASE + " trap", _BASE + ".md")


def project_text_files() -> List[Path]:
    """The repository's text files: tracked and not-ignored new ones per git, else a walk of the tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        paths = [REPO / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (an unpacked archive)
        paths = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            paths += [Path(root) / name for name in names]
    return sorted(p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file())


def citations(paths: List[Path]) -> List[str]:
    """``path:line: text`` of every line citing a document a clone of the repository does not have."""
    return [f"{p.relative_to(REPO) if REPO in p.parents else p.name}:{n}: {line.strip()[:80]}" for p in paths
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if any(needle in line for needle in CITATIONS)]


def test_citation_check_finds_each_form(tmp_path):
    cited = tmp_path / "cited.py"
    cited.write_text("".join(f"x = 1  # as in {needle} 7\n" for needle in CITATIONS) + "y = 2  # the paper\n",
                     encoding="utf-8")
    assert [c.split(":")[1] for c in citations([cited])] == ["1", "2", "3"]


def test_text_files_without_git_skip_the_environment(monkeypatch):
    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    files = project_text_files()
    names = {p.relative_to(REPO).as_posix() for p in files}
    assert {"DEVELOPING.md", "tests/test_layout.py", "projects/coco.yml"} <= names
    assert not [n for n in names if n.split("/")[0] in SKIP_DIRS]


def test_no_citation_of_documents_outside_the_repository():
    """Docs state the facts they rely on (DEVELOPING.md, Faithfulness), never cite a document a clone lacks."""
    files = project_text_files()
    assert any(p.name == "DEVELOPING.md" for p in files) and len(files) > 50
    found = citations(files)
    assert not found, "citations of a document outside the repository:\n" + "\n".join(found)


def test_data_modules_import_one_way():
    """image_files <- dataset <- loaders (and transforms <- augment <- dataset): no import statement of a module
    above, anywhere in the file; ``efficientdet.dataset`` offers the loader names on first use only."""
    above = {"image_files": {"efficientdet.dataset", "efficientdet.loaders", "efficientdet.augment"},
             "transforms": {"efficientdet.augment", "efficientdet.dataset", "efficientdet.loaders"},
             "augment": {"efficientdet.dataset", "efficientdet.loaders"}, "dataset": {"efficientdet.loaders"}}
    for name, forbidden in above.items():
        imports = imported_modules(REPO / "efficientdet" / f"{name}.py")
        assert not imports & forbidden, f"efficientdet/{name}.py imports {sorted(imports & forbidden)}"
    code = ("import sys, efficientdet.dataset as d; assert 'efficientdet.loaders' not in sys.modules; "
            "from efficientdet.dataset import CocoDataset, create_dataloaders, collater, DataBundle; "
            "import efficientdet.loaders as l; assert create_dataloaders is l.create_dataloaders")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
