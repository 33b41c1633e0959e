"""trackcodecs is pure: no I/O, no asyncio, no logging, no clock reads (time is an argument)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "codecs" / "trackcodecs"
ALLOWED_MODULES = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "operator",
    "struct",
    "typing",
    "msgspec",
    "crcmod",
}
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"}


def _modules() -> list[Path]:
    paths = sorted(PACKAGE.glob("*.py"))
    assert len(paths) >= 5
    return paths


def test_imports_only_pure_modules() -> None:
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import inside the package
                    continue
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= ALLOWED_MODULES, f"{path.name} imports {sorted(roots - ALLOWED_MODULES)}"


def test_no_clock_reads() -> None:
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in CLOCK_CALLS, f"{path.name}:{node.lineno} reads a clock"


def test_no_io_module_is_loaded_by_the_package() -> None:
    """Importing trackcodecs in a fresh interpreter pulls in no asyncio, socket or logging."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, 'codecs'); import trackcodecs, trackcodecs.oneshot; "
        "bad = {'asyncio', 'socket', 'logging', 'selectors', 'ssl', 'threading'} & set(sys.modules); "
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
