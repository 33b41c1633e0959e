"""The source layout: codecs/ is a source root, never a package, and the parts import in one direction."""

from __future__ import annotations

import ast
import importlib
import sysconfig
from pathlib import Path

from conftest import ROOT


def test_codecs_folder_is_not_a_package() -> None:
    assert (ROOT / "codecs" / "trackcodecs" / "__init__.py").is_file()
    assert not (ROOT / "codecs" / "__init__.py").exists(), "codecs/ must stay a source root"


def test_import_codecs_is_the_standard_library() -> None:
    import codecs

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    origin = getattr(codecs, "__file__", None)
    assert origin is None or Path(origin).resolve().is_relative_to(stdlib), origin
    assert codecs.lookup("utf-8").name == "utf-8"
    assert hasattr(codecs, "BOM_UTF8")


def test_trackcodecs_is_importable_from_the_source_root() -> None:
    module = importlib.import_module("trackcodecs")
    assert Path(module.__file__ or "").resolve().parent == ROOT / "codecs" / "trackcodecs"


_ALLOWED_IMPORTS = {
    "trackcodecs": set(),
    "gateway": {"trackcodecs"},
    "relay": {"trackcodecs", "gateway"},
    "fleetgate": {"trackcodecs", "gateway", "relay"},
}


def _first_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in _ALLOWED_IMPORTS)
    return found


def test_imports_point_one_way() -> None:
    for part, allowed in _ALLOWED_IMPORTS.items():
        base = ROOT / "codecs" / part if part == "trackcodecs" else ROOT / part
        for path in base.rglob("*.py"):
            extra = _first_party_imports(path) - allowed - {part}
            assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"
