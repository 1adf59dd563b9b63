"""The command line on a random full-size SD 2.x checkpoint, as a user runs it: one
training step, the sample images before and after it, and the final images; then
`tools/generate.py` draws with the embedding it saved; nothing is downloaded. The file
is named as SD 2.1's 768-v release is, so `--prediction-type auto` trains a
v-prediction model. The runs are the second part of the suite's background run of the
checkpoints (`checkpoint_command_line_run` in conftest.py); these tests wait for it."""

import os

import pytest

from textual_inversion_extras import saving


@pytest.fixture(scope="module")
def sd2x_run(checkpoint_command_line_run):
    folder, process = checkpoint_command_line_run
    process.wait(timeout=1500)
    log = (folder / "sd2-train.log").read_text()
    assert (folder / "sd2.status").read_text().strip() == "0", log[-3000:]
    return folder / "sd2-run", log


def test_the_command_line_trains_a_768_v_sd2_file_with_the_velocity_as_its_target(sd2x_run):
    _, log = sd2x_run
    assert "Loading the SD 2.x base model" in log
    assert "--prediction-type auto: v_prediction; the file's name has 768 in it" in log
    assert ", v_prediction target." in log  # as the trainer has it


def test_the_command_line_saves_a_1024_wide_embedding_of_an_sd2_model(sd2x_run):
    run, _ = sd2x_run
    embedding = saving.load_embedding(str(run / saving.EMBEDDING_FILE), "SD 2.x")
    assert embedding.token == "<my-funny-cat-token>"
    assert embedding.vectors.shape == (1, 1024)
    assert embedding.metadata["prediction_type"] == "v_prediction"


def test_the_command_line_draws_sd2_samples_and_final_images(sd2x_run):
    run, _ = sd2x_run
    samples = os.listdir(run / "samples")
    for epoch in ("000", "001"):
        assert sum(name.startswith(f"epoch-{epoch}_") for name in samples) == 3
    assert len(os.listdir(run / "final")) == 4


def test_the_generate_tool_draws_with_the_1024_wide_embedding_on_the_sd2_file(
    checkpoint_command_line_run, sd2x_run
):
    folder, _ = checkpoint_command_line_run
    log = (folder / "sd2-draw.log").read_text()
    assert (folder / "sd2-draw.status").read_text().strip() == "0", log[-3000:]
    assert "Loading the SD 2.x base model" in log
    assert "--prediction-type auto: v_prediction" in log
    assert len(os.listdir(folder / "sd2-draw" / "generated")) == 1
