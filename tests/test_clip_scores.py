"""tools/evaluate.py: the paper's CLIP scores, on CLIP built with random weights."""

import numpy as np
import pytest

from conftest import import_tool

evaluate = import_tool("evaluate")


@pytest.fixture(scope="module")
def clip():
    return evaluate.build_clip(random_weights=True)


def test_clip_preprocessing_of_a_constant_image_is_clips_normalized_value(clip):
    """A grey image of value 100 becomes 224 x 224 pixels of (100 / 255 - mean) / std
    in each channel, with CLIP's published mean and std."""
    image = np.full((1, 96, 96, 3), 100, dtype="uint8")
    pixels = np.asarray(evaluate.clip_pixels(clip, image))
    assert pixels.shape == (1, 224, 224, 3)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (100 / 255 - mean) / std  # by hand: [-0.3324, -0.2513, -0.0582]
    np.testing.assert_allclose(pixels[0, 112, 112], expected, atol=1e-5)
    # Every pixel, up to the bicubic resize's rounding (measured: at most 2e-4).
    np.testing.assert_allclose(pixels[0], np.broadcast_to(expected, (224, 224, 3)), atol=1e-3)


def test_the_scores_are_mean_cosines_of_generated_to_training_images_and_to_the_prompt():
    """A known answer, by hand: two generated images, two training images, a prompt."""
    generated = evaluate.unit_vectors([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    training = evaluate.unit_vectors([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    prompt = evaluate.unit_vectors([0.0, 0.6, 0.8])
    scores = evaluate.clip_scores(generated, training, prompt)
    # Cosines to the training images: [[1, 0.6], [0, 0.8]]; to the prompt: [0, 0.6].
    assert scores["image_similarity"] == pytest.approx((1 + 0.6 + 0 + 0.8) / 4)
    assert scores["text_similarity"] == pytest.approx((0 + 0.6) / 2)


def test_the_text_prompt_leaves_the_placeholder_out():
    text = evaluate.without_token("a photo of a <tok> on the beach", "<tok>")
    assert text == "a photo of a on the beach"
