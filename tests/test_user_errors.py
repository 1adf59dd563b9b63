"""Mistakes a new user makes end in one clear sentence, before the models are built;
interruptions and a diverging loss keep what was learned."""

import csv
import json
import os
import signal

import numpy as np
import pytest
import safetensors.numpy

import textual_inversion as ti
from textual_inversion_extras import hardware, saving, watching
from conftest import RESOLUTION, run_script, write_test_images
from stand_ins import stand_in_models

PLACEHOLDER = "<my-funny-cat-token>"


@pytest.fixture
def images(tmp_path):
    return write_test_images(str(tmp_path / "images"), count=1)


def run_main(tmp_path, images, *extra):
    argv = ["--images", *images, "--group-images", "--output-dir", str(tmp_path / "out"), *extra]
    ti.main(argv)


def expect_user_error(match, tmp_path, images, *extra):
    with pytest.raises(ti.UserError, match=match) as raised:
        run_main(tmp_path, images, *extra)
    message = str(raised.value)
    assert "\n" not in message and message.endswith("."), message  # one sentence
    return message


# --- Images ----------------------------------------------------------------------------


def test_a_missing_image_is_refused(tmp_path):
    expect_user_error("does not exist", tmp_path, [str(tmp_path / "nope.jpg")])


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    expect_user_error("has no images", tmp_path, [str(tmp_path / "empty")])


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a picture")
    expect_user_error("Could not read the image", tmp_path, [str(fake)])


def test_a_truncated_image_is_refused(tmp_path, images):
    data = open(images[0], "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    expect_user_error("Could not read the image", tmp_path, [str(truncated)])


def test_an_unreachable_image_url_is_refused_and_points_to_images(tmp_path):
    # Port 9 (discard) on this machine: nothing listens, the connection is refused.
    message = expect_user_error(
        "Could not download the image", tmp_path, ["http://127.0.0.1:9/cat.jpg"]
    )
    assert "--images" in message


# --- Tokens and prompts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "token, match",
    [
        ("cat", "already in the vocabulary"),
        ("<my cat>", "has spaces"),
        ("", "empty"),
        ("<My-Cat>", "lowercase"),
    ],
)
def test_a_placeholder_that_is_a_word_or_not_one_lowercase_word_is_refused(
    tmp_path, images, token, match
):
    expect_user_error(match, tmp_path, images, "--placeholder-token", token)


def test_an_initializer_word_of_several_tokens_is_refused_with_its_pieces(tmp_path, images):
    message = expect_user_error("not one", tmp_path, images, "--initializer-token", "catdogfish")
    tokenizer = ti.build_tokenizer()
    pieces = [tokenizer.decode([i]).strip() for i in tokenizer.encode("catdogfish")[1:-1]]
    assert len(pieces) > 1
    assert ", ".join(pieces) in message


def test_a_prompt_template_without_braces_is_refused(tmp_path, images):
    expect_user_error("has no {}", tmp_path, images, "--prompts", "a photo of my cat")


def test_a_sample_prompt_without_braces_or_too_long_is_refused(tmp_path, images):
    message = expect_user_error("has no {}", tmp_path, images, "--sample-prompts", "a cat")
    assert "put {} where the token goes" in message
    long_template = "a photo of {} " + "with a very long description " * 15
    expect_user_error("more than the 77", tmp_path, images, "--sample-prompts", long_template)


def test_a_prompt_longer_than_77_tokens_is_refused(tmp_path, images):
    long_template = "a photo of {} " + "with a very long description " * 15
    expect_user_error("more than the 77", tmp_path, images, "--prompts", long_template)


# --- Numbers and folders ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--resolution", "200", "multiple of 128"),
        ("--resolution", "64", "multiple of 128"),
        ("--batch-size", "0", "1 or more"),
        ("--epochs", "0", "1 or more"),
        ("--max-train-steps", "0", "1 or more"),
        ("--sample-steps", "0", "1 or more"),
        ("--save-every-steps", "-1", "0 \\(never\\) or more"),
        ("--sample-every", "-1", "0 \\(never\\) or more"),
        ("--learning-rate", "0", "must be above 0"),
    ],
)
def test_values_the_model_cannot_take_are_refused_naming_the_flag(tmp_path, images, flag, value, match):
    assert flag in expect_user_error(match, tmp_path, images, flag, value)


def test_a_batch_larger_than_an_epoch_is_refused_with_the_largest_that_fits(tmp_path, images):
    # One image with one prompt: an epoch is that prompt 5 times.
    message = expect_user_error(
        "more than the 5 examples", tmp_path, images, "--prompts", "a photo of {}",
        "--batch-size", "6",
    )  # fmt: skip
    assert "use 5 or less" in message


def saved_run(tmp_path, images, step=3, state_bytes=None):
    """An output folder as a run of `images` leaves it after `step` steps: its embedding
    and a training state (or `state_bytes` in its place); returns their paths."""
    flags = ["--images", *images, "--group-images", "--output-dir", str(tmp_path / "out")]
    args = ti.parse_args(flags)
    tokenizer = ti.build_tokenizer()
    ti.add_placeholder_token(tokenizer, PLACEHOLDER, "cat")
    sets = ti.training_sets(args, tokenizer, PLACEHOLDER)
    precision = hardware.resolve_precision(args.precision)
    fingerprint = saving.run_fingerprint(args, sets, precision, PLACEHOLDER, 1)
    os.makedirs(args.output_dir)
    embedding = os.path.join(args.output_dir, saving.EMBEDDING_FILE)
    saving.save_embedding(embedding, PLACEHOLDER, np.zeros((1, 768), "float32"), {"step": step})
    state = {"step": np.array(step), "learned_embedding": np.zeros((1, 768), "float32")}
    state_path = os.path.join(args.output_dir, saving.TRAINING_STATE_FILE)
    safetensors.numpy.save_file(state, state_path, metadata={"run": json.dumps(fingerprint)})
    if state_bytes is not None:
        with open(state_path, "wb") as f:
            f.write(state_bytes)
    return embedding, state_path


def test_resuming_a_state_with_another_batch_size_is_refused(tmp_path, images):
    embedding, state_path = saved_run(tmp_path, images)
    message = expect_user_error(
        "saved by a run with --batch-size 1", tmp_path, images, "--resume", embedding,
        "--batch-size", "2",
    )  # fmt: skip
    assert f"delete {state_path}" in message


def test_resuming_beside_a_damaged_training_state_is_refused_with_how_to_go_on(tmp_path, images):
    embedding, state_path = saved_run(tmp_path, images, state_bytes=b"\x00" * 20)
    message = expect_user_error("cannot be read", tmp_path, images, "--resume", embedding)
    assert f"The training state {state_path}" in message
    assert "delete it to resume from the embedding alone" in message


def test_resuming_a_run_with_no_steps_left_is_refused_before_the_models_are_built(
    tmp_path, images, monkeypatch
):
    embedding, _ = saved_run(tmp_path, images, step=25)
    monkeypatch.setattr(ti, "build_base_model", lambda *a, **k: pytest.fail("models built"))
    message = expect_user_error(
        "already has 25 steps", tmp_path, images, "--resume", embedding, "--max-train-steps", "25"
    )
    assert "raise --epochs or --max-train-steps" in message


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, images):
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    with pytest.raises(ti.UserError, match="Cannot write to the output folder"):
        ti.main(["--images", *images, "--output-dir", str(a_file / "run")])


def test_an_existing_run_is_never_overwritten(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.csv").write_text("step,epoch,loss,seconds\n1,1,0.1,1.0\n")
    message = expect_user_error("already holds a run", tmp_path, images)
    assert "--resume" in message
    assert (out / "loss.csv").read_text() == "step,epoch,loss,seconds\n1,1,0.1,1.0\n"


def test_the_command_line_prints_one_sentence_and_no_traceback(tmp_path):
    result = run_script(
        "--images", tmp_path / "missing.jpg", "--output-dir", tmp_path / "out", timeout=300
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "does not exist" in error_lines[0]


# --- During training -------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_embedding(concept, tmp_path):
    stable_diffusion = concept["stable_diffusion"]
    placeholder_token_id = concept["placeholder_token_id"]
    row_before = ti.token_rows(stable_diffusion.text_encoder, [placeholder_token_id])

    # An image of NaNs makes the very first loss NaN.
    nan_images = np.full((1, RESOLUTION, RESOLUTION, 3), np.nan, dtype="float32")
    token_ids = ti.encode_prompts(concept["tokenizer"], ["a photo of a {}"], PLACEHOLDER)
    sets = [ti.TextImagePairs(nan_images, token_ids)]
    args = ti.parse_args(
        [
            "--random-weights",
            "--resolution",
            str(RESOLUTION),
            "--sample-every",
            "0",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    with pytest.raises(ti.UserError, match="non-finite at step 1") as raised:
        ti.CommandLineRun(args).train(stable_diffusion, sets, [placeholder_token_id])
    assert "--resume" in str(raised.value)

    # The failed step is logged under its own number, so a resume cuts it away.
    with open(tmp_path / "loss.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["step"] == "1" and row["loss"] == "nan"
    saved = saving.load_embedding(str(tmp_path / saving.EMBEDDING_FILE))
    assert np.isfinite(saved.vectors).all()
    np.testing.assert_array_equal(saved.vectors, row_before)
    assert saved.metadata["step"] == "0"
    np.testing.assert_array_equal(
        ti.token_rows(stable_diffusion.text_encoder, [placeholder_token_id]), row_before
    )


def test_a_vector_that_turns_non_finite_at_step_3_keeps_step_2_not_the_start(
    tmp_path, image_folder, monkeypatch
):
    """In-process, on the stand-in models: after step 3 the vector is made NaN, as a
    diverging step would leave it; the run keeps and saves step 2's vector and state."""
    log_step = watching.LossLogger.on_train_batch_end
    vectors = {}

    def log_step_then_break_at_3(self, batch, logs=None):
        log_step(self, batch, logs)
        step = int(self.model.step.numpy())
        vectors[step] = self.model.learned_embedding.numpy()
        if step == 3:
            self.model.learned_embedding.assign(np.full_like(vectors[step], np.nan))

    monkeypatch.setattr(watching.LossLogger, "on_train_batch_end", log_step_then_break_at_3)
    output_dir = tmp_path / "run"
    argv = [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--max-train-steps", "5", "--sample-every", "0",
        "--save-every-steps", "0", "--learning-rate", "1e-2", "--output-dir", str(output_dir),
    ]  # fmt: skip
    with stand_in_models(), pytest.raises(ti.UserError) as raised:
        ti.main(argv)
    assert "non-finite at step 3" in str(raised.value) and "(step 2)" in str(raised.value)
    saved = saving.load_embedding(str(output_dir / saving.EMBEDDING_FILE))
    assert saved.metadata["step"] == "2"
    assert not np.array_equal(vectors[2], vectors[1])  # step 2 learned something
    np.testing.assert_array_equal(saved.vectors, vectors[2])
    state = saving.load_training_state(str(output_dir / saving.TRAINING_STATE_FILE), {})
    assert int(state["step"]) == 2


def test_ctrl_c_stops_after_the_step_saves_it_and_exits_130_with_the_resume_command(
    tmp_path, image_folder, monkeypatch, capsys
):
    """In-process, on the stand-in models: SIGINT comes right after step 2 is logged."""
    log_step = watching.LossLogger.on_train_batch_end

    def log_step_then_ctrl_c(self, batch, logs=None):
        log_step(self, batch, logs)
        if int(self.model.step.numpy()) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(watching.LossLogger, "on_train_batch_end", log_step_then_ctrl_c)
    output_dir = tmp_path / "run"
    argv = [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--max-train-steps", "4", "--sample-every", "0",
        "--output-dir", str(output_dir),
    ]  # fmt: skip
    with stand_in_models(), pytest.raises(SystemExit) as exited:
        ti.run_command(lambda: ti.main(argv))

    assert exited.value.code == 130
    embedding_path = str(output_dir / saving.EMBEDDING_FILE)
    error = capsys.readouterr().err
    (message,) = [line for line in error.splitlines() if line.startswith("error:")]
    assert "Stopped by SIGINT at step 2" in message and f"--resume {embedding_path}" in message
    assert saving.load_embedding(embedding_path).metadata["step"] == "2"
    state = saving.load_training_state(str(output_dir / saving.TRAINING_STATE_FILE), {})
    assert int(state["step"]) == 2
    with open(output_dir / "loss.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["1", "2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_a_failed_download_is_told_from_other_errors_by_its_type(tmp_path):
    import keras

    from textual_inversion_extras.errors import is_download_error

    with pytest.raises(Exception) as failed:  # nothing listens on port 9
        keras.utils.get_file(origin="http://127.0.0.1:9/vocabulary.txt.gz", cache_dir=str(tmp_path))
    assert is_download_error(failed.value)
    assert not is_download_error(ValueError("a message that names a URL and a fetch failure"))


def failing_download(*_, **__):
    """What keras.utils.get_file raises offline: nothing listens on port 9."""
    import keras

    keras.utils.get_file(origin="http://127.0.0.1:9/file.gz", cache_dir="/nonexistent-cache")


def test_an_offline_vocabulary_download_says_which_file_to_place_where(monkeypatch, tmp_path):
    import keras_cv

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(keras_cv.models.stable_diffusion, "SimpleTokenizer", failing_download)
    with pytest.raises(ti.UserError) as refused:
        ti.build_tokenizer()
    message = str(refused.value)
    assert message.startswith("Could not download the CLIP vocabulary")
    assert f"place bpe_simple_vocab_16e6.txt.gz in {tmp_path / 'keras' / 'datasets'}." in message


def test_offline_weights_say_which_files_to_place_where_or_to_use_random_weights(
    monkeypatch, tmp_path
):
    class Offline:
        text_encoder = property(failing_download)

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(ti.UserError) as refused:
        ti.sd_parts(Offline(), ["text_encoder"])
    message = str(refused.value)
    assert message.startswith("Could not download the Stable Diffusion weights")
    assert "kcv_diffusion_model.h5" in message and str(tmp_path / "keras" / "datasets") in message
    assert message.endswith("or use --random-weights for a smoke run.")


def test_an_error_that_is_not_a_download_is_not_called_one():
    class Broken:
        text_encoder = property(lambda self: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        ti.sd_parts(Broken(), ["text_encoder"])
