"""The training set: the tutorial's, style prompts, and own captions."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from textual_inversion_extras import run_control
from conftest import write_test_images

TOKEN = "<my-funny-cat-token>"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = ti.build_tokenizer()
    ti.add_placeholder_token(tokenizer, TOKEN, "cat")
    return tokenizer


def train_dataset(args, tokenizer, epochs=1):
    """The training set `main` assembles for `args`, `epochs` long."""
    sets = ti.training_sets(args, tokenizer, TOKEN)
    return ti.assemble_train_dataset(sets, args.batch_size, args.seed, epochs)


def prompts_of(dataset, tokenizer):
    """How often each prompt occurs in the (batched) dataset, keyed by the prompts
    whose token ids they are."""
    counts = collections.Counter(
        tuple(token_ids.numpy().tolist()) for _, token_ids in dataset.unbatch()
    )
    return counts


def ids(tokenizer, prompt):
    return tuple(ti.encode_prompt(tokenizer, prompt).tolist())


def test_the_tutorial_dataset_has_its_250_steps_an_epoch(tokenizer):
    args = ti.parse_args(["--random-weights", "--resolution", "128"])
    assert ti.group_image_sources(args) == ti.GROUP_IMAGE_URLS
    assert ti.concept_prompts(args) == ti.SINGLE_PROMPTS
    sets = ti.training_sets(args, tokenizer, TOKEN)
    assert ti.steps_per_epoch(sets, args.batch_size) == 250
    assert int(ti.assemble_train_dataset(sets, args.batch_size, epochs=2).cardinality()) == 500


def test_own_images_do_not_bring_the_tutorial_group_images(tmp_path):
    write_test_images(str(tmp_path), count=1)
    args = ti.parse_args(["--images", str(tmp_path)])
    assert ti.group_image_sources(args) == []


def test_style_uses_the_style_prompts(tmp_path, tokenizer):
    write_test_images(str(tmp_path), count=2)
    args = ti.parse_args(
        [
            "--images",
            str(tmp_path),
            "--learnable-property",
            "style",
            "--resolution",
            "128",
            "--random-weights",
        ]
    )
    counts = prompts_of(train_dataset(args, tokenizer), tokenizer)
    expected = {ids(tokenizer, p.format(TOKEN)) for p in ti.STYLE_PROMPTS}
    assert set(counts) == expected
    assert set(counts.values()) == {5}


def test_an_image_with_a_caption_file_trains_with_its_caption(tmp_path, tokenizer):
    paths = write_test_images(str(tmp_path), count=2)
    caption = "a photo of {} asleep on a red sofa"
    (tmp_path / "concept_1.txt").write_text(caption + "\n")
    args = ti.parse_args(["--images", str(tmp_path), "--resolution", "128", "--random-weights"])
    train_ds = train_dataset(args, tokenizer)
    counts = prompts_of(train_ds, tokenizer)
    assert counts[ids(tokenizer, caption.format(TOKEN))] == 5
    assert sum(counts.values()) == 5 + 5 * len(ti.SINGLE_PROMPTS)

    # The captioned pairs hold the captioned image (augmented: cropped and flipped).
    captioned_ids = ti.encode_prompt(tokenizer, caption.format(TOKEN))
    source = ti.load_images([paths[1]], 128)[0]
    for image, token_ids in train_ds.unbatch():
        if np.array_equal(token_ids.numpy(), captioned_ids):
            assert image.shape == (128, 128, 3)
            # A horizontal flip or a crop keeps the picture's mean colour near the source.
            np.testing.assert_allclose(
                image.numpy().mean(axis=(0, 1)), source.mean(axis=(0, 1)), atol=0.15
            )


def test_a_caption_without_braces_is_refused(tmp_path, tokenizer):
    write_test_images(str(tmp_path), count=1)
    (tmp_path / "concept_0.txt").write_text("a photo of my cat")
    args = ti.parse_args(["--images", str(tmp_path), "--resolution", "128"])
    with pytest.raises(ti.UserError, match="has no {}"):
        train_dataset(args, tokenizer)


# --- Every batch a function of the seed and the step -------------------------------------


def small_sets(tokenizer):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(3, 128, 128, 3)).astype("float32")
    prompts = ti.encode_prompts(tokenizer, ["a photo of {}", "a rendering of {}"], TOKEN)
    group = ti.encode_prompts(tokenizer, ["a photo of a group of {}"], TOKEN)
    return [ti.TextImagePairs(images[:2], prompts), ti.TextImagePairs(images[2:], group)]


def batches(dataset):
    return [(images.numpy(), token_ids.numpy()) for images, token_ids in dataset]


def test_a_dataset_started_at_a_step_is_the_rest_of_the_whole_run(tokenizer):
    sets = small_sets(tokenizer)
    whole = batches(ti.assemble_train_dataset(sets, 2, seed=3, epochs=3))
    assert len(whole) == 3 * ti.steps_per_epoch(sets, 2) == 21
    rest = batches(ti.assemble_train_dataset(sets, 2, seed=3, epochs=3, first_step=9))
    assert len(rest) == len(whole) - 9
    for (images, ids), (rest_images, rest_ids) in zip(whole[9:], rest):
        np.testing.assert_array_equal(rest_images, images)
        np.testing.assert_array_equal(rest_ids, ids)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(tokenizer):
    sets = small_sets(tokenizer)
    first = batches(ti.assemble_train_dataset(sets, 1, seed=3, epochs=1))
    again = batches(ti.assemble_train_dataset(sets, 1, seed=3, epochs=1))
    other = batches(ti.assemble_train_dataset(sets, 1, seed=4, epochs=1))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_each_epoch_uses_every_prompt_five_times_in_an_order_of_its_own(tokenizer):
    sets = small_sets(tokenizer)
    orders = [ti.epoch_order(sets, seed=3, epoch=epoch, batch_size=1) for epoch in range(2)]
    for image_ids, prompt_ids in orders:
        assert sorted(collections.Counter(prompt_ids.tolist()).values()) == [5, 5, 5]
        # The single-doll images take turns beside their prompts: 5 and 5 of 10.
        single = collections.Counter(image_ids[prompt_ids < 2].tolist())
        assert single == {0: 5, 1: 5}
        assert set(image_ids[prompt_ids == 2].tolist()) == {2}  # the group image
    assert not np.array_equal(orders[0][1], orders[1][1])


def test_the_crop_is_keras_cvs_random_crop_and_resize_of_the_same_box():
    from keras_cv.layers import RandomCropAndResize

    image = np.random.default_rng(0).uniform(-1, 1, size=(64, 64, 3)).astype("float32")
    keras_cv_crop = RandomCropAndResize(
        (64, 64), crop_area_factor=(0.8, 1.0), aspect_ratio_factor=(1.0, 1.0)
    )
    flips = 0
    for n in range(8):
        seed = tf.constant([3, n], "int64")
        crop_seed = tf.random.experimental.stateless_split(seed, 2)[0]
        box = ti.random_crop_box(crop_seed)
        expected = keras_cv_crop.augment_image(tf.constant(image), transformation=box[None]).numpy()
        ours = ti.augment(tf.constant(image), seed).numpy()
        flipped = np.array_equal(ours, expected[:, ::-1])
        assert flipped or np.array_equal(ours, expected)
        flips += flipped
    assert 0 < flips < 8


def test_crops_are_squares_of_80_to_100_percent_of_the_image_and_half_are_flipped():
    image = tf.constant(np.arange(16 * 16 * 3, dtype="float32").reshape(16, 16, 3))
    boxes = np.stack([ti.random_crop_box(tf.constant([5, n], "int64")).numpy() for n in range(300)])
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_allclose(heights, widths, atol=1e-6)
    assert (heights**2 >= 0.8 - 1e-6).all() and (heights**2 <= 1 + 1e-6).all()
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
    assert heights.min() ** 2 < 0.82 and heights.max() ** 2 > 0.98  # the whole range
    flipped = 0
    for n in range(100):
        augmented = ti.augment(image, tf.constant([5, n], "int64")).numpy()
        flipped += augmented[8, 0, 0] > augmented[8, -1, 0]  # columns run right to left
    assert 35 <= flipped <= 65


class ChecksumModel(keras.Model):
    """Trains nothing; reports a checksum of each batch it is given."""

    def train_step(self, data):
        images, token_ids = data
        return {"checksum": tf.reduce_sum(images) + tf.cast(tf.reduce_sum(token_ids), "float32")}


class RecordChecksums(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.checksums = []

    def on_train_batch_end(self, batch, logs=None):
        self.checksums.append(float(logs["checksum"]))


@pytest.mark.parametrize("first_step", [0, 8])  # 8: within the second of 3 epochs of 7
def test_fit_sees_the_runs_batches_in_order_epoch_after_epoch(tokenizer, first_step):
    sets = small_sets(tokenizer)
    epoch_steps = ti.steps_per_epoch(sets, 2)

    def steps_from(step):
        return ti.assemble_train_dataset(sets, 2, seed=3, epochs=3, first_step=step)

    expected = [
        float(tf.reduce_sum(images) + tf.cast(tf.reduce_sum(ids), "float32"))
        for images, ids in steps_from(first_step)
    ]
    model = ChecksumModel()
    model.compile()
    recorder = RecordChecksums()
    run_control.train_from_step(model, steps_from, epoch_steps, 3, first_step, [recorder])
    np.testing.assert_allclose(recorder.checksums, expected, rtol=1e-6)
