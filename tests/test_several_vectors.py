"""--num-vectors: the placeholder as several new tokens, each its own vector."""

import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import extend_stand_in_encoder, import_tool, two_vector_encoder

evaluate = import_tool("evaluate")
drawing = import_tool("drawing")

TOKEN = "<my-funny-cat-token>"


def test_names_get_consecutive_ids_and_prompts_expand_in_order():
    tokenizer = ti.build_tokenizer()
    vocabulary_size = len(tokenizer.vocab)
    ids, _ = ti.add_placeholder_tokens(tokenizer, TOKEN, "cat", num_vectors=3)
    assert sorted(ids) == list(range(vocabulary_size, vocabulary_size + 3))
    assert ti.placeholder_names(TOKEN, 3) == [
        TOKEN,
        "<my-funny-cat-token-1>",
        "<my-funny-cat-token-2>",
    ]
    encoded = ti.encode_prompt(tokenizer, "a photo of " + ti.placeholder_text(TOKEN, 3))
    # Each name is one token, in name order: "<t>" does not match inside "<t-1>".
    assert encoded[4:7].tolist() == ids
    assert encoded[7] == tokenizer.end_of_text
    # Without angle brackets the names still do not swallow one another.
    ids_plain, _ = ti.add_placeholder_tokens(tokenizer, "sksconcept", "cat", num_vectors=2)
    encoded = ti.encode_prompt(tokenizer, "a " + ti.placeholder_text("sksconcept", 2))
    assert encoded[2:4].tolist() == ids_plain


def test_one_vector_is_the_tutorial():
    assert ti.placeholder_text(TOKEN, 1) == TOKEN
    args = ti.parse_args([])
    assert ti.placeholder_text(args.placeholder_token, args.num_vectors) == TOKEN


def test_loading_a_two_vector_embedding_expands_prompts_and_rows():
    tokenizer = ti.build_tokenizer()
    vectors = np.arange(2 * 768, dtype="float32").reshape(2, 768)
    embedding = saving.LearnedEmbedding("<two>", vectors, {})
    rows = drawing.add_embeddings(tokenizer, [embedding], ["two.safetensors"])
    ids = [tokenizer.encoder["<two>"], tokenizer.encoder["<two-1>"]]
    # Rows come in token id order; row k is the vector of the token with the k-th id.
    for name_index, token_id in enumerate(ids):
        np.testing.assert_array_equal(rows[sorted(ids).index(token_id)], vectors[name_index])
    (prompt,) = drawing.prompts_with_tokens(["an oil painting of {}"], tokenizer, [embedding])
    assert prompt == "an oil painting of <two> <two-1>"
    assert evaluate.without_token(prompt, "<two>", 2) == "an oil painting of"


def test_training_two_vectors_changes_both_rows_and_nothing_else(concept, tmp_path):
    stable_diffusion = concept["stable_diffusion"]
    original = concept["original_text_encoder"]
    with two_vector_encoder(concept, TOKEN) as (tokenizer, ids):
        before = ti.token_rows(stable_diffusion.text_encoder, np.arange(len(tokenizer.vocab)))
        trainer = ti.build_trainer(stable_diffusion, ids, learning_rate=0.05, seed=0)
        images = concept["images"][:1].astype("float32")
        token_ids = ti.encode_prompt(tokenizer, "a photo of " + ti.placeholder_text(TOKEN, 2))[None]
        for _ in range(2):
            trainer.train_on_batch(images, token_ids)
        after = ti.token_rows(stable_diffusion.text_encoder, np.arange(len(tokenizer.vocab)))
        learned = trainer.learned_embedding.numpy()

        assert learned.shape == (2, 768)
        for name_index, token_id in enumerate(ids):
            assert not np.array_equal(before[token_id], after[token_id])
            np.testing.assert_array_equal(after[token_id], learned[name_index])
        others = np.ones(len(before), dtype=bool)
        others[ids] = False
        assert np.array_equal(before[others], after[others])

        # Saved as [2, 768] in name order, and loaded back into a fresh pipeline.
        path = str(tmp_path / saving.EMBEDDING_FILE)
        saving.save_embedding(path, TOKEN, learned, {"step": 2})
        loaded = saving.load_embedding(path)
        assert loaded.vectors.shape == (2, 768)
        fresh_tokenizer = ti.build_tokenizer()
        fresh_rows = drawing.add_embeddings(fresh_tokenizer, [loaded], [path])
        fresh_encoder = extend_stand_in_encoder(original, fresh_rows)
        prompt = drawing.prompts_with_tokens(["a photo of {}"], fresh_tokenizer, [loaded])[0]
        positions = ti.get_position_ids()
        fresh_ids = tf.constant(ti.encode_prompt(fresh_tokenizer, prompt)[None])
        np.testing.assert_array_equal(fresh_ids.numpy(), token_ids)
        np.testing.assert_allclose(
            fresh_encoder([fresh_ids, positions]).numpy(),
            stable_diffusion.text_encoder([tf.constant(token_ids), positions]).numpy(),
            atol=1e-6,
        )


def test_num_vectors_below_one_is_refused():
    with pytest.raises(ti.UserError, match="1 or more"):
        ti.parse_args(["--num-vectors", "0"])
