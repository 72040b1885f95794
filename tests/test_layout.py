"""The house rules that keep the layout readable (DEVELOPING.md): imports point one way, scripts stay thin."""
from __future__ import annotations

import ast
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
