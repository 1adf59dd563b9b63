"""diffusers as the oracle for SD 2.x: one random full-size SD 2.x checkpoint in the
CompVis layout (its text encoder OpenCLIP ViT-H/14's, as the v2-1 release files hold
it), converted by diffusers' own single-file code and run by diffusers and transformers
(PyTorch, CPU), and built and loaded by `build_base_model` as `--base-model` does, into
KerasCV's V2 classes (`TextEncoderV2`, `DiffusionModelV2`, `download_weights=False`),
must give the same text encoding (the penultimate layer, then the final norm), VAE
posterior mean, UNet prediction and decoded image and, in the shipped trainer with the
text encoder extended from "cat", the same loss and placeholder gradient as diffusers'
textual-inversion step, for an epsilon model (SD 2.x 512-base) and a v-prediction one
(768-v). The checkpoint's diffusers folder holds the same weights, and `--base-model
FOLDER` loads them from it bit for bit.

Memory: this module runs last, once the session's SD 1.x models are released; as for
SD 1.x, the PyTorch references are computed first, in a process of their own; then the
KerasCV V2 models (5.2 GB in float32) are built in this one.
"""

import numpy as np
import pytest

import textual_inversion as ti
from diffusers_reference import LEARNING_RATE, NEW_TOKEN, TIMESTEP_STEP, TIMESTEP_UNET
from sd1x_checkpoint import ldm_spec, write_safetensors
from test_diffusers_oracle import DiffusersDraws, assert_one_sentence, compare, fingerprint
from test_diffusers_oracle import diffusers_references, k_moments, k_text, k_unet
from test_diffusers_oracle import oracle_inputs, trainer_step, weight_digest
from textual_inversion_extras import checkpoints, sd2x

RES = 128

# Tolerances, relative to the reference's max |value|, about 10x what was measured with this
# seed in float32 on an AMD EPYC (text 1.2e-6, VAE mean 3.6e-5, UNet 1.5e-4, decoder
# 8.4e-6, loss 7.8e-6, gradient 4.3e-4; with the velocity as target, loss 4.4e-5 and
# gradient 5.3e-4: the target holds the latents, and so the VAE's own difference; the
# test prints them). The text encoder is `sd2x.TextEncoderV2`, with OpenCLIP's exact GELU
# (with KerasCV's tanh approximation the text differed by 2.1e-4). float32 only: no
# bfloat16 kernel, so every CPU computes the same products.
TOL = {"text": 2e-5, "vae_mean": 2e-4, "unet": 2e-3, "decoded": 1e-4, "loss": 1e-4, "grad": 4e-3}
TOL["loss_v"], TOL["grad_v"] = 5e-4, TOL["grad"]


@pytest.fixture(scope="module")
def inputs():
    return oracle_inputs(context_width=1024)


@pytest.fixture(scope="module")
def sd1x_models_released(loaded_stable_diffusion):
    """This module runs last: the session's SD 1.x models go before the SD 2.x ones come."""
    import gc

    for part in ti.SD_PARTS:
        ti.set_part(loaded_stable_diffusion, part, None)
    gc.collect()


@pytest.fixture(scope="module")
def torch_ref(
    sd1x_models_released, sd2x_checkpoint, inputs, tmp_path_factory, checkpoint_command_line_run
):
    """diffusers' and transformers' outputs (tests/diffusers_reference.py --sd2), in a
    process of its own, and the diffusers folder it writes; once the command line's runs
    of the checkpoints have ended, as for the SD 1.x oracle."""
    checkpoint_command_line_run[1].wait(timeout=1500)
    return diffusers_references(
        sd2x_checkpoint, inputs, tmp_path_factory.mktemp("diffusers-sd2"), "--sd2"
    )


@pytest.fixture(scope="module")
def km(torch_ref, sd2x_checkpoint):
    """KerasCV's SD 2.x models at 128 px in float32, built and loaded from the checkpoint
    by `build_base_model`, as `--base-model` does, once the references are computed."""
    stable_diffusion = ti.build_base_model(
        RES, ti.build_tokenizer(), sd2x_checkpoint, jit_compile=False
    )
    yield stable_diffusion
    for part in ti.SD_PARTS:
        ti.set_part(stable_diffusion, part, None)


def test_build_base_model_builds_kerascvs_v2_classes_for_an_sd2_file(km):
    assert type(km.text_encoder).__name__ == "TextEncoderV2"
    assert type(km.diffusion_model).__name__ == "DiffusionModelV2"
    assert checkpoints.model_family(km) == "SD 2.x"


def test_the_sd2_text_encoders_layers_all_take_the_exact_gelu(km):
    activations = [
        layer.activation for layer in km.text_encoder.layers if hasattr(layer, "fc1")
    ]
    assert len(activations) == 23 and set(activations) == {sd2x.exact_gelu}


def test_the_weights_checked_before_building_sd2_models_are_those_they_take(km):
    expected = checkpoints.expected_weights(checkpoints.build_plan(km))
    assert checkpoints.family_weights("SD 2.x") == expected


def test_kerascvs_v2_models_take_every_weight_of_an_sd2_checkpoint_but_its_unused_ones(km):
    """All but OpenCLIP's last layer and its projection to the joint space, which
    SD 2.x does not use; each variable paired with one key."""
    variables = [v for name in ti.SD_PARTS for v in getattr(km, name).weights]
    unused = [
        shape
        for key, shape in ldm_spec(sd2=True).items()
        if ".resblocks.23." in key or key.endswith(("text_projection", "logit_scale"))
    ]
    used = sum(int(np.prod(s)) for s in ldm_spec(sd2=True).values()) - sum(
        int(np.prod(s)) for s in unused
    )
    assert sum(int(np.prod(v.shape)) for v in variables) == used


def test_the_sd2_text_encoder_encodes_as_transformers_does_with_the_penultimate_layer(
    km, torch_ref, inputs
):
    compare("text", k_text(km, inputs["prompt_ids"]), torch_ref["text"], TOL["text"])


def test_the_sd2_vae_encoder_gives_the_diffusers_posterior_mean(km, torch_ref, inputs):
    moments = k_moments(km, inputs["image"])
    compare("vae_mean", moments[..., :4], torch_ref["vae_mean"], TOL["vae_mean"])


def test_the_sd2_unet_predicts_what_diffusers_predicts(km, torch_ref, inputs):
    prediction = k_unet(km, inputs["latents"], TIMESTEP_UNET, inputs["context"])
    compare("unet", prediction, torch_ref["unet"], TOL["unet"])


def test_the_sd2_decoder_draws_the_image_diffusers_draws(km, torch_ref, inputs):
    decoded = km.decoder(inputs["latents"], training=False)
    compare("decoded", decoded, torch_ref["decoded"], TOL["decoded"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_training_step_on_sd2_gives_the_diffusers_loss_and_gradient(
    km, torch_ref, inputs, prediction_type
):
    """The shipped trainer, its text encoder extended by `extend_text_encoder` (a
    TextEncoderV2 with the 1024-wide row of "cat" appended); for a v-prediction model
    the target is the velocity, as diffusers' `get_velocity` gives it."""
    original = km.text_encoder
    cat_row = ti.token_rows(original, [inputs["cat_id"]])
    try:
        ti.set_part(km, "text_encoder", ti.extend_text_encoder(original, cat_row))
        ti.freeze_models(km)
        trainer = ti.build_trainer(
            km, [NEW_TOKEN], learning_rate=LEARNING_RATE, seed=0, trainer_class=DiffusersDraws,
            prediction_type=prediction_type,
        )  # fmt: skip
        trainer.use_draws(inputs["eps"], inputs["noise"], TIMESTEP_STEP)
        loss, gradient = trainer_step(trainer, inputs)
    finally:
        ti.set_part(km, "text_encoder", original)
    suffix = "_v" if prediction_type == "v_prediction" else ""
    assert gradient.shape == (1024,)
    loss_ref = np.array([torch_ref["loss" + suffix]])
    compare("loss" + suffix, np.array([loss]), loss_ref, TOL["loss" + suffix])
    compare("grad" + suffix, gradient, torch_ref["grad" + suffix], TOL["grad" + suffix])


def test_an_sd1_checkpoint_is_refused_for_sd2_models_in_one_sentence_and_changes_nothing(
    km, tmp_path
):
    path = str(tmp_path / "sd1x-header-only.safetensors")
    write_safetensors(path, {k: ("F16", s, None) for k, s in ldm_spec().items()}, sparse=True)
    before = fingerprint(km)
    with pytest.raises(ti.UserError, match="is an SD 1.x checkpoint .* SD 2.x checkpoint") as e:
        checkpoints.load_base_model(path, km)
    assert_one_sentence(str(e.value))
    assert fingerprint(km) == before


def weight_hashes(stable_diffusion):
    parts = [getattr(stable_diffusion, name) for name in ti.SD_PARTS]
    return [weight_digest(v) for part in parts for v in part.weights]


def test_loading_the_sd2_diffusers_folder_gives_the_models_the_weights_the_checkpoint_gave(
    km, torch_ref
):
    """`--base-model FOLDER` reads diffusers' layout: loaded over the checkpoint's weights,
    the folder diffusers wrote from it changes none of them, bit for bit."""
    before = weight_hashes(km)
    checkpoints.load_base_model(torch_ref["folder"], km)
    assert weight_hashes(km) == before
