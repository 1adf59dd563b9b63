"""The training set: the tutorial's, style prompts, and own captions."""

import collections

import numpy as np
import pytest

import textual_inversion as ti
from conftest import write_test_images

TOKEN = "<my-funny-cat-token>"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = ti.build_tokenizer()
    ti.add_placeholder_token(tokenizer, TOKEN, "cat")
    return tokenizer


def train_dataset(args, tokenizer):
    """The training set `main` assembles for `args`."""
    datasets = ti.training_datasets(args, tokenizer, TOKEN)
    return ti.assemble_train_dataset(datasets, args.batch_size)


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
    train_ds = train_dataset(args, tokenizer)
    assert int(train_ds.cardinality()) == 250


def test_own_images_do_not_bring_the_tutorial_group_images(tmp_path):
    write_test_images(str(tmp_path), count=1)
    args = ti.parse_args(["--images", str(tmp_path)])
    assert ti.group_image_sources(args) == []


def test_style_uses_the_style_prompts(tmp_path, tokenizer):
    write_test_images(str(tmp_path), count=2)
    args = ti.parse_args(
        ["--images", str(tmp_path), "--learnable-property", "style", "--resolution", "128",
         "--random-weights"]
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
            np.testing.assert_allclose(image.numpy().mean(axis=(0, 1)), source.mean(axis=(0, 1)), atol=0.15)


def test_a_caption_without_braces_is_refused(tmp_path, tokenizer):
    write_test_images(str(tmp_path), count=1)
    (tmp_path / "concept_0.txt").write_text("a photo of my cat")
    args = ti.parse_args(["--images", str(tmp_path), "--resolution", "128"])
    with pytest.raises(ti.UserError, match="has no {}"):
        train_dataset(args, tokenizer)
