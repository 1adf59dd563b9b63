"""Seeing what was learned: the progress montage and the nearest words (issue 8)."""

import json

import numpy as np
import matplotlib.pyplot as plt

import textual_inversion as ti

PROMPTS = [p.format("<my-funny-cat-token>") for p in ti.SAMPLE_PROMPTS]
TILE = 32


def write_samples(samples_dir, epoch, prompts, value):
    """A fake sample file: 3 tiles side by side, the first filled with `value`."""
    for row, prompt in enumerate(prompts):
        tiles = np.zeros((TILE, 3 * TILE, 3), dtype="float32")
        tiles[:, :TILE] = value + 0.1 * row
        plt.imsave(samples_dir / f"epoch-{epoch:03d}_{ti.slugify(prompt)}.png", tiles)


def test_montage_has_a_row_per_prompt_and_a_column_per_epoch_and_is_rebuilt(tmp_path):
    label = ti.MONTAGE_LABEL_HEIGHT
    write_samples(tmp_path, 0, PROMPTS[:1], 0.2)  # before training: the first prompt only
    write_samples(tmp_path, 1, PROMPTS, 0.4)
    write_samples(tmp_path, 11, PROMPTS, 0.6)
    path = ti.build_progress_montage(str(tmp_path), PROMPTS)
    montage = plt.imread(path)
    assert montage.shape[:2] == (label + 3 * (label + TILE), 3 * TILE)

    # The cell of row 2 (third prompt), epoch 11 (third column) is that file's first tile.
    top, left = label + 2 * (label + TILE) + label, 2 * TILE
    np.testing.assert_allclose(montage[top : top + TILE, left : left + TILE, 0], 0.8, atol=0.01)
    # Row 1 has no before-training sample: its first cell stays blank (white).
    top = label + 1 * (label + TILE) + label
    np.testing.assert_allclose(montage[top : top + TILE, :TILE, :3], 1.0)

    # A resumed run adds epoch 21: the montage is drawn anew from all the files.
    write_samples(tmp_path, 21, PROMPTS, 0.1)
    montage = plt.imread(ti.build_progress_montage(str(tmp_path), PROMPTS))
    assert montage.shape[:2] == (label + 3 * (label + TILE), 4 * TILE)


def test_before_training_the_nearest_word_is_the_initializer(concept, tmp_path):
    stable_diffusion = concept["stable_diffusion"]
    placeholder_token_id = concept["placeholder_token_id"]
    layer = ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding
    matrix = layer.get_weights()[0]
    saved_row = matrix[placeholder_token_id].copy()
    matrix[placeholder_token_id] = matrix[concept["initializer_token_id"]]
    layer.set_weights([matrix])
    try:
        path = tmp_path / "learned_words.json"
        report = ti.report_nearest_words(stable_diffusion, [placeholder_token_id], str(path))
    finally:
        matrix[placeholder_token_id] = saved_row
        layer.set_weights([matrix])

    (entry,) = report
    assert entry["token"] == "<my-funny-cat-token>"
    assert entry["nearest"][0]["word"] == "cat"
    assert abs(entry["nearest"][0]["cosine"] - 1.0) < 1e-6
    assert len(entry["nearest"]) == 5
    assert all(n["word"] != "<my-funny-cat-token>" for n in entry["nearest"])
    np.testing.assert_allclose(entry["norm"], np.linalg.norm(matrix[concept["initializer_token_id"]]), rtol=1e-6)
    assert entry["vocabulary_median_norm"] > 0
    assert json.loads(path.read_text()) == report


# --- The paper's CLIP scores -----------------------------------------------------------

import math  # noqa: E402

import pytest  # noqa: E402

from conftest import RESOLUTION  # noqa: E402


@pytest.fixture(scope="module")
def clip():
    return ti.build_clip(random_weights=True)


def test_training_images_are_similar_to_themselves(clip, concept):
    training = (concept["images"] + 1) * 127.5
    embeddings = ti.clip_image_embeddings(clip, training)
    prompt = ti.clip_text_embeddings(clip, concept["tokenizer"], ["a photo of a"])[0]
    for i in range(len(embeddings)):
        one = embeddings[i : i + 1]
        scores = ti.clip_scores(one, one, prompt)
        assert abs(scores["image_similarity"] - 1.0) < 1e-5

    rng = np.random.default_rng(0)
    other = rng.integers(0, 256, size=(2, RESOLUTION, RESOLUTION, 3)).astype("uint8")
    scores = ti.clip_scores(ti.clip_image_embeddings(clip, other), embeddings, prompt)
    for value in scores.values():
        assert math.isfinite(value) and -1.0 <= value <= 1.0
    assert scores["image_similarity"] < 1.0 - 1e-4


def test_the_text_prompt_leaves_the_placeholder_out():
    assert ti.without_token("a photo of a <tok> on the beach", "<tok>") == "a photo of a on the beach"
