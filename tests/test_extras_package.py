"""The machinery of textual_inversion_extras/ is a package that a tool or a notebook can
use a piece at a time."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "textual_inversion_extras")

IMPORT_EACH_FIRST = """
import importlib, sys
import keras, tensorflow  # the slow imports, once
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.startswith("textual_inversion_extras")]:
        del sys.modules[loaded]
    try:
        importlib.import_module("textual_inversion_extras." + name)
    except ImportError as error:
        failed.append(f"{name}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_of_the_extras_imports_first_without_a_circular_import():
    modules = sorted(
        name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py"
    )
    assert "saving" in modules and "run_control" in modules
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *modules],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
