"""Watching training: the progress bar, the montage, the nearest words and the sample
images."""

import json
import os

import keras
import numpy as np
import matplotlib.pyplot as plt

import textual_inversion as ti
from textual_inversion_extras import watching
from conftest import RESOLUTION
from stand_ins import stand_in_models

PROMPTS = [p.format("<my-funny-cat-token>") for p in ti.SAMPLE_PROMPTS]
TILE = 32


def write_samples(samples_dir, epoch, prompts, value):
    """A fake sample file: 3 tiles side by side, the first filled with `value`."""
    for row, prompt in enumerate(prompts):
        tiles = np.zeros((TILE, 3 * TILE, 3), dtype="float32")
        tiles[:, :TILE] = value + 0.1 * row
        plt.imsave(samples_dir / f"epoch-{epoch:03d}_{ti.slugify(prompt)}.png", tiles)


def test_montage_has_a_row_per_prompt_and_a_column_per_epoch_and_is_rebuilt(tmp_path):
    label = watching.MONTAGE_LABEL_HEIGHT
    write_samples(tmp_path, 0, PROMPTS[:1], 0.2)  # before training: the first prompt only
    write_samples(tmp_path, 1, PROMPTS, 0.4)
    write_samples(tmp_path, 11, PROMPTS, 0.6)
    path = watching.build_progress_montage(str(tmp_path), PROMPTS)
    montage = plt.imread(path)
    assert montage.shape[:2] == (label + 3 * (label + TILE), 3 * TILE)

    # The cell of row 2 (third prompt), epoch 11 (third column) is that file's first tile.
    top, left = label + 2 * (label + TILE) + label, 2 * TILE
    np.testing.assert_allclose(montage[top : top + TILE, left : left + TILE, 0], 0.8, atol=0.01)
    # Row 1 has no before-training sample: its first cell stays blank (white).
    top = label + 1 * (label + TILE) + label
    np.testing.assert_allclose(montage[top : top + TILE, :TILE, :3], 1.0)

    # A resumed run adds epoch 21: the montage is drawn anew from all the files.
    write_samples(tmp_path, 21, PROMPTS, 0.1)
    montage = plt.imread(watching.build_progress_montage(str(tmp_path), PROMPTS))
    assert montage.shape[:2] == (label + 3 * (label + TILE), 4 * TILE)


def test_before_training_the_nearest_word_is_the_initializer(concept, tmp_path):
    stable_diffusion = concept["stable_diffusion"]
    placeholder_token_id = concept["placeholder_token_id"]
    layer = ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding
    matrix = layer.get_weights()[0]
    saved_row = matrix[placeholder_token_id].copy()
    matrix[placeholder_token_id] = matrix[concept["initializer_token_id"]]
    layer.set_weights([matrix])
    try:
        path = tmp_path / "learned_words.json"
        report = watching.report_nearest_words(
            concept["tokenizer"], matrix, [placeholder_token_id], str(path)
        )
    finally:
        matrix[placeholder_token_id] = saved_row
        layer.set_weights([matrix])

    (entry,) = report
    assert entry["token"] == "<my-funny-cat-token>"
    assert entry["nearest"][0]["word"] == "cat"
    assert abs(entry["nearest"][0]["cosine"] - 1.0) < 1e-6
    assert len(entry["nearest"]) == 5
    assert all(n["word"] != "<my-funny-cat-token>" for n in entry["nearest"])
    np.testing.assert_allclose(
        entry["norm"], np.linalg.norm(matrix[concept["initializer_token_id"]]), rtol=1e-6
    )
    assert entry["vocabulary_median_norm"] > 0
    assert json.loads(path.read_text()) == report


# --- The progress bar -------------------------------------------------------------------


class FakeTrainer:
    """What StepProgressBar reads of the trainer: its step count."""

    def __init__(self, step):
        self.step = keras.Variable(step, dtype="int64", trainable=False)


def bar_output(capsys, steps_per_epoch, total_steps, first_step, steps_taken):
    trainer = FakeTrainer(first_step)
    bar = watching.StepProgressBar(steps_per_epoch, total_steps)
    bar.set_model(trainer)
    bar.on_train_begin()
    bar.on_epoch_begin(first_step // steps_per_epoch)
    for batch in range(steps_taken):
        trainer.step.assign(first_step + batch + 1)
        bar.on_train_batch_end(batch, {"loss": 0.5})
    return capsys.readouterr().out


def test_the_progress_bar_of_a_4_step_run_ends_at_4(capsys):
    output = bar_output(capsys, steps_per_epoch=250, total_steps=4, first_step=0, steps_taken=4)
    assert "4/4" in output
    assert "250" not in output
    assert "1 of 1 in this run" in output


def test_the_progress_bar_of_a_resumed_run_counts_the_steps_left(capsys):
    output = bar_output(capsys, steps_per_epoch=10, total_steps=25, first_step=20, steps_taken=5)
    assert "5/5" in output
    assert "/10" not in output
    assert "Epoch 3 (1 of 1 in this run)" in output


def test_the_progress_bar_of_a_run_resumed_within_an_epoch_counts_to_its_end(capsys):
    output = bar_output(capsys, steps_per_epoch=10, total_steps=25, first_step=13, steps_taken=7)
    assert "7/7" in output
    assert "Epoch 2 (1 of 2 in this run)" in output


def bar_after_steps(steps_per_epoch, steps_taken):
    trainer = FakeTrainer(0)
    bar = watching.StepProgressBar(steps_per_epoch, total_steps=steps_per_epoch)
    bar.set_model(trainer)
    bar.on_train_begin()
    bar.on_epoch_begin(0)
    for batch in range(steps_taken):
        trainer.step.assign(batch + 1)
        bar.on_train_batch_end(batch, {"loss": 0.5})
    return bar


def test_an_error_within_an_epoch_is_printed_on_a_line_of_its_own(capsys):
    """A save that fails after step 3 of 10: the bar's line is ended before the error."""
    bar = bar_after_steps(steps_per_epoch=10, steps_taken=3)
    assert not capsys.readouterr().out.endswith("\n")  # the bar's line is open
    bar.end_line()
    assert capsys.readouterr().out == "\n"
    bar.end_line()  # and once only
    assert capsys.readouterr().out == ""


def test_a_finished_epoch_leaves_no_empty_line_before_what_follows(capsys):
    bar = bar_after_steps(steps_per_epoch=4, steps_taken=4)
    assert capsys.readouterr().out.endswith("\n")  # Keras ends a finished bar's line
    bar.end_line()
    assert capsys.readouterr().out == ""


def test_the_sample_prompts_given_are_the_ones_drawn_before_and_during_training(
    tmp_path, image_folder
):
    """On the stand-in models, in-process: one step, samples before it and after it."""
    prompts = ["a {} on a beach", "a pencil drawing of {}"]
    argv = [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--max-train-steps", "1", "--sample-every", "1",
        "--sample-steps", "1", "--sample-prompts", *prompts, "--output-dir", str(tmp_path),
    ]  # fmt: skip
    with stand_in_models():
        ti.main(argv)
    slugs = [ti.slugify(p.format("<my-funny-cat-token>")) for p in prompts]
    expected = [f"epoch-{epoch:03d}_{slug}.png" for epoch in (0, 1) for slug in slugs]
    assert sorted(os.listdir(tmp_path / "samples")) == sorted(expected + ["progress.png"])


def test_a_run_says_how_it_trains_and_with_xla_on_trains_a_compiled_step(
    tmp_path, image_folder, capsys
):
    """`--xla on` through `main`, on the stand-ins, in-process: the step is compiled
    with XLA (the oracle checks that step's arithmetic on the full-size models), and
    the run says so, with its precision and checkpointing, before it trains."""
    argv = [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--max-train-steps", "1", "--sample-every", "0",
        "--sample-steps", "1", "--precision", "float32", "--xla", "on",
        "--gradient-checkpointing", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    with stand_in_models():
        _, trainer = ti.main(argv)
    assert "Training in float32, XLA on, gradient checkpointing on, epsilon target." in capsys.readouterr().out
    assert trainer.jit_compile is True
    assert int(trainer.step.numpy()) == 1

