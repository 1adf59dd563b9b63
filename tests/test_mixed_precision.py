"""Mixed precision gives the float32 loss and gradient on a fixed batch.

mixed_bfloat16, what some CPUs compute fast, is checked on the full-size models against
diffusers in float32 (test_diffusers_oracle.py). mixed_float16, with Keras's loss
scaling, is the path of older GPUs (Colab's T4): its scaling and unscaling are
mechanics, checked here on the stand-in VAE and UNet beside KerasCV's text encoder (a
CPU computes float16 very slowly). Then how `--precision auto` chooses, and the other
hardware setting of a CPU run: the allocator keeps freed memory.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from textual_inversion_extras import hardware, saving
from conftest import RESOLUTION, python_in_a_process_of_its_own
from stand_ins import stand_in_models

# float16 keeps 11 bits of mantissa; with the loss scaled and unscaled, a relative
# error of 1% on a mean of thousands of squared errors is ample (bfloat16, with 8 bits,
# was measured within 0.01% to 0.4% of float32 on these models).
RELATIVE_TOLERANCE = 1e-2


def mixed_precision_copy(concept, precision):
    """The concept's Stable Diffusion, built again under `precision`, same weights."""
    float32_sd = concept["stable_diffusion"]
    mixed_sd = ti.build_models(
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
    return mixed_sd


def fixed_batch(concept):
    images = tf.constant(concept["images"][:1].astype("float32"))
    prompt = "a photo of a <my-funny-cat-token>"
    return images, tf.constant(ti.encode_prompt(concept["tokenizer"], prompt)[None])


def assert_same_gradient(gradient, reference_gradient):
    cosine = gradient @ reference_gradient
    cosine /= np.linalg.norm(gradient) * np.linalg.norm(reference_gradient)
    assert cosine > 0.99
    np.testing.assert_allclose(
        np.linalg.norm(gradient), np.linalg.norm(reference_gradient), rtol=0.05
    )


def loss_and_unscaled_gradient(stable_diffusion, placeholder_token_id, images, token_ids):
    trainer = ti.build_trainer(stable_diffusion, [placeholder_token_id], 1e-4, seed=0)
    trainer.seed_generator.state.assign(np.array([1, 0], dtype="uint32"))
    saving.build_optimizer(trainer)  # a loss-scale optimizer has its scale once built
    loss, gradient = trainer.loss_and_gradient(images, token_ids)
    scale = 1.0
    if isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer):
        scale = float(trainer.optimizer.dynamic_scale)
    return float(loss), np.asarray(gradient)[0] / scale, scale


def test_mixed_float16_with_loss_scaling_gives_the_float32_loss_and_gradient(concept):
    images, token_ids = fixed_batch(concept)
    placeholder_token_id = concept["placeholder_token_id"]
    reference_loss, reference_gradient, _ = loss_and_unscaled_gradient(
        concept["stable_diffusion"], placeholder_token_id, images, token_ids
    )
    with stand_in_models():
        float16_sd = mixed_precision_copy(concept, "mixed_float16")
    loss, gradient, scale = loss_and_unscaled_gradient(
        float16_sd, placeholder_token_id, images, token_ids
    )
    assert scale > 1  # the gradient was computed on a scaled loss
    np.testing.assert_allclose(loss, reference_loss, rtol=RELATIVE_TOLERANCE)
    assert_same_gradient(gradient, reference_gradient)


# --- --precision auto ------------------------------------------------------------------


def test_auto_precision_is_float32_on_a_cpu_without_bfloat16_arithmetic():
    precision, reason = hardware.choose_precision(None, {"avx2", "fma", "avx512f"})
    assert precision == "float32"
    assert "no bfloat16 arithmetic" in reason


def test_auto_precision_is_bfloat16_on_a_cpu_with_bfloat16_arithmetic():
    for flag in ("avx512_bf16", "amx_bf16"):
        precision, reason = hardware.choose_precision(None, {"avx2", flag})
        assert precision == "mixed_bfloat16" and flag in reason


def test_auto_precision_is_float16_with_loss_scaling_on_a_t4_and_bfloat16_on_an_a100():
    assert hardware.choose_precision(("Tesla T4", (7, 5)), set())[0] == "mixed_float16"
    assert hardware.choose_precision(("Tesla V100", (7, 0)), set())[0] == "mixed_float16"
    assert hardware.choose_precision(("NVIDIA A100", (8, 0)), set())[0] == "mixed_bfloat16"
    assert hardware.choose_precision(("Tesla K80", (3, 7)), {"amx_bf16"})[0] == "float32"


def test_an_explicit_precision_is_kept_as_given_and_silently(capsys):
    assert hardware.resolve_precision("mixed_float16") == "mixed_float16"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "flags, expected", [({"avx2", "fma"}, "float32"), ({"avx2", "amx_bf16"}, "mixed_bfloat16")]
)
def test_auto_precision_follows_this_cpus_flags_and_says_why(flags, expected, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "gpu_facts", lambda: None)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.resolve_precision("auto") == expected
    assert capsys.readouterr().out.startswith(f"--precision auto: {expected}, as ")


KEPT_MEMORY_CHECK = """
import resource, numpy as np
from textual_inversion_extras.hardware import keep_freed_memory

def page_faults_of_a_new_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 * 2**20, np.uint8)  # 64 MB, every page written
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults_of_a_new_block()
returned = page_faults_of_a_new_block()
assert keep_freed_memory()
page_faults_of_a_new_block()  # the heap grows once
print(returned, page_faults_of_a_new_block())
"""


def test_with_freed_memory_kept_a_freed_block_comes_back_without_the_kernel_mapping_it_again():
    """In a process of its own: the allocator's setting lasts as long as the process."""
    printed = python_in_a_process_of_its_own(KEPT_MEMORY_CHECK)
    returned, kept = map(int, printed.split())
    assert returned > 100 and kept == 0, (returned, kept)


def test_with_a_gpu_freed_memory_is_left_to_the_allocator_as_it_is():
    """In a process of its own, with a GPU faked: it refuses, and malloc keeps its settings."""
    script = (
        "from textual_inversion_extras import hardware\n"
        "hardware.gpu_facts = lambda: ('Tesla T4', (7, 5))\n"
        "print(hardware.keep_freed_memory())"
    )
    assert python_in_a_process_of_its_own(script).split()[-1] == "False"
