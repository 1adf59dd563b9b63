"""A full disk at any write outside a save (the loss log, a sample image, the montage,
the loss plot, the nearest words, the final images) ends the run in one sentence that
says what was kept, with a non-zero exit status; the last save is whole, and `--resume`
finishes the run once there is room. (A full disk during a save: test_exact_resume.py.)

In-process, on the stand-in models: each test makes one of those writes fail with
ENOSPC, as a full disk does, where the script makes it.
"""

import errno
import os

import pytest

import textual_inversion as ti
from textual_inversion_extras import saving, watching
from conftest import RESOLUTION
from stand_ins import stand_in_models

STEPS = 4  # 2 images and 1 prompt: 5 steps an epoch, so one epoch, ended after 4
FAILS_AFTER = 3  # the loss log fails at the step after a save every 3 steps


def disk_full(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def flags(image_folder, output_dir):
    return [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--max-train-steps", str(STEPS), "--sample-every", "1",
        "--sample-steps", "1", "--save-every-steps", str(FAILS_AFTER), "--seed", "3",
        "--precision", "float32", "--output-dir", str(output_dir),
    ]  # fmt: skip


def run_and_fail(argv, capsys):
    """The run's exit status and its one error line."""
    with stand_in_models(), pytest.raises(SystemExit) as exited:
        ti.run_command(lambda: ti.main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return exited.value.code, errors[0]


def saved_step(output_dir):
    return int(saving.load_embedding(str(output_dir / saving.EMBEDDING_FILE)).metadata["step"])


def test_a_full_disk_at_the_loss_log_keeps_the_last_save_and_resume_finishes(
    tmp_path, image_folder, monkeypatch, capsys
):
    log_step = watching.LossLogger.on_train_batch_end

    def log_until_the_disk_is_full(self, batch, logs=None):
        if int(self.model.step.numpy()) > FAILS_AFTER:
            raise disk_full(self.path)
        log_step(self, batch, logs)

    monkeypatch.setattr(watching.LossLogger, "on_train_batch_end", log_until_the_disk_is_full)
    output_dir = tmp_path / "run"
    status, error = run_and_fail(flags(image_folder, output_dir), capsys)
    monkeypatch.undo()

    assert status != 0
    embedding = output_dir / saving.EMBEDDING_FILE
    assert f"Writing {output_dir / 'loss.csv'} failed (No space left on device)" in error
    assert f"step {FAILS_AFTER} are kept" in error and f"--resume {embedding}" in error
    assert saved_step(output_dir) == FAILS_AFTER
    with stand_in_models():
        ti.main([*flags(image_folder, output_dir), "--resume", str(embedding)])
    assert saved_step(output_dir) == STEPS


@pytest.mark.parametrize("place", ["a sample image", "the montage"])
def test_a_full_disk_while_sampling_during_training_keeps_the_last_save(
    tmp_path, image_folder, monkeypatch, capsys, place
):
    """The epoch's samples come after its steps; the montage after its samples."""
    save_images = ti.save_images

    def save_unless_trained(images, path):
        if "epoch-000" not in str(path):  # those before training are written
            raise disk_full(path)
        save_images(images, path)

    def montage_fails(samples_dir, prompts, path=None):
        raise disk_full(os.path.join(samples_dir, "progress.png"))

    if place == "a sample image":
        monkeypatch.setattr(ti, "save_images", save_unless_trained)
    else:
        monkeypatch.setattr(watching, "build_progress_montage", montage_fails)
    output_dir = tmp_path / "run"
    status, error = run_and_fail(flags(image_folder, output_dir), capsys)
    assert status != 0 and "No space left on device" in error
    # The montage and the samples of the epoch come after the last step's save.
    assert saved_step(output_dir) == FAILS_AFTER and "--resume" in error


@pytest.mark.parametrize("place", ["the loss plot", "the nearest words", "the final images"])
def test_a_full_disk_after_training_keeps_the_final_embedding_and_says_how_to_draw(
    tmp_path, image_folder, monkeypatch, capsys, place
):
    def fails(*args, **kwargs):
        raise disk_full(tmp_path / "run" / place.replace(" ", "-"))

    save_images = ti.save_images

    def final_images_fail(images, path):
        if os.sep + "final" + os.sep in str(path):
            raise disk_full(path)
        save_images(images, path)

    if place == "the loss plot":
        monkeypatch.setattr(watching, "plot_loss", fails)
    elif place == "the nearest words":
        monkeypatch.setattr(watching, "report_nearest_words", fails)
    else:
        monkeypatch.setattr(ti, "save_images", final_images_fail)
    output_dir = tmp_path / "run"
    status, error = run_and_fail([*flags(image_folder, output_dir), "--sample-every", "0"], capsys)
    assert status != 0 and "after training ended" in error
    embedding = output_dir / saving.EMBEDDING_FILE
    assert f"tools/generate.py --embedding {embedding}" in error
    assert saved_step(output_dir) == STEPS
