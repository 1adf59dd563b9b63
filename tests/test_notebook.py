"""notebooks/textual_inversion.ipynb: made from the story of textual_inversion.py by
tools/make_notebook.py, and run cell by cell by a real Jupyter kernel, as Colab runs it."""

import json
import math
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import textual_inversion as ti
from conftest import ROOT, RESOLUTION, import_tool

# What a runner sets in the settings cell (papermill's -p): a smoke run on this CPU.
SMOKE_SETTINGS = dict(RESOLUTION=RESOLUTION, RANDOM_WEIGHTS=True, MAX_TRAIN_STEPS=2, SAMPLE_STEPS=2)
# The kernel runs the cells' mechanics, not the arithmetic: on the small stand-ins for
# the text encoder, the VAE and the UNet (tests/stand_ins.py), as the tutorial-run tests do.
# The context is kept in a variable: a context left to the garbage collector would be
# closed, and the real models put back, as soon as the cell ends.
STAND_INS_CELL = """
from stand_ins import stand_in_models
models_replaced = stand_in_models()
models_replaced.__enter__()  # for the rest of the kernel's life"""
TRAINED_ON_STAND_INS_CELL = """
assert stable_diffusion.diffusion_model.name == "stand_in_unet", "trained on KerasCV's UNet"
"""


def test_the_committed_notebook_is_what_make_notebook_writes_from_the_script_now():
    make_notebook = import_tool("make_notebook")
    with open(make_notebook.SCRIPT, encoding="utf-8") as f:
        expected = make_notebook.notebook_text(f.read())
    with open(make_notebook.NOTEBOOK, encoding="utf-8") as f:
        assert f.read() == expected, "run python tools/make_notebook.py and commit the notebook"


def test_the_notebook_has_the_storys_prose_and_code_in_order_and_one_settings_cell():
    make_notebook = import_tool("make_notebook")
    notebook = json.loads(make_notebook.notebook_text(open(make_notebook.SCRIPT).read()))
    cells = notebook["cells"]
    sources = ["".join(cell["source"]) for cell in cells]
    settings = [i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(settings) == 1 and settings[0] < 6  # near the top
    for name in SMOKE_SETTINGS:
        assert re.search(rf"^{name} = ", sources[settings[0]], re.MULTILINE), name
    # The story's sections, in the script's order, each opening a markdown cell.
    headings = [s.split("\n")[0] for s, c in zip(sources, cells) if c["cell_type"] == "markdown"]
    story_headings = re.findall(r'^"""\n(## .+)$', open(ti.__file__).read(), re.MULTILINE)
    story_headings = story_headings[: story_headings.index("## Extras: your own concept")]
    assert [h for h in headings if h in story_headings] == story_headings
    # Every function of the story is defined in a code cell, once.
    code = "\n".join(s for s, c in zip(sources, cells) if c["cell_type"] == "code")
    for name in ("extend_text_encoder", "placeholder_gradient", "run_tutorial"):
        assert len(re.findall(rf"^def {name}\(", code, re.MULTILINE)) == 1, name
    assert "def build_parser(" not in code and "class CommandLineRun" not in code


def executed_notebook(tmp_path, monkeypatch):
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "textual_inversion.ipynb"), 4)
    # As papermill does: the settings go in a cell right after the one tagged parameters.
    settings = next(
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    injected = "\n".join(f"{name} = {value!r}" for name, value in SMOKE_SETTINGS.items())
    notebook.cells.insert(settings + 1, nbformat.v4.new_code_cell(injected + STAND_INS_CELL))
    run = next(i for i, cell in enumerate(notebook.cells) if "run_tutorial(NotebookRun())" in cell.source)
    notebook.cells.insert(run + 1, nbformat.v4.new_code_cell(TRAINED_ON_STAND_INS_CELL))
    # The kernel works in a folder of its own (its outputs/ go there) and imports the
    # script from the repository, as Colab does after the install cell's %cd.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    client = NotebookClient(
        notebook, timeout=1200, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )  # fmt: skip
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"a cell failed: {str(error)[-3000:]}")
    return notebook


def test_the_notebook_runs_in_a_jupyter_kernel_trains_and_shows_its_samples_inline(
    tmp_path, monkeypatch
):
    notebook = executed_notebook(tmp_path, monkeypatch)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)  # every cell ran...
    errors = [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    assert not errors  # ...without an error

    def text(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    def images(cell):
        return sum("image/png" in o.get("data", {}) for o in cell.outputs)

    run_cell = next(cell for cell in code_cells if "run_tutorial(NotebookRun())" in cell.source)
    trained = re.search(r"Trained (\d+) steps; the loss of the last epoch: (\S+)", text(run_cell))
    assert trained, text(run_cell)[-2000:]
    assert int(trained.group(1)) == SMOKE_SETTINGS["MAX_TRAIN_STEPS"]
    assert math.isfinite(float(trained.group(2)))
    # Inline: the sample prompts before and after training, then the closing prompts...
    assert images(run_cell) == 2 * len(ti.SAMPLE_PROMPTS) + len(ti.FINAL_PROMPTS)
    # ...and what the last cell drew with the learned token.
    assert images(code_cells[-1]) == 1
    assert os.path.isdir(tmp_path / "outputs" / "final")


def test_the_notebooks_install_cell_runs_the_readmes_colab_install_commands():
    make_notebook = import_tool("make_notebook")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    colab_section = readme[readme.index("## In Colab") :]
    block = colab_section[colab_section.index("```python\n") + 10 :]
    readme_commands = [line for line in block[: block.index("```")].splitlines() if line.startswith("!")]
    install_cell = make_notebook.INSTALL_CELL.splitlines()
    notebook_commands = [line.strip() for line in install_cell if line.strip().startswith("!")]
    assert len(readme_commands) == 3
    assert notebook_commands[:3] == readme_commands


def test_the_story_is_as_long_as_the_readme_says():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    claimed = int(re.search(r"its first (\d+) lines are the tutorial", readme).group(1))
    story_end = open(ti.__file__).read().split("# Beyond the tutorial")[0].count("\n")
    assert claimed - 10 < story_end <= claimed
