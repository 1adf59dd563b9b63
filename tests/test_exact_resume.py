"""A stopped run, resumed from its saved training state, is the run that never stopped.

The training here goes through the script's own pieces: `assemble_train_dataset`,
`train_from_step` (which finishes a half-done epoch first), `save_training`,
`load_training_state` and `restore_training_state`, with two vectors in batches of 2.
One trainer keeps the tracing to once: it trains 6 steps, saving its state after the
third; then the state is loaded back from disk into the same trainer, which by then
stands at step 6, so anything the state left out would keep its step-6 value and the
3 steps trained again would differ. (The command-line tests kill a real run with
SIGKILL.)
"""

import contextlib
import csv
import errno
import os

import keras
import numpy as np
import pytest
import safetensors.numpy

import textual_inversion as ti
from textual_inversion_extras import run_control, saving, watching
from conftest import two_vector_encoder

TOKEN = "<my-funny-cat-token>"
SEED = 7
STEPS = 6
SAVED_AT = 3
# The losses of the resumed steps equal the unstopped run's bit for bit. The vectors
# did too when this ran alone; in the whole suite, 84 of their 1,536 components once
# differed by a float32 ulp (3.7e-9) after the last update. A state that missed
# anything (Adam's moments or step, the random state, the data's place) would move
# them by up to about the learning rate, 1e-2.
VECTOR_TOLERANCE = 1e-7


class RecordLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = {}

    def on_train_batch_end(self, batch, logs=None):
        self.losses[int(self.model.step.numpy())] = float(logs["step_loss"])


class SaveAtStep(keras.callbacks.Callback):
    def __init__(self, step, output_dir):
        super().__init__()
        self.step, self.output_dir = step, output_dir

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step.numpy()) == self.step:
            saving.save_training(self.output_dir, TOKEN, self.model, {}, {"seed": SEED})


def stop_and_resume(stable_diffusion, placeholder_ids, sets, batch_size, output_dir):
    """(vectors, losses by step) of the unstopped run and of the resumed one."""
    epoch_steps = ti.steps_per_epoch(sets, batch_size)
    epochs = -(-STEPS // epoch_steps)
    assert SAVED_AT % epoch_steps, "the resume must start within an epoch"
    # A decaying learning rate: a resumed run that lost its place in the schedule
    # would take other steps.
    learning_rate = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=STEPS)
    trainer = ti.build_trainer(stable_diffusion, placeholder_ids, learning_rate, seed=SEED)

    def steps_from(step):
        return ti.assemble_train_dataset(sets, batch_size, SEED, epochs, step)

    recorder = RecordLosses()
    callbacks = [recorder, SaveAtStep(SAVED_AT, str(output_dir)), run_control.StopAfterSteps(STEPS)]
    run_control.train_from_step(trainer, steps_from, epoch_steps, epochs, 0, callbacks)
    unstopped = trainer.learned_embedding.numpy(), dict(recorder.losses)

    state_path = str(output_dir / saving.TRAINING_STATE_FILE)
    state = saving.load_training_state(state_path, {"seed": SEED})
    assert int(state["step"]) == SAVED_AT
    saving.restore_training_state(trainer, state)
    recorder.losses.clear()
    run_control.train_from_step(trainer, steps_from, epoch_steps, epochs, SAVED_AT, callbacks)
    matrix_rows = ti.token_rows(stable_diffusion.text_encoder, placeholder_ids)
    np.testing.assert_array_equal(matrix_rows, trainer.learned_embedding.numpy())
    resumed = trainer.learned_embedding.numpy(), dict(recorder.losses)
    return unstopped, resumed


def pairs_of(concept, tokenizer, placeholder, images=2):
    token_ids = ti.encode_prompts(tokenizer, ["a photo of {}"], placeholder)
    return [ti.TextImagePairs(concept["images"][:images], token_ids)]


def assert_same_run(unstopped, resumed):
    (unstopped_vectors, unstopped_losses), (resumed_vectors, resumed_losses) = unstopped, resumed
    assert sorted(unstopped_losses) == list(range(1, STEPS + 1))
    assert sorted(resumed_losses) == list(range(SAVED_AT + 1, STEPS + 1))
    for step in resumed_losses:
        assert resumed_losses[step] == unstopped_losses[step], step  # bit for bit
    np.testing.assert_allclose(resumed_vectors, unstopped_vectors, rtol=0, atol=VECTOR_TOLERANCE)


def test_a_resumed_run_of_two_vectors_in_batches_of_two_ends_as_the_unstopped_one(
    concept, tmp_path
):
    stable_diffusion = concept["stable_diffusion"]
    with two_vector_encoder(concept, TOKEN) as (tokenizer, placeholder_ids):
        sets = pairs_of(concept, tokenizer, ti.placeholder_text(TOKEN, 2), images=2)
        unstopped, resumed = stop_and_resume(stable_diffusion, placeholder_ids, sets, 2, tmp_path)
    assert unstopped[0].shape == (2, 768)
    assert_same_run(unstopped, resumed)


# --- What is saved, and what is refused --------------------------------------------------


@pytest.fixture
def trainer(concept):
    return ti.build_trainer(concept["stable_diffusion"], [concept["placeholder_token_id"]], 1e-4)


def fingerprint(**changes):
    run = {"token": TOKEN, "images and prompts": "0123abcd", "--batch-size": 1, "--seed": 1}
    return dict(run, **changes)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--batch-size": 2}, "--batch-size 1"),
        ({"images and prompts": "ffff0000"}, "other images and prompts"),
    ],
)
def test_a_state_saved_by_another_configuration_is_refused(trainer, tmp_path, change, message):
    saving.save_training(str(tmp_path), TOKEN, trainer, {}, fingerprint())
    path = str(tmp_path / saving.TRAINING_STATE_FILE)
    assert saving.load_training_state(path, fingerprint()) is not None
    with pytest.raises(ti.UserError, match=message) as refused:
        saving.load_training_state(path, fingerprint(**change))
    assert "delete" in str(refused.value)


def test_a_resume_with_another_learning_rate_or_length_goes_on_and_says_so(
    trainer, tmp_path, capsys
):
    saved = fingerprint(**{"--learning-rate": 1e-4, "--epochs": 50})
    saving.save_training(str(tmp_path), TOKEN, trainer, {}, saved)
    path = str(tmp_path / saving.TRAINING_STATE_FILE)
    assert saving.load_training_state(path, saved) is not None
    assert capsys.readouterr().out == ""  # the same schedule: nothing to say
    longer = fingerprint(**{"--learning-rate": 1e-4, "--epochs": 100})
    assert saving.load_training_state(path, longer) is not None
    said = capsys.readouterr().out
    assert "--epochs 100 (the saved run's: 50)" in said and "--learning-rate" not in said
    assert said.count("\n") == 1


def test_the_state_holds_the_optimizer_the_random_state_and_the_step(trainer, tmp_path):
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 0}, fingerprint())
    state = saving.load_training_state(str(tmp_path / saving.TRAINING_STATE_FILE), fingerprint())
    assert {"learned_embedding", "step", "seed_generator_state"} <= set(state)
    assert any(key.startswith("optimizer/") for key in state)
    # The embedding beside it is the single tensor other tools load.
    embedding = saving.load_embedding(str(tmp_path / saving.EMBEDDING_FILE))
    np.testing.assert_array_equal(embedding.vectors, state["learned_embedding"])


def test_a_save_that_fails_keeps_the_previous_files_and_says_what_to_do(
    trainer, tmp_path, monkeypatch
):
    saver = saving.SaveEmbedding(str(tmp_path), TOKEN, {}, fingerprint(), 0, 1)
    saver.set_model(trainer)
    saver.save()
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    own_files = [saving.EMBEDDING_FILE, saving.TRAINING_STATE_FILE, saving.trigger_word_file(TOKEN)]
    assert sorted(before) == sorted(own_files)

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    trainer.step.assign(1)
    trainer.learned_embedding.assign(trainer.learned_embedding + 1.0)
    with pytest.raises(ti.UserError) as failed:
        saver.save()
    message = str(failed.value)
    assert "No space left on device" in message and "--resume" in message
    assert len(message.splitlines()) == 1
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before  # no partial file left, the old ones untouched


def test_the_loss_log_is_cut_back_to_the_step_a_run_resumes_from(tmp_path):
    path = str(tmp_path / "loss.csv")
    with open(path, "w", newline="") as f:
        rows = [["step", "epoch", "loss", "seconds"]]
        rows += [[step, 1, 0.1 * step, 2.0] for step in range(1, 6)]
        csv.writer(f).writerows(rows)
        f.write("6,1,0.")  # a row cut short by kill -9
    watching.cut_loss_log(path, 3)
    with open(path) as f:
        kept = list(csv.DictReader(f))
    assert [int(row["step"]) for row in kept] == [1, 2, 3]


def test_an_empty_or_header_only_loss_log_is_kept_as_a_header(tmp_path):
    empty, header_only = str(tmp_path / "empty.csv"), str(tmp_path / "header.csv")
    open(empty, "w").close()  # killed between creating the file and writing its header
    with open(header_only, "w") as f:
        f.write("step,epoch,loss,seconds\n")
    for path in (empty, header_only):
        watching.cut_loss_log(path, 3)
        with open(path) as f:
            assert f.read().strip() == "step,epoch,loss,seconds"


def test_a_state_older_than_its_embedding_is_not_used(trainer, tmp_path, capsys):
    """An embedding that went further than the state beside it (copied in by hand)."""
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 0}, fingerprint())
    embedding = str(tmp_path / saving.EMBEDDING_FILE)
    vectors = trainer.learned_embedding.numpy() + 1.0
    saving.save_embedding(embedding, TOKEN, vectors, {"step": 5})
    assert saving.resume_state(embedding, saving.load_embedding(embedding), fingerprint()) is None
    assert "resuming the embedding alone" in capsys.readouterr().out


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs but `finally` blocks."""


def test_a_save_killed_between_its_two_renames_resumes_from_the_newer_state(
    trainer, tmp_path, monkeypatch, capsys
):
    """The state is renamed first and holds the vectors too: it is the newer save."""
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 0}, fingerprint())
    trainer.step.assign(3)
    trainer.learned_embedding.assign(trainer.learned_embedding + 1.0)
    renames = []

    def rename_then_die(source, target):
        if target.endswith(saving.EMBEDDING_FILE):
            raise Killed
        renames.append(target)
        os.rename(source, target)

    monkeypatch.setattr(os, "replace", rename_then_die)
    with pytest.raises(Killed):
        saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 3}, fingerprint())
    monkeypatch.undo()
    assert renames[-1].endswith(saving.TRAINING_STATE_FILE)
    embedding = str(tmp_path / saving.EMBEDDING_FILE)
    resumed = saving.load_embedding(embedding)
    assert resumed.metadata["step"] == "0"
    state = saving.resume_state(embedding, resumed, fingerprint())
    assert int(state["step"]) == 3
    np.testing.assert_array_equal(state["learned_embedding"], trainer.learned_embedding.numpy())
    assert "resumes from the state" in capsys.readouterr().out


def test_a_snapshot_keeps_its_steps_embedding_and_state_and_resumes_with_them(trainer, tmp_path):
    trainer.step.assign(7)
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 7}, fingerprint(), snapshot=True)
    trainer.step.assign(8)  # a later save, no snapshot: the snapshot stays at step 7
    trainer.learned_embedding.assign(trainer.learned_embedding + 1.0)
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 8}, fingerprint())
    snapshot = str(tmp_path / "snapshots" / "step-000007.safetensors")
    assert os.listdir(tmp_path / "snapshots" / "states") == ["step-000007.safetensors"]
    resumed = saving.load_embedding(snapshot)
    assert resumed.metadata["step"] == "7" and resumed.token == TOKEN
    state = saving.resume_state(snapshot, resumed, fingerprint())
    assert int(state["step"]) == 7
    np.testing.assert_array_equal(state["learned_embedding"], resumed.vectors)
    latest = saving.load_embedding(str(tmp_path / saving.EMBEDDING_FILE))
    assert latest.metadata["step"] == "8"
    assert not np.array_equal(latest.vectors, resumed.vectors)


def test_each_save_writes_the_embedding_under_its_trigger_word_too(trainer, tmp_path):
    """AUTOMATIC1111 and ComfyUI trigger an embedding by its file's name."""
    saving.save_training(str(tmp_path), TOKEN, trainer, {"step": 0}, fingerprint())
    assert saving.trigger_word_file(TOKEN) == "my-funny-cat-token.safetensors"
    copy = saving.load_embedding(str(tmp_path / "my-funny-cat-token.safetensors"))
    embedding = saving.load_embedding(str(tmp_path / saving.EMBEDDING_FILE))
    assert copy.token == embedding.token == TOKEN
    np.testing.assert_array_equal(copy.vectors, embedding.vectors)


def test_a_state_whose_optimizer_does_not_fit_is_refused_before_anything_is_restored(
    trainer, tmp_path
):
    state = saving.training_state(trainer)
    moments = next(key for key in state if key.startswith("optimizer/") and state[key].ndim == 2)
    state[moments] = np.zeros((3, 5), "float32")
    state["learned_embedding"] = state["learned_embedding"] + 1.0
    vectors_before = trainer.learned_embedding.numpy()
    with pytest.raises(ti.UserError, match="does not fit this run's optimizer"):
        saving.restore_training_state(trainer, state)
    np.testing.assert_array_equal(trainer.learned_embedding.numpy(), vectors_before)


def test_a_save_killed_before_any_of_its_writes_resumes_from_a_whole_state(
    trainer, tmp_path, monkeypatch
):
    """A save of step 5 over a save of step 0, killed before each of its file writes and
    renames in turn (the snapshot's, the trigger word's file, the state, the embedding):
    the folder always resumes with a whole training state, step 0's or step 5's, and
    never falls back to the vectors alone."""
    saves = {}

    def save(step, folder, die_at=None):
        trainer.step.assign(step)
        for variable in trainer.optimizer.variables:
            variable.assign(variable + 1.0)  # each save's moments differ
        trainer.learned_embedding.assign(trainer.learned_embedding + 1.0)
        saves[step] = saving.training_state(trainer)
        writes = []

        def counted(write):
            def write_unless_killed(*args, **kwargs):
                if len(writes) == die_at:
                    raise Killed
                writes.append(args[1])
                return write(*args, **kwargs)

            return write_unless_killed

        with monkeypatch.context() as patch:
            patch.setattr(safetensors.numpy, "save_file", counted(safetensors.numpy.save_file))
            patch.setattr(os, "replace", counted(os.replace))
            saving.save_training(folder, TOKEN, trainer, {"step": step}, fingerprint(), True)
        return writes

    all_writes = save(5, str(tmp_path / "unkilled"))
    # The snapshot and the resumed files are 5 each (the state, the embedding written as
    # its .partial, then the three renames), the trigger word's file 2 (written, renamed).
    assert len(all_writes) == 12
    for die_at in range(len(all_writes) + 1):
        folder = str(tmp_path / f"killed-{die_at}")
        save(0, folder)
        with pytest.raises(Killed) if die_at < len(all_writes) else contextlib.nullcontext():
            save(5, folder, die_at)
        embedding = os.path.join(folder, saving.EMBEDDING_FILE)
        state = saving.resume_state(embedding, saving.load_embedding(embedding), fingerprint())
        assert state is not None, f"killed before write {die_at}"
        expected = saves[int(state["step"])]
        assert sorted(state) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
