"""Saving and loading learned embeddings. Resuming, and the generate tool, are tested
from the command line, in test_runs_from_the_command_line.py."""

import os

import numpy as np
import pytest
import safetensors
import tensorflow as tf

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import extend_stand_in_encoder, import_tool

generate = import_tool("generate")
drawing = import_tool("drawing")

PLACEHOLDER = "<my-funny-cat-token>"


def set_token_row(text_encoder, token_id, vector):
    layer = ti.get_embedding_layer(text_encoder).token_embedding
    matrix = layer.get_weights()[0]
    matrix[token_id] = vector
    layer.set_weights([matrix])


# --- The file itself -------------------------------------------------------------------


def test_saved_file_loads_back_equal_with_its_metadata(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(1, 768)).astype("float32")
    path = str(tmp_path / saving.EMBEDDING_FILE)
    saving.save_embedding(path, PLACEHOLDER, vectors, {"step": 12, "initializer_token": "cat"})
    assert not os.path.exists(path + ".partial")

    loaded = saving.load_embedding(path)
    assert loaded.token == PLACEHOLDER
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.metadata["step"] == "12"
    assert loaded.metadata["initializer_token"] == "cat"

    # The layout other tools read: one float32 tensor [num_vectors, 768] named by the token.
    with safetensors.safe_open(path, framework="numpy") as f:
        assert list(f.keys()) == [PLACEHOLDER]
        assert f.get_tensor(PLACEHOLDER).dtype == np.float32
        assert f.get_tensor(PLACEHOLDER).shape == (1, 768)


def test_a_diffusers_style_1d_vector_loads_as_one_row(tmp_path):
    path = str(tmp_path / "old.safetensors")
    safetensors.numpy.save_file({"<old>": np.ones(768, dtype="float32")}, path)
    assert saving.load_embedding(path).vectors.shape == (1, 768)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"<sd2-token>": np.zeros((1, 1024), dtype="float32")}, "SD 1.x models are 768 wide"),
        ({"<a>": np.zeros((1, 768), "float32"), "<b>": np.zeros((1, 768), "float32")}, "2 tensors"),
    ],
)
def test_loading_a_wrong_embedding_says_why(tmp_path, tensors, message):
    path = str(tmp_path / "bad.safetensors")
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ti.UserError, match=message):
        saving.load_embedding(path)


def test_loading_a_file_that_is_not_an_embedding_says_why(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a safetensors file")
    with pytest.raises(ti.UserError, match="not a valid safetensors embedding"):
        saving.load_embedding(str(path))
    with pytest.raises(ti.UserError, match="does not exist"):
        saving.load_embedding(str(tmp_path / "missing.safetensors"))


def test_a_token_already_in_the_vocabulary_is_refused():
    tokenizer = ti.build_tokenizer()
    cat = saving.LearnedEmbedding("cat", np.zeros((1, 768), "float32"), {})
    with pytest.raises(ti.UserError, match="already in the vocabulary"):
        drawing.add_embeddings(tokenizer, [cat], ["cat.safetensors"])
    twice = saving.LearnedEmbedding("<x>", np.zeros((1, 768), "float32"), {})
    with pytest.raises(ti.UserError, match="already in the vocabulary"):
        drawing.add_embeddings(tokenizer, [twice, twice], ["a.safetensors", "b.safetensors"])


def test_saved_embedding_in_a_fresh_pipeline_encodes_like_training(concept, tmp_path):
    stable_diffusion = concept["stable_diffusion"]
    placeholder_token_id = concept["placeholder_token_id"]
    learned = np.random.default_rng(1).normal(size=(1, 768)).astype("float32")
    original_matrix_row = ti.token_rows(stable_diffusion.text_encoder, [placeholder_token_id])
    set_token_row(stable_diffusion.text_encoder, placeholder_token_id, learned[0])
    try:
        path = str(tmp_path / saving.EMBEDDING_FILE)
        saving.save_embedding(path, PLACEHOLDER, learned, {"step": 1})

        # A fresh tokenizer and text encoder, extended from the file alone.
        fresh_tokenizer = ti.build_tokenizer()
        new_rows = drawing.add_embeddings(fresh_tokenizer, [saving.load_embedding(path)], [path])
        fresh_encoder = extend_stand_in_encoder(concept["original_text_encoder"], new_rows)
        assert fresh_tokenizer.encoder[PLACEHOLDER] == placeholder_token_id
        np.testing.assert_array_equal(ti.token_rows(fresh_encoder, [placeholder_token_id]), learned)

        prompt = f"an oil painting of {PLACEHOLDER}"
        positions = ti.get_position_ids()
        trained_ids = tf.constant(ti.encode_prompt(concept["tokenizer"], prompt)[None])
        fresh_ids = tf.constant(ti.encode_prompt(fresh_tokenizer, prompt)[None])
        np.testing.assert_array_equal(trained_ids.numpy(), fresh_ids.numpy())
        np.testing.assert_allclose(
            fresh_encoder([fresh_ids, positions]).numpy(),
            stable_diffusion.text_encoder([trained_ids, positions]).numpy(),
            atol=1e-6,
        )
    finally:
        set_token_row(stable_diffusion.text_encoder, placeholder_token_id, original_matrix_row[0])


# --- generate --------------------------------------------------------------------------


def test_generate_refuses_a_prompt_without_the_token(tmp_path):
    path = str(tmp_path / saving.EMBEDDING_FILE)
    saving.save_embedding(path, "<my-test-token>", np.zeros((1, 768), "float32"), {})
    with pytest.raises(ti.UserError, match="uses none of the loaded tokens"):
        generate.generate(
            generate.parse_args(["--embedding", path, "--prompt", "a dog", "--random-weights"])
        )


@pytest.mark.parametrize(
    "token, word",
    [
        ("<my-funny-cat-token>", "my-funny-cat-token"),  # the brackets Windows forbids
        ("<a:b*c?>", "abc"),
        ("<con>", "con-embedding"),  # a device name on Windows
        ("<learned_embeds>", "learned_embeds-embedding"),  # a run's own file
        ("<...>", "embedding"),  # nothing left of it
    ],
)
def test_the_trigger_word_is_the_token_as_a_file_name_every_system_accepts(token, word):
    assert saving.trigger_word(token) == word


# --- In diffusers ------------------------------------------------------------------------

DIFFUSERS_LOADS = """
import gzip, json, os, sys
import numpy as np, torch
from diffusers.loaders import TextualInversionLoaderMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

embedding_path, vocabulary_path, width, folder = sys.argv[1:5]
# CLIP's tokenizer files, made from the BPE merges keras-cv downloads, as CLIP makes them.
merges = gzip.open(vocabulary_path).read().decode().split("\\n")[1 : 49152 - 256 - 2 + 1]
printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes shown as themselves
others = [b for b in range(256) if b not in printable]  # the rest, as chr(256 + n)
words = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
words += [w + "</w>" for w in words] + ["".join(m.split()) for m in merges]
words += ["<|startoftext|>", "<|endoftext|>"]
with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({w: i for i, w in enumerate(words)}, f)
with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\\n" + "\\n".join(merges) + "\\n")
tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
config = CLIPTextConfig(
    hidden_size=int(width), intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
)
text_encoder = CLIPTextModel(config)

class Pipeline(TextualInversionLoaderMixin):  # what load_textual_inversion reads of a pipeline
    hf_device_map, components = None, {}

pipeline = Pipeline()
pipeline.tokenizer, pipeline.text_encoder = tokenizer, text_encoder
pipeline.load_textual_inversion(embedding_path)
token_id = tokenizer.convert_tokens_to_ids("<my-funny-cat-token>")
row = text_encoder.get_input_embeddings().weight[token_id].detach().numpy()
print(json.dumps({"token_id": token_id, "row": row.tolist()}))
"""


@pytest.mark.parametrize("width", [768, 1024])  # SD 1.x, SD 2.x
def test_diffusers_load_textual_inversion_reads_the_saved_token_and_vector(width, tmp_path):
    """diffusers' own loader (`pipe.load_textual_inversion(path)`), on a small CLIP text
    encoder of that width, in a process of its own: the token is added after CLIP's
    49,408 and its row is the saved vector."""
    import json

    from conftest import SHARED_VOCAB, python_in_a_process_of_its_own

    vectors = np.random.default_rng(width).normal(size=(1, width)).astype("float32")
    path = str(tmp_path / saving.EMBEDDING_FILE)
    saving.save_embedding(path, PLACEHOLDER, vectors, {"step": 1})
    script = f"import sys; sys.argv = ['load', {path!r}, {SHARED_VOCAB!r}, '{width}', {str(tmp_path)!r}]\n"
    found = json.loads(python_in_a_process_of_its_own(script + DIFFUSERS_LOADS).splitlines()[-1])
    assert found["token_id"] == 49408
    np.testing.assert_array_equal(np.array(found["row"], "float32"), vectors[0])
