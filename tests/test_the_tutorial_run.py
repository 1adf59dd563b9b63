"""`run_tutorial`: the story's whole run, each step taken the tutorial's way
(`TutorialRun`), here shortened, at 128 px, on the stand-in VAE and UNet."""

import contextlib
import os

import keras
import matplotlib.pyplot as plt
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


@contextlib.contextmanager
def models_seeded_by_name(monkeypatch):
    """Each model KerasCV builds starts from a seed of its own: the same weights whatever
    order the tutorial's StableDiffusion (lazily) and the command line build them in."""
    import keras_cv.models.stable_diffusion as module
    from keras_cv.src.models.stable_diffusion import stable_diffusion as pipeline_module

    def seeded(build, seed):
        def build_from_seed(*arguments, **options):
            keras.utils.set_random_seed(seed)
            return build(*arguments, **options)

        return build_from_seed

    with monkeypatch.context() as patch:
        for seed, name in enumerate(["TextEncoder", "ImageEncoder", "DiffusionModel", "Decoder"]):
            for place in (module, pipeline_module):
                patch.setattr(place, name, seeded(getattr(place, name), seed))
        yield


def test_the_command_line_without_flags_runs_what_the_tutorial_runs(
    tmp_path, image_folder, monkeypatch
):
    """The tutorial's run and `main` with only the flags that shorten it (and float32,
    which the tutorial computes in) start from the same seed: they draw the same
    pictures before training, learn the same vector and draw the same final images.
    On the stand-ins, shortened: two images, 4 steps, 1-step samples."""
    files = sorted(os.path.join(image_folder, name) for name in os.listdir(image_folder))

    class ShortTutorialRun(ti.TutorialRun):
        resolution, sample_every, sample_steps, max_train_steps = RESOLUTION, 1, 1, 4
        output_dir = str(tmp_path / "tutorial")
        images, prompts = ["file://" + files[0]], ["a photo of a {}"]
        group_images, group_prompts = ["file://" + files[1]], ti.GROUP_PROMPTS

    argv = [
        "--resolution", str(RESOLUTION), "--sample-every", "1", "--sample-steps", "1",
        "--max-train-steps", "4", "--images", "file://" + files[0], "--prompts",
        "a photo of a {}", "--group-images", "file://" + files[1], "--precision", "float32",
        "--output-dir", str(tmp_path / "command-line"),
    ]  # fmt: skip
    with stand_in_models(), models_seeded_by_name(monkeypatch):
        _, tutorial = ti.run_tutorial(ShortTutorialRun())
        _, command_line = ti.main(argv)

    # The same training steps: the same vector, bit for bit.
    np.testing.assert_array_equal(
        command_line.learned_embedding.numpy(), tutorial.learned_embedding.numpy()
    )
    # The tutorial draws with XLA (its `jit_compile=True`), the command line on a CPU
    # without: a pixel may round to the next of its 256 levels (measured: 6 of 196,608).
    for folder in ("samples", "final"):
        names = sorted(os.listdir(tmp_path / "tutorial" / folder))
        assert names == sorted(
            name for name in os.listdir(tmp_path / "command-line" / folder) if name != "progress.png"
        )
        for name in names:
            np.testing.assert_allclose(
                plt.imread(tmp_path / "command-line" / folder / name),
                plt.imread(tmp_path / "tutorial" / folder / name),
                atol=1 / 255 + 1e-6,
            )
