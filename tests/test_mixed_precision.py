"""Mixed precision gives the float32 loss on a fixed batch.

bfloat16 is what this CPU can run; mixed_float16 is the GPU path and goes through the
same code (plus Keras's loss scaling), but its numerics are not checked here.
"""

import gc

import keras
import numpy as np
import tensorflow as tf

import textual_inversion as ti
from conftest import RESOLUTION

# bfloat16 keeps 8 bits of mantissa: a relative error of 1% on a mean of ~16k squared
# errors is ample; we measured 0.01% to 0.4%.
RELATIVE_TOLERANCE = 1e-2


def fixed_batch_losses(stable_diffusion, placeholder_token_id, images, token_ids, seeds):
    trainer = ti.build_trainer(stable_diffusion, [placeholder_token_id], 1e-4, seed=0)
    losses = []
    for seed in seeds:
        # The same random state gives the same latent sample, noise and timestep.
        trainer.seed_generator.state.assign(np.array([seed, 0], dtype="uint32"))
        losses.append(float(trainer.compute_denoising_loss(images, token_ids)))
    return losses


def test_mixed_bfloat16_loss_equals_float32_loss(concept):
    float32_sd = concept["stable_diffusion"]
    try:
        mixed_sd = ti.build_stable_diffusion(
            RESOLUTION, concept["tokenizer"], random_weights=True, jit_compile=False,
            precision="mixed_bfloat16",
        )
        mixed_sd._text_encoder = ti.extend_text_encoder(
            mixed_sd.text_encoder,
            ti.token_rows(float32_sd.text_encoder, [concept["placeholder_token_id"]]),
        )
        for part in ("text_encoder", "image_encoder", "diffusion_model"):
            getattr(mixed_sd, part).set_weights(getattr(float32_sd, part).get_weights())
        assert mixed_sd.diffusion_model.dtype_policy.name == "mixed_bfloat16"

        images = tf.constant(concept["images"][:1].astype("float32"))
        token_ids = tf.constant(
            ti.encode_prompt(concept["tokenizer"], "a photo of a <my-funny-cat-token>")[None]
        )
        seeds = [1, 2]
        mixed = fixed_batch_losses(mixed_sd, concept["placeholder_token_id"], images, token_ids, seeds)
    finally:
        keras.mixed_precision.set_global_policy("float32")
        # A second Stable Diffusion is ~4 GB: let it go before the next tests.
        mixed_sd = None
        gc.collect()
    reference = fixed_batch_losses(
        float32_sd, concept["placeholder_token_id"], images, token_ids, seeds
    )
    assert len(set(reference)) == len(seeds), "the seeds should give different examples"
    np.testing.assert_allclose(mixed, reference, rtol=RELATIVE_TOLERANCE)


# --- --precision auto ------------------------------------------------------------------


def test_auto_precision_is_float32_on_a_cpu_without_bfloat16_arithmetic():
    precision, reason = ti.choose_precision(None, {"avx2", "fma", "avx512f"})
    assert precision == "float32"
    assert "no bfloat16 arithmetic" in reason


def test_auto_precision_is_bfloat16_on_a_cpu_with_bfloat16_arithmetic():
    for flag in ("avx512_bf16", "amx_bf16"):
        precision, reason = ti.choose_precision(None, {"avx2", flag})
        assert precision == "mixed_bfloat16" and flag in reason


def test_auto_precision_is_float16_with_loss_scaling_on_a_t4_and_bfloat16_on_an_a100():
    assert ti.choose_precision(("Tesla T4", (7, 5)), set())[0] == "mixed_float16"
    assert ti.choose_precision(("Tesla V100", (7, 0)), set())[0] == "mixed_float16"
    assert ti.choose_precision(("NVIDIA A100", (8, 0)), set())[0] == "mixed_bfloat16"
    assert ti.choose_precision(("Tesla K80", (3, 7)), {"amx_bf16"})[0] == "float32"


def test_an_explicit_precision_is_kept_and_auto_says_what_it_chose(capsys):
    assert ti.resolve_precision("mixed_float16") == "mixed_float16"
    assert capsys.readouterr().out == ""
    chosen = ti.resolve_precision("auto")
    assert chosen in ti.PRECISIONS and chosen != "auto"
    assert f"--precision auto: {chosen}, as " in capsys.readouterr().out
