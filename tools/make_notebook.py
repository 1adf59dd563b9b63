"""Writes notebooks/textual_inversion.ipynb from the story of textual_inversion.py.

    python tools/make_notebook.py            # rewrite the notebook
    python tools/make_notebook.py --check    # exit 1 if the committed one is out of date

The script follows keras.io's format, so the notebook is made the way keras.io makes
its own: every top-level string of the story (its `\"\"\"## Section\"\"\"` blocks) becomes a
markdown cell and the code between two of them a code cell, in order, up to "# Beyond
the tutorial". The story's hyperparameters cell becomes the notebook's settings cell,
tagged `parameters` (papermill's convention), with two settings of the notebook's own.
Before the story comes an install cell for Colab; after it, cells that run the
tutorial and draw with the learned token.

A converter of 100 lines, written here rather than taken from keras-io's tutobooks
(not a package on PyPI) or jupytext (whose "percent" format the script does not use):
it needs only the standard library, and its output is exactly what a test compares.
"""

import argparse
import ast
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "textual_inversion.py")
NOTEBOOK = os.path.join(ROOT, "notebooks", "textual_inversion.ipynb")
STORY_END = "# Beyond the tutorial"
SETTINGS_SECTION = "## Hyperparameters"

INSTALL_CELL = """\
# In Colab: add what Colab lacks (the README's cell) and fetch this repository, whose
# script and textual_inversion_extras/ the cells below import. Elsewhere, start Jupyter
# in the repository with requirements.txt installed, and this cell does nothing.
import os
import sys

REPOSITORY_URL = ""  # where this repository lives, e.g. https://github.com/you/textual-inversion

if "google.colab" in sys.modules and not os.path.exists("textual_inversion.py"):
    if not REPOSITORY_URL:
        raise SystemExit("Set REPOSITORY_URL in this cell to this repository's git URL, then run it again.")
    !pip freeze | grep -iE '^(tensorflow|keras|protobuf|numpy|ml.dtypes)==' > /tmp/keep.txt
    !if grep -q '^protobuf==[345]\\.' /tmp/keep.txt; then echo 'tensorflow-metadata<1.18' >> /tmp/keep.txt; fi
    !pip install -q -c /tmp/keep.txt keras-cv==0.9.0 safetensors
    !git clone -q {REPOSITORY_URL} textual-inversion
    %cd textual-inversion
"""

NOTEBOOK_SETTINGS = """
# The notebook's own settings (the command line has them as flags):
RANDOM_WEIGHTS = False  # True: KerasCV's real models with random weights, synthetic
# photos, nothing downloaded: a smoke run, which learns nothing
MAX_TRAIN_STEPS = None  # None: the tutorial's EPOCHS; a number stops after that many steps
"""

RUN_CELLS = [
    (
        "markdown",
        """\
## Running the tutorial

The steps above, with the settings cell's choices: `run_tutorial` builds the models,
draws the sample prompts before training, trains, draws them again after each
`SAMPLE_EVERY` epochs, and draws the tutorial's closing prompts. With the tutorial's
settings that is about an hour on a Colab GPU, and the images appear below as they are
drawn. `RANDOM_WEIGHTS = True` builds the same classes without downloading weights and
uses synthetic pictures for the photos: the cells run, nothing is learned.""",
    ),
    (
        "code",
        """\
from textual_inversion import build_models, synthetic_image_file  # the script, beyond the tutorial


class NotebookRun(TutorialRun):
    \"\"\"The tutorial's run, with the settings cell's RANDOM_WEIGHTS and MAX_TRAIN_STEPS.\"\"\"

    resolution, sample_steps, max_train_steps = RESOLUTION, SAMPLE_STEPS, MAX_TRAIN_STEPS

    def text_image_pairs(self, tokenizer):
        if not RANDOM_WEIGHTS:
            return super().text_image_pairs(tokenizer)
        return [
            assemble_dataset(
                [synthetic_image_file(url) for url in urls], prompts, tokenizer,
                self.placeholder_token, self.resolution,
            )
            for urls, prompts in [(self.images, self.prompts), (self.group_images, self.group_prompts)]
        ]

    def build_stable_diffusion(self, tokenizer):
        if not RANDOM_WEIGHTS:
            return super().build_stable_diffusion(tokenizer)
        return build_models(self.resolution, tokenizer, random_weights=True, jit_compile=False)


stable_diffusion, trainer = run_tutorial(NotebookRun())
losses = trainer.history.history["loss"]
print(f"Trained {int(trainer.step.numpy())} steps; the loss of the last epoch: {losses[-1]:.4f}")""",
    ),
    (
        "markdown",
        """\
## Drawing with the learned token

The token is now a word like any other: write it into any prompt.""",
    ),
    (
        "code",
        """\
prompt = f"Gandalf the Gray as a {PLACEHOLDER_TOKEN}"
images = stable_diffusion.text_to_image(prompt, batch_size=3, num_steps=SAMPLE_STEPS, seed=SEED)
plot_images(images, title=prompt)""",
    ),
]


def story_cells(source):
    """(kind, text) for each markdown and code cell of the story, in order."""
    lines = source.splitlines()
    cells, code_start = [], 0

    def add_code(end):
        code = "\n".join(lines[code_start:end]).strip("\n")
        if code.strip():
            cells.append(("code", code))

    for node in ast.parse(source).body:
        is_prose = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if not (is_prose and isinstance(node.value.value, str)):
            continue
        text = node.value.value.strip()
        if text.startswith(STORY_END):
            add_code(node.lineno - 1)
            return cells
        add_code(node.lineno - 1)
        cells.append(("markdown", header_markdown(text) if not cells else text))
        code_start = node.end_lineno
    raise SystemExit(f'{SCRIPT} has no "{STORY_END}" block, where the story ends.')


def header_markdown(docstring):
    """keras.io's header (Title:, Authors:, ...) as a title and a line per field."""
    header, _, rest = docstring.partition("\n\n")
    fields = [line.split(":", 1) for line in header.replace("\n    ", " ").splitlines()]
    title = [value.strip() for key, value in fields if key == "Title"][0]
    details = "<br>\n".join(f"**{key}:** {value.strip()}" for key, value in fields if key != "Title")
    return f"# {title}\n\n{details}\n\n{rest}"


def notebook_cell(kind, text, index, tags=()):
    cell = {"cell_type": kind, "id": f"cell-{index:02d}", "metadata": {}, "source": []}
    cell["source"] = text.splitlines(keepends=True)
    if tags:
        cell["metadata"]["tags"] = list(tags)
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def make_notebook(source):
    cells = story_cells(source)
    settings = [i for i, (kind, text) in enumerate(cells) if text.startswith(SETTINGS_SECTION)]
    if not settings or cells[settings[0] + 1][0] != "code":
        raise SystemExit(f'{SCRIPT} has no "{SETTINGS_SECTION}" block followed by code.')
    settings_cell = settings[0] + 1
    cells[settings_cell] = ("code", cells[settings_cell][1] + "\n" + NOTEBOOK_SETTINGS)
    cells = cells[:1] + [("code", INSTALL_CELL.rstrip("\n"))] + cells[1:] + RUN_CELLS
    settings_cell += 1
    return {
        "cells": [
            notebook_cell(kind, text, i, ["parameters"] if i == settings_cell else ())
            for i, (kind, text) in enumerate(cells)
        ],
        "metadata": {
            "accelerator": "GPU",
            "colab": {"provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_text(source):
    return json.dumps(make_notebook(source), indent=1, ensure_ascii=False) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 if the notebook differs from what the script makes now",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with open(SCRIPT, encoding="utf-8") as f:
        text = notebook_text(f.read())
    if args.check:
        with open(NOTEBOOK, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{NOTEBOOK} is out of date: run python tools/make_notebook.py.")
                return 1
        return 0
    os.makedirs(os.path.dirname(NOTEBOOK), exist_ok=True)
    with open(NOTEBOOK, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"Wrote {NOTEBOOK}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
