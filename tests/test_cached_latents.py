"""--cache-latents: the VAE encoder's outputs for a few views of each image, encoded
once, take the images' place in training."""

import collections

import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import RESOLUTION
from stand_ins import stand_in_models

PLACEHOLDER = "<my-funny-cat-token>"
LATENT_SIZE = RESOLUTION // 8


@pytest.fixture(scope="module")
def latent_encoder(concept):
    return ti.latent_distribution_encoder(concept["stable_diffusion"].image_encoder)


def test_a_step_on_cached_latents_computes_the_loss_of_a_step_on_the_image(
    concept, image_folder, latent_encoder
):
    files = ti.resolve_image_files([image_folder])[:1]
    images = ti.load_images(files, RESOLUTION)
    unchanged = lambda image, seed: image  # noqa: E731 (a view that is the image itself)
    views = ti.encode_views(images, latent_encoder, views=2, make_view=unchanged)
    assert views.shape == (1, 2, LATENT_SIZE, LATENT_SIZE, 8)  # mean and log-variance

    stable_diffusion = concept["stable_diffusion"]
    trainer = ti.build_trainer(stable_diffusion, [concept["placeholder_token_id"]], 1e-4, seed=0)
    token_ids = tf.constant(
        ti.encode_prompt(concept["tokenizer"], f"a photo of a {PLACEHOLDER}")[None]
    )
    random_state = trainer.seed_generator.state.numpy()
    image = tf.constant(images)
    image_loss = float(trainer.compute_denoising_loss(image, token_ids))
    ti.use_cached_latents(trainer)
    trainer.seed_generator.state.assign(random_state)
    cached_loss = float(trainer.compute_denoising_loss(tf.constant(views[:, 1]), token_ids))
    # The same ops on the same numbers: equal up to float32 rounding.
    np.testing.assert_allclose(cached_loss, image_loss, rtol=1e-5)


def test_cached_views_are_augmented_and_pair_with_every_prompt(
    concept, image_folder, latent_encoder
):
    args = ti.parse_args(
        ["--images", image_folder, "--prompts", "a photo of {}", "a rendering of {}",
         "--resolution", str(RESOLUTION), "--random-weights", "--cache-latents"]
    )  # fmt: skip
    tokenizer = concept["tokenizer"]
    sets = ti.cache_latents(ti.training_sets(args, tokenizer, PLACEHOLDER), latent_encoder)
    train_ds = ti.assemble_train_dataset(
        sets, args.batch_size, args.seed, epochs=1, make_view=ti.pick_cached_view
    )
    examples = list(train_ds.unbatch())
    assert len(examples) == 2 * ti.PROMPT_REPEATS
    prompts = collections.Counter(tuple(ids.numpy()) for _, ids in examples)
    assert sorted(prompts.values()) == [ti.PROMPT_REPEATS] * 2
    latents = np.stack([views.numpy() for views, _ in examples])
    assert latents.shape[1:] == (LATENT_SIZE, LATENT_SIZE, 8)
    # Random crops and flips: the 10 cached views of an image differ from one another,
    # and the same seed caches the same views.
    assert sets[0].images.shape[1] == ti.CACHED_VIEWS
    assert len({view.tobytes() for view in sets[0].images[0]}) == ti.CACHED_VIEWS
    images = ti.load_images(ti.resolve_image_files([image_folder])[:1], RESOLUTION)
    np.testing.assert_array_equal(
        ti.encode_views(images, latent_encoder, seed=args.seed, views=2),
        sets[0].images[0, :2][None],
    )


def test_a_command_line_run_with_cached_latents_and_two_vectors_resumes_with_its_state(
    tmp_path, image_folder, capsys
):
    """Through `main`, on the stand-in models: 2 steps, then resumed to 4."""
    output_dir = tmp_path / "run"
    argv = [
        "--random-weights", "--resolution", str(RESOLUTION), "--images", image_folder,
        "--prompts", "a photo of {}", "--cache-latents", "--num-vectors", "2",
        "--sample-every", "0", "--output-dir", str(output_dir),
    ]  # fmt: skip
    embedding = str(output_dir / saving.EMBEDDING_FILE)
    with stand_in_models():
        ti.main([*argv, "--max-train-steps", "2"])
        ti.main([*argv, "--max-train-steps", "4", "--resume", embedding])
    assert "Resuming step 2 with its training state" in capsys.readouterr().out
    saved = saving.load_embedding(embedding)
    assert saved.vectors.shape == (2, 768) and saved.metadata["step"] == "4"
