"""Mixed precision gives the float32 loss and gradient on a fixed batch.

bfloat16 is what some CPUs compute fast; mixed_float16, with Keras's loss scaling, is
the path of older GPUs (Colab's T4). A CPU runs both, slowly, which is enough to check
their numbers against float32's.
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


def mixed_precision_copy(concept, precision):
    """The concept's Stable Diffusion, built again under `precision`, same weights."""
    float32_sd = concept["stable_diffusion"]
    mixed_sd = ti.build_stable_diffusion(
        RESOLUTION, concept["tokenizer"], random_weights=True, jit_compile=False,
        precision=precision,
    )  # fmt: skip
    mixed_sd._text_encoder = ti.extend_text_encoder(
        mixed_sd.text_encoder,
        ti.token_rows(float32_sd.text_encoder, [concept["placeholder_token_id"]]),
    )
    for part in ("text_encoder", "image_encoder", "diffusion_model"):
        getattr(mixed_sd, part).set_weights(getattr(float32_sd, part).get_weights())
    ti.freeze_models(mixed_sd)
    assert mixed_sd.diffusion_model.dtype_policy.name == precision
    return mixed_sd


def fixed_batch(concept):
    images = tf.constant(concept["images"][:1].astype("float32"))
    prompt = "a photo of a <my-funny-cat-token>"
    return images, tf.constant(ti.encode_prompt(concept["tokenizer"], prompt)[None])


def test_mixed_bfloat16_loss_equals_float32_loss(concept):
    images, token_ids = fixed_batch(concept)
    seeds = [1, 2]
    try:
        mixed_sd = mixed_precision_copy(concept, "mixed_bfloat16")
        mixed = fixed_batch_losses(
            mixed_sd, concept["placeholder_token_id"], images, token_ids, seeds
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
        # A second Stable Diffusion is ~4 GB: let it go before the next tests.
        mixed_sd = None
        gc.collect()
    reference = fixed_batch_losses(
        concept["stable_diffusion"], concept["placeholder_token_id"], images, token_ids, seeds
    )
    assert len(set(reference)) == len(seeds), "the seeds should give different examples"
    np.testing.assert_allclose(mixed, reference, rtol=RELATIVE_TOLERANCE)


def loss_and_unscaled_gradient(stable_diffusion, placeholder_token_id, images, token_ids):
    trainer = ti.build_trainer(stable_diffusion, [placeholder_token_id], 1e-4, seed=0)
    trainer.seed_generator.state.assign(np.array([1, 0], dtype="uint32"))
    ti.build_optimizer(trainer)  # a loss-scale optimizer has its scale once built
    loss, gradient = trainer.loss_and_gradient(images, token_ids)
    scale = 1.0
    if isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer):
        scale = float(trainer.optimizer.dynamic_scale)
    return float(loss), np.asarray(gradient)[0] / scale, scale


def test_mixed_float16_with_loss_scaling_gives_the_float32_loss_and_gradient(concept):
    images, token_ids = fixed_batch(concept)
    placeholder_token_id = concept["placeholder_token_id"]
    try:
        mixed_sd = mixed_precision_copy(concept, "mixed_float16")
        loss, gradient, scale = loss_and_unscaled_gradient(
            mixed_sd, placeholder_token_id, images, token_ids
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
        mixed_sd = None
        gc.collect()
    reference_loss, reference_gradient, _ = loss_and_unscaled_gradient(
        concept["stable_diffusion"], placeholder_token_id, images, token_ids
    )
    assert scale > 1  # the gradient was computed on a scaled loss
    np.testing.assert_allclose(loss, reference_loss, rtol=RELATIVE_TOLERANCE)
    cosine = gradient @ reference_gradient
    cosine /= np.linalg.norm(gradient) * np.linalg.norm(reference_gradient)
    assert cosine > 0.99
    np.testing.assert_allclose(
        np.linalg.norm(gradient), np.linalg.norm(reference_gradient), rtol=0.05
    )


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
