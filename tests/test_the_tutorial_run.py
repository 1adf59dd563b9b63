"""`run_tutorial`: the story's whole run, each step taken the tutorial's way
(`TutorialRun`), here shortened, at 128 px, on the stand-in VAE and UNet."""

import os

import numpy as np

import textual_inversion as ti
from conftest import RESOLUTION
from stand_ins import stand_in_models


def test_the_tutorial_run_draws_before_and_after_training_and_moves_only_the_new_row(
    tmp_path, image_folder
):
    files = sorted(os.path.join(image_folder, name) for name in os.listdir(image_folder))

    class ShortTutorialRun(ti.TutorialRun):
        resolution, epochs, sample_every, sample_steps = RESOLUTION, 1, 1, 1
        output_dir = str(tmp_path)
        images, prompts = ["file://" + files[0]], ["a photo of a {}"]
        group_images, group_prompts = ["file://" + files[1]], ["a photo of a group of {}"]

    with stand_in_models():
        stable_diffusion, trainer = ti.run_tutorial(ShortTutorialRun())

    assert int(trainer.step.numpy()) == 2 * ti.PROMPT_REPEATS  # 2 prompts, 5 times each
    slugs = [ti.slugify(prompt.format(ti.PLACEHOLDER_TOKEN)) for prompt in ti.SAMPLE_PROMPTS]
    expected = [f"epoch-{epoch:03d}_{slug}.png" for epoch in (0, 1) for slug in slugs]
    assert sorted(os.listdir(tmp_path / "samples")) == sorted(expected)
    assert len(os.listdir(tmp_path / "final")) == len(ti.FINAL_PROMPTS)

    tokenizer = stable_diffusion.tokenizer
    placeholder_id = tokenizer.encoder[ti.PLACEHOLDER_TOKEN]
    cat_id = ti.initializer_token_id(tokenizer, "cat")
    placeholder_row, cat_row = ti.token_rows(
        stable_diffusion.text_encoder, [placeholder_id, cat_id]
    )
    np.testing.assert_array_equal(placeholder_row, trainer.learned_embedding.numpy()[0])
    assert not np.allclose(placeholder_row, cat_row)  # it started as cat's, and learned
