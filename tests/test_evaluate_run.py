"""tools/evaluate.py --run: every snapshot of a run scored with the paper's two CLIP
scores, a table and a plot of them, and a step named by the stated rule. On KerasHub's
CLIP with random weights and the stand-ins (tests/stand_ins.py), at 128 px, the scores
mean nothing: these tests check that each row is the score of its snapshot, and the
rule."""

import csv
import json
import os
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import RESOLUTION, ROOT, import_tool

evaluate = import_tool("evaluate")

TOKEN = "<my-eval-token>"
STEPS = (50, 100, 150)
SMALL = [
    "--random-weights", "--resolution", str(RESOLUTION), "--num-images", "1",
    "--sample-steps", "2", "--prompt", "a photo of a {}", "--precision", "float32",
]  # fmt: skip


def write_snapshots(run_dir, steps=STEPS, token=TOKEN, num_vectors=1):
    """Snapshots as a run writes them, the later steps first (a folder lists its files
    in no particular order); each a different random vector."""
    for step in sorted(steps, reverse=True):
        path, _ = saving.snapshot_paths(str(run_dir), step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = np.random.default_rng(step)
        vectors = rng.normal(scale=0.3, size=(num_vectors, 768)).astype("float32")
        saving.save_embedding(path, token, vectors, {"step": step})


def run_evaluate(*arguments):
    """tools/evaluate.py from its command line, in a process of its own, with the small
    stand-ins for the VAE and the UNet (tests/stand_ins.py): these tests check how a run
    is scored, not what the models draw. Its CLIP models leave this process as small as
    it was."""
    tool = os.path.join(ROOT, "tools", "evaluate.py")
    stand_ins = os.path.join(ROOT, "tests", "stand_ins.py")
    command = [sys.executable, stand_ins, tool, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, image_folder):
    """A run folder with three snapshots, scored with --run; then the last snapshot
    scored alone with --embedding, in a process and a model built for it alone. The
    rows are read back from scores.csv and eval.json, which keep every digit."""
    run_dir = tmp_path_factory.mktemp("run")
    write_snapshots(run_dir)
    printed = run_evaluate("--run", run_dir, "--images", image_folder, *SMALL)
    with open(run_dir / "scores.csv") as f:
        rows = [
            dict(step=int(r["step"]), image_similarity=float(r["image_similarity"]),
                 text_similarity=float(r["text_similarity"]))
            for r in csv.DictReader(f)
        ]  # fmt: skip
    best_step = int(re.search(r"^Recommended: step (\d+) ", printed, re.M).group(1))
    last, _ = saving.snapshot_paths(str(run_dir), STEPS[-1])
    alone_dir = tmp_path_factory.mktemp("alone")
    run_evaluate("--embedding", last, "--images", image_folder, *SMALL, "--output-dir", alone_dir)
    with open(alone_dir / "eval.json") as f:
        alone = json.load(f)
    return run_dir, rows, best_step, alone


def test_the_run_writes_a_table_with_a_row_per_snapshot_in_step_order(scored_run):
    _, rows, _, _ = scored_run
    assert [row["step"] for row in rows] == list(STEPS)
    for row in rows:  # cosine similarities
        assert -1 <= row["image_similarity"] <= 1 and -1 <= row["text_similarity"] <= 1


def test_the_run_writes_a_plot_of_the_scores(scored_run):
    run_dir, _, _, _ = scored_run
    with open(run_dir / "scores.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width = plt.imread(run_dir / "scores.png").shape[:2]
    assert height > 100 and width > 100


def test_the_run_keeps_each_snapshots_images_to_look_at(scored_run):
    run_dir, _, _, _ = scored_run
    for step in STEPS:
        folder = run_dir / "scores" / f"step-{step:06d}"
        (name,) = os.listdir(folder)  # one prompt
        assert plt.imread(folder / name).shape[:2] == (RESOLUTION, RESOLUTION)  # one image


def test_each_row_is_the_score_the_snapshot_gets_alone(scored_run):
    """The last snapshot, scored in the model built with the first's vectors and then
    given each one's in turn, scores as in a model built for it alone: the same images,
    bit for bit (in float32; in mixed_bfloat16 a process's first build rounds
    differently, by 1e-4). Both builds are seeded: with --random-weights, the same
    weights."""
    _, rows, _, alone = scored_run
    assert rows[-1]["image_similarity"] == alone["image_similarity"]
    assert rows[-1]["text_similarity"] == alone["text_similarity"]
    # The snapshots' vectors differ, and so do their scores: the rows were not one model's.
    assert len({row["image_similarity"] for row in rows}) == len(STEPS)


def test_the_run_recommends_the_step_the_rule_gives_for_its_table(scored_run):
    _, rows, best_step, _ = scored_run
    assert best_step == evaluate.recommended_step(rows)


def row(step, image, text):
    return dict(step=step, image_similarity=image, text_similarity=text)


def test_the_recommended_step_has_the_highest_sum_of_the_two_scaled_scores():
    rows = [row(10, 0.50, 0.30), row(20, 0.70, 0.28), row(30, 0.80, 0.20)]
    # Scaled: image 0, 2/3, 1; text 1, 0.8, 0: sums 1, 1.47, 1. Unscaled, the sums
    # would be 0.80, 0.98, 1.00, and step 30 would win.
    assert evaluate.recommended_step(rows) == 20


def test_a_score_that_does_not_change_counts_zero_for_every_step():
    # The image score is constant: the text score alone decides.
    assert evaluate.recommended_step([row(1, 0.5, 0.2), row(2, 0.5, 0.3)]) == 2


def test_a_tie_recommends_the_earliest_step():
    # Scaled: image 0, 1; text 1, 0: both sum to 1.
    assert evaluate.recommended_step([row(10, 0.5, 0.3), row(20, 0.7, 0.1)]) == 10


def test_a_single_snapshot_is_recommended():
    assert evaluate.recommended_step([row(7, 0.5, 0.3)]) == 7


def test_only_the_step_files_of_the_snapshots_folder_count_in_step_order(tmp_path):
    steps = (3, 1000, 20, 5, 10)
    write_snapshots(tmp_path, steps=steps)
    states = tmp_path / saving.SNAPSHOTS_DIR / "states"
    states.mkdir()
    (states / "step-000007.safetensors").write_bytes(b"a training state")
    (tmp_path / saving.SNAPSHOTS_DIR / "step-000008.safetensors.partial").write_bytes(b"")
    snapshots = evaluate.run_snapshots(str(tmp_path))
    assert [step for step, _, _ in snapshots] == sorted(steps)


def test_a_folder_without_snapshots_is_refused_by_name(tmp_path, image_folder):
    with pytest.raises(ti.UserError) as refusal:
        evaluate.evaluate(evaluate.parse_args(["--run", str(tmp_path), "--images", image_folder]))
    message = str(refusal.value)
    assert f"{tmp_path} has no snapshots" in message and "\n" not in message


def test_snapshots_of_two_tokens_in_one_folder_are_refused(tmp_path):
    write_snapshots(tmp_path, steps=(1,))
    write_snapshots(tmp_path, steps=(2,), token="<another-token>")
    with pytest.raises(ti.UserError, match="a run's snapshots are of one token"):
        evaluate.run_snapshots(str(tmp_path))


def test_snapshots_of_two_vector_counts_in_one_folder_are_refused(tmp_path):
    write_snapshots(tmp_path, steps=(1,))
    write_snapshots(tmp_path, steps=(2,), num_vectors=2)
    with pytest.raises(ti.UserError, match=r"\(2 vectors\).*a run's snapshots are of one token"):
        evaluate.run_snapshots(str(tmp_path))
