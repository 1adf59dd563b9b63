"""The tutorial's mechanics, on KerasCV's tokenizer and CLIP layers with the stand-ins
(tests/stand_ins.py; random weights, 128 px, CPU). The full-size text encoder is extended
the same way in test_diffusers_oracle.py, and the script from its command line is tested
in test_runs_from_the_command_line.py."""

import hashlib
import math

import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti

PLACEHOLDER = "<my-funny-cat-token>"


def weight_digests(model):
    """A fingerprint of every weight of `model`, exact to the bit."""
    return [hashlib.sha1(w.numpy().tobytes()).hexdigest() for w in model.weights]


def token_matrix(stable_diffusion):
    return ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding.get_weights()[0]


# --- The tokenizer and the extended text encoder --------------------------------------


def test_tokenizer_gains_exactly_one_id(concept):
    tokenizer = concept["tokenizer"]
    assert len(tokenizer.vocab) == concept["vocab_size_before"] + 1
    assert concept["placeholder_token_id"] == concept["vocab_size_before"]
    assert tokenizer.encode(PLACEHOLDER)[1:-1] == [concept["placeholder_token_id"]]
    token_ids = ti.encode_prompt(tokenizer, "a photo of a {}".format(PLACEHOLDER))
    assert token_ids.shape == (ti.MAX_PROMPT_LENGTH,)
    assert list(token_ids).count(concept["placeholder_token_id"]) == 1
    assert token_ids[-1] == tokenizer.end_of_text


def test_extended_encoder_equals_old_but_for_the_new_row(concept):
    old = concept["original_text_encoder"]
    new = concept["stable_diffusion"].text_encoder
    old_matrix = ti.get_embedding_layer(old).token_embedding.get_weights()[0]
    new_matrix = ti.get_embedding_layer(new).token_embedding.get_weights()[0]
    assert new_matrix.shape == (old_matrix.shape[0] + 1, old_matrix.shape[1])
    np.testing.assert_array_equal(new_matrix[:-1], old_matrix)
    np.testing.assert_array_equal(new_matrix[-1], old_matrix[concept["initializer_token_id"]])

    old_weights = [w.numpy() for w in old.weights]
    new_weights = [w.numpy() for w in new.weights]
    assert len(old_weights) == len(new_weights)
    for old_weight, new_weight in zip(old_weights, new_weights):
        if old_weight.shape == old_matrix.shape and np.array_equal(old_weight, old_matrix):
            continue  # the token matrix, compared above
        np.testing.assert_array_equal(old_weight, new_weight)


def test_prompt_with_the_token_encodes_like_the_initializer_before_training(concept):
    """With its row copied from "cat", the new token means "cat" to the text encoder."""
    stable_diffusion = concept["stable_diffusion"]
    tokenizer = concept["tokenizer"]
    positions = ti.get_position_ids()
    with_token = tf.constant(ti.encode_prompt(tokenizer, f"a photo of a {PLACEHOLDER}")[None])
    with_cat = tf.constant(ti.encode_prompt(tokenizer, "a photo of a cat")[None])
    context_token = stable_diffusion.text_encoder([with_token, positions])
    context_cat = stable_diffusion.text_encoder([with_cat, positions])
    np.testing.assert_allclose(context_token.numpy(), context_cat.numpy(), atol=1e-6)


# --- Small pure pieces ------------------------------------------------------------------


def test_timestep_embedding_matches_keras_cv_per_timestep():
    import keras_cv

    timesteps = np.array([0, 1, 499, 999])
    ours = ti.get_timestep_embedding(timesteps).numpy()
    sd = keras_cv.models.StableDiffusion.__new__(keras_cv.models.StableDiffusion)
    for row, timestep in zip(ours, timesteps):
        expected = sd._get_timestep_embedding(int(timestep), batch_size=1).numpy()[0]
        np.testing.assert_allclose(row, expected, rtol=1e-6, atol=1e-6)


def test_placeholder_gradient_keeps_and_sums_only_placeholder_rows():
    values = tf.constant(np.arange(12, dtype="float32").reshape(4, 3))
    gradient = tf.IndexedSlices(values, indices=tf.constant([7, 9, 7, 2]), dense_shape=(10, 3))
    result = ti.placeholder_gradient(gradient, tf.constant([7, 9])).numpy()
    np.testing.assert_array_equal(result, [[0 + 6, 1 + 7, 2 + 8], [3, 4, 5]])
    dense = tf.convert_to_tensor(gradient)
    np.testing.assert_array_equal(
        ti.placeholder_gradient(dense, tf.constant([7, 9])).numpy(), result
    )


# --- Training --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_run(concept):
    """Trains the concept's token a few steps; records the weights before and after."""
    stable_diffusion = concept["stable_diffusion"]
    models = {
        "text_encoder": stable_diffusion.text_encoder,
        "image_encoder": stable_diffusion.image_encoder,
        "diffusion_model": stable_diffusion.diffusion_model,
        "decoder": stable_diffusion.decoder,
    }
    digests_before = {name: weight_digests(model) for name, model in models.items()}
    matrix_before = token_matrix(stable_diffusion).copy()

    # A learning rate that moves the loss in a handful of steps; on the stand-in UNet
    # a larger one overshoots the fixed example's minimum.
    trainer = ti.build_trainer(
        stable_diffusion, [concept["placeholder_token_id"]], learning_rate=0.003, seed=0
    )
    images = concept["images"][:1].astype("float32")
    token_ids = ti.encode_prompt(concept["tokenizer"], f"a photo of a {PLACEHOLDER}")[None]

    # Restoring the trainer's random state before each step makes every step draw the
    # same latent sample, noise and timestep: one fixed (image, noise, timestep) example.
    initial_state = trainer.seed_generator.state.numpy()
    losses = []
    for _ in range(5):
        trainer.seed_generator.state.assign(initial_state)
        logs = trainer.train_on_batch(images, token_ids, return_dict=True)
        losses.append(float(logs["step_loss"]))

    yield dict(
        trainer=trainer,
        models=models,
        digests_before=digests_before,
        digests_after={name: weight_digests(model) for name, model in models.items()},
        matrix_before=matrix_before,
        matrix_after=token_matrix(stable_diffusion).copy(),
        losses=losses,
    )
    # Leave the shared models as they were: the new row back to "cat".
    ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding.set_weights(
        [matrix_before]
    )


def test_only_the_learned_vector_is_trainable(training_run):
    trainer = training_run["trainer"]
    assert [v.path for v in trainer.trainable_variables] == [trainer.learned_embedding.path]
    assert tuple(trainer.learned_embedding.shape) == (1, 768)


def test_training_changes_the_placeholder_row_and_nothing_else(concept, training_run):
    placeholder_token_id = concept["placeholder_token_id"]
    before, after = training_run["matrix_before"], training_run["matrix_after"]
    assert not np.array_equal(before[placeholder_token_id], after[placeholder_token_id])
    other_rows = np.arange(len(before)) != placeholder_token_id
    # Bit-identical: no weight decay or optimizer drift on the 49,408 frozen tokens.
    assert np.array_equal(before[other_rows], after[other_rows])
    np.testing.assert_array_equal(
        after[placeholder_token_id], training_run["trainer"].learned_embedding.numpy()[0]
    )

    for name in training_run["models"]:
        changed = [
            i
            for i, (b, a) in enumerate(
                zip(training_run["digests_before"][name], training_run["digests_after"][name])
            )
            if b != a
        ]
        if name == "text_encoder":
            matrix_index = [
                i
                for i, w in enumerate(training_run["models"][name].weights)
                if tuple(w.shape) == before.shape
            ]
            assert changed == matrix_index, "only the token matrix may change"
        else:
            assert changed == [], f"{name} weights changed"


def test_loss_is_finite_and_falls_on_a_fixed_example(training_run):
    losses = training_run["losses"]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    assert losses[-1] < losses[0], losses
    assert losses[-1] == min(losses), losses
