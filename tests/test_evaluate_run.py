"""tools/evaluate.py --run: every snapshot of a run scored with the paper's two CLIP
scores, a table and a plot of them, and a step named by the stated rule. On KerasCV's
and KerasHub's classes with random weights at 128 px, the scores mean nothing: these
tests check that each row is the score of its snapshot, and the rule."""

import csv
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import RESOLUTION, import_tool

evaluate = import_tool("evaluate")

TOKEN = "<my-eval-token>"
STEPS = (5, 10)
SMALL = [
    "--random-weights", "--resolution", str(RESOLUTION), "--num-images", "1",
    "--sample-steps", "1", "--prompt", "a photo of a {}", "--precision", "float32",
]  # fmt: skip


def write_snapshots(run_dir, steps=STEPS, token=TOKEN):
    rng = np.random.default_rng(0)
    for step in steps:
        path, _ = saving.snapshot_paths(str(run_dir), step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        vectors = rng.normal(scale=0.3, size=(1, 768)).astype("float32")
        saving.save_embedding(path, token, vectors, {"step": step})


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, image_folder):
    """A run folder with two snapshots, scored with --run; then the second snapshot
    scored alone with --embedding, in a model built for it alone."""
    run_dir = tmp_path_factory.mktemp("run")
    write_snapshots(run_dir)
    rows, best_step = evaluate.evaluate(
        evaluate.parse_args(["--run", str(run_dir), "--images", image_folder, *SMALL])
    )
    second, _ = saving.snapshot_paths(str(run_dir), STEPS[1])
    alone = evaluate.evaluate(
        evaluate.parse_args(
            ["--embedding", second, "--images", image_folder, *SMALL,
             "--output-dir", str(tmp_path_factory.mktemp("alone"))]
        )  # fmt: skip
    )
    return run_dir, rows, best_step, alone


def test_the_run_writes_a_row_per_snapshot_in_step_order_and_the_plot(scored_run):
    run_dir, rows, best_step, _ = scored_run
    with open(run_dir / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(row["step"]) for row in table] == list(STEPS)
    for row, returned in zip(table, rows):
        assert float(row["image_similarity"]) == pytest.approx(returned["image_similarity"])
    assert plt.imread(run_dir / "scores.png").shape[1] > 0
    assert best_step in STEPS
    for step in STEPS:  # each snapshot's pictures, to look at
        assert os.listdir(run_dir / "scores" / f"step-{step:06d}")


def test_each_row_is_the_score_the_snapshot_gets_alone(scored_run):
    """The second snapshot, scored in the model built with the first's vectors and then
    given its own, scores as in a model built for it alone: the same images, bit for bit
    (in float32; in mixed_bfloat16 a process's first build rounds differently, by 1e-4)."""
    _, rows, _, alone = scored_run
    assert rows[1]["image_similarity"] == alone["image_similarity"]
    assert rows[1]["text_similarity"] == alone["text_similarity"]
    # The snapshots' vectors differ, and so do their scores: the rows were not one model's.
    assert rows[0]["image_similarity"] != rows[1]["image_similarity"]


def row(step, image, text):
    return dict(step=step, image_similarity=image, text_similarity=text)


def test_the_recommended_step_has_the_highest_sum_of_the_two_scaled_scores():
    rows = [row(10, 0.50, 0.30), row(20, 0.70, 0.28), row(30, 0.80, 0.20)]
    # Scaled: image 0, 2/3, 1; text 1, 0.8, 0: sums 1, 1.47, 1.
    assert evaluate.recommended_step(rows) == 20


def test_a_tie_recommends_the_earliest_step_and_one_snapshot_itself():
    assert evaluate.recommended_step([row(10, 0.5, 0.3), row(20, 0.7, 0.1)]) == 10
    assert evaluate.recommended_step([row(7, 0.5, 0.3)]) == 7
    assert evaluate.recommended_step([row(1, 0.5, 0.3), row(2, 0.5, 0.2)]) == 1


def test_a_folder_without_snapshots_is_refused_by_name(tmp_path, image_folder):
    with pytest.raises(ti.UserError) as refusal:
        evaluate.evaluate(evaluate.parse_args(["--run", str(tmp_path), "--images", image_folder]))
    message = str(refusal.value)
    assert f"{tmp_path} has no snapshots" in message and "\n" not in message


def test_snapshots_of_two_tokens_in_one_folder_are_refused(tmp_path, image_folder):
    write_snapshots(tmp_path, steps=(1,))
    write_snapshots(tmp_path, steps=(2,), token="<another-token>")
    with pytest.raises(ti.UserError, match="a run's snapshots are of one token"):
        evaluate.run_snapshots(str(tmp_path))
