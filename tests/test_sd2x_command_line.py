"""The command line on a random full-size SD 2.x checkpoint, as a user runs it: one
training step, the sample images before and after it, the final images, and then
`tools/generate.py` drawing with the saved embedding; nothing is downloaded. The file is
named as SD 2.1's 768-v release is, so `--prediction-type auto` trains a v-prediction
model. It runs after the SD 2.x oracle has released its models."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, RESOLUTION
from textual_inversion_extras import saving


@pytest.fixture(scope="module")
def sd2x_run(sd2x_checkpoint, image_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2x-command-line")
    checkpoint = folder / "v2-1_768-random.safetensors"
    checkpoint.symlink_to(sd2x_checkpoint)
    common = ["--base-model", checkpoint, "--resolution", RESOLUTION, "--sample-steps", 1]
    train = [
        os.path.join(ROOT, "textual_inversion.py"), *common, "--images", image_folder,
        "--group-images", "--prompts", "a photo of {}", "--max-train-steps", 1,
        "--sample-every", 1, "--output-dir", folder / "run",
    ]  # fmt: skip
    generate = [
        os.path.join(ROOT, "tools", "generate.py"), *common, "--batch-size", 1,
        "--embedding", folder / "run" / saving.EMBEDDING_FILE,
        "--prompt", "an oil painting of {}", "--output-dir", folder / "draw",
    ]  # fmt: skip
    runs = {}
    for name, arguments in [("train", train), ("generate", generate)]:
        command = [sys.executable, *map(str, arguments)]
        runs[name] = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    return folder, runs


def test_the_command_line_trains_a_768_v_sd2_file_with_the_velocity_as_its_target(sd2x_run):
    _, runs = sd2x_run
    out = runs["train"].stdout
    assert "Loading the SD 2.x base model" in out
    assert "--prediction-type auto: v_prediction; the file's name has 768 in it" in out
    assert ", v_prediction target." in out  # as the trainer has it


def test_the_command_line_saves_a_1024_wide_embedding_of_an_sd2_model(sd2x_run):
    folder, _ = sd2x_run
    embedding = saving.load_embedding(str(folder / "run" / saving.EMBEDDING_FILE), "SD 2.x")
    assert embedding.token == "<my-funny-cat-token>"
    assert embedding.vectors.shape == (1, 1024)
    assert embedding.metadata["prediction_type"] == "v_prediction"


def test_the_command_line_draws_sd2_samples_and_final_images(sd2x_run):
    folder, _ = sd2x_run
    samples = os.listdir(folder / "run" / "samples")
    for epoch in ("000", "001"):
        assert sum(name.startswith(f"epoch-{epoch}_") for name in samples) == 3
    assert len(os.listdir(folder / "run" / "final")) == 4


def test_generate_draws_with_an_sd2_embedding_on_its_base_model(sd2x_run):
    folder, runs = sd2x_run
    assert "Wrote 1 images" in runs["generate"].stdout
    assert len(os.listdir(folder / "draw" / "generated")) == 1
