"""What tools/generate.py and tools/evaluate.py share: they load saved embeddings into a
fresh StableDiffusion. Each token is added to the tokenizer and its vectors to the text
encoder, as for training. `{}` in a prompt stands for the first embedding's token.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textual_inversion as ti  # noqa: E402


def add_embeddings(tokenizer, embeddings, paths):
    """Adds each embedding's tokens to the tokenizer; returns the rows to append to
    the text encoder, in token id order."""
    vectors, token_ids = [], []
    for embedding, path in zip(embeddings, paths):
        if embedding.token in tokenizer.encoder:
            raise ti.UserError(
                f"The token {embedding.token} of {path} is already in the vocabulary "
                "(it is a word, or another --embedding has it); load one file per token."
            )
        token_ids += ti.add_new_tokens(tokenizer, embedding.token, len(embedding.vectors))
        vectors.append(embedding.vectors)
    return ti.rows_in_id_order(np.concatenate(vectors), token_ids)


def prompts_with_tokens(prompt_templates, tokenizer, embeddings):
    """The prompts, `{}` standing for the first embedding's token, each token written
    out as all its vectors' names; each prompt must use a loaded token."""
    tokens = [embedding.token for embedding in embeddings]
    prompts = []
    for prompt in prompt_templates:
        prompt = prompt.replace("{}", tokens[0])
        if not any(token in prompt for token in tokens):
            raise ti.UserError(
                f'The prompt "{prompt}" uses none of the loaded tokens '
                f"({', '.join(tokens)}); write one into it, or put {{}} where it goes."
            )
        for embedding in embeddings:
            text = ti.placeholder_text(embedding.token, len(embedding.vectors))
            prompt = prompt.replace(embedding.token, text)
        ti.encode_prompt(tokenizer, prompt)  # checks its length
        prompts.append(prompt)
    return prompts


def build_stable_diffusion_with_embeddings(args, tokenizer, new_rows):
    """A fresh StableDiffusion whose text encoder has `new_rows` for the tokens that
    `add_embeddings` added to `tokenizer`."""
    jit_compile = ti.hardware.use_xla(args.xla)
    stable_diffusion = ti.build_base_model(
        args.resolution,
        tokenizer,
        args.base_model,
        args.random_weights,
        jit_compile,
        ti.hardware.resolve_precision(args.precision),
        args.prediction_type,
    )
    new_encoder = ti.extend_text_encoder(stable_diffusion.text_encoder, new_rows, jit_compile)
    ti.set_part(stable_diffusion, "text_encoder", new_encoder)
    return stable_diffusion
