"""diffusers as the oracle: one random full-size SD 1.x checkpoint, in the CompVis
layout, loaded into diffusers and transformers (PyTorch, CPU) and into KerasCV with
`build_base_model` (as `--base-model` does), must give the same text encoding, VAE
posterior, UNet prediction and decoded image. The textual-inversion step is the
script's own: `build_trainer` on those models, the text encoder extended from "cat" by
`extend_text_encoder`, its loss and placeholder gradient from `loss_and_gradient`, with
diffusers' random draws put in through the trainer's `standard_normal` and
`random_timesteps`. Bad files are refused in one sentence, and the command line trains
and draws on such a file.

Memory: the PyTorch references are computed first, in a process of their own
(tests/diffusers_reference.py); then the KerasCV models are built in this one. The
command line's run of the checkpoint (conftest.py) starts earlier, beside the other
command-line runs.
"""

import hashlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import textual_inversion as ti
from diffusers_reference import LEARNING_RATE, NEW_TOKEN, TIMESTEP_STEP, TIMESTEP_UNET
from sd1x_checkpoint import SEED, ldm_spec, write_safetensors
from textual_inversion_extras import checkpoints, saving, unet_backward
from textual_inversion_extras.keras_internals import all_sublayers

HERE = os.path.dirname(os.path.abspath(__file__))
RES = 128  # KerasCV models are built at 128 px: latents 16x16
PLACEHOLDER = "<my-funny-cat-token>"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt(sd1x_checkpoint):
    return sd1x_checkpoint


@pytest.fixture(scope="module")
def inputs():
    return oracle_inputs(context_width=768)


def oracle_inputs(context_width):
    """The oracle's prompts, image, latents, context (`context_width` wide) and draws."""
    tok = ti.build_tokenizer()
    placeholder_token_id, cat_id = ti.add_placeholder_token(tok, PLACEHOLDER, "cat")
    assert placeholder_token_id == NEW_TOKEN
    rng = np.random.default_rng(SEED + 1)

    def ids(text):
        return ti.encode_prompt(tok, text)[None]

    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    image = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)[None]
    image = (0.8 * image + 0.1 * rng.standard_normal(image.shape)).clip(-1, 1).astype(np.float32)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return dict(
        prompt_ids=ids("a photo of a cat sitting on a red mat"),
        step_ids=ti.encode_prompt(tok, f"a photo of {PLACEHOLDER}")[None],
        tokenizer=tok,
        cat_id=cat_id,
        image=image,
        latents=f(1, RES // 8, RES // 8, 4),
        context=f(1, 77, context_width),
        eps=f(1, RES // 8, RES // 8, 4),
        noise=f(1, RES // 8, RES // 8, 4),
    )


def timestep_embedding(t, dim=320):
    """KerasCV's input: cos then sin of t * 10000^(-i/160)."""
    freqs = np.exp(-math.log(10000) * np.arange(dim // 2) / (dim // 2))
    return np.concatenate([np.cos(t * freqs), np.sin(t * freqs)])[None].astype(np.float32)


@pytest.fixture(scope="module")
def torch_ref(ckpt, inputs, tmp_path_factory, checkpoint_command_line_run):
    """All reference outputs from diffusers/transformers (tests/diffusers_reference.py),
    computed in a process of its own, and the diffusers folder it writes. The command
    line's run of the checkpoint ends first (its test, last here, checks it): the two
    processes of full-size models would not fit side by side."""
    checkpoint_command_line_run[1].wait(timeout=1500)
    return diffusers_references(ckpt, inputs, tmp_path_factory.mktemp("diffusers"))


def diffusers_references(ckpt, inputs, folder, *options):
    """tests/diffusers_reference.py's outputs on `ckpt`, run in `folder`, and the path of
    the diffusers folder it writes, as out["folder"]."""
    arrays = {k: v for k, v in inputs.items() if k != "tokenizer"}
    np.savez(folder / "inputs.npz", **arrays)
    command = [
        sys.executable, os.path.join(HERE, "diffusers_reference.py"), ckpt,
        folder / "inputs.npz", folder / "model", folder / "outputs.npz", *options,
    ]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(folder / "outputs.npz") as saved:
        out = {name: saved[name] for name in saved.files}
    out["loss"] = float(out["loss"])
    out["folder"] = str(folder / "model")
    return out


@pytest.fixture(scope="module")
def km(torch_ref, loaded_stable_diffusion):
    """KerasCV's Stable Diffusion at 128 px, built and loaded as `--base-model` does it
    (`build_base_model`, nothing downloaded), once the references are computed."""
    return loaded_stable_diffusion


# ------------------------------------------------------------------ KerasCV side of each output
def k_text(km, ids, te=None):
    te = te or km.text_encoder
    import tensorflow as tf

    return te(
        [tf.constant(ids, tf.int32), tf.constant(np.arange(77, dtype=np.int32)[None])],
        training=False,
    )


def k_moments(km, image):
    """The VAE's mean and log-variance, from the encoder the trainer samples from."""
    return ti.latent_distribution_encoder(km.image_encoder)(image, training=False)


def k_unet(km, latents, t, context):
    import tensorflow as tf

    x = [tf.convert_to_tensor(a, tf.float32) for a in (latents, timestep_embedding(t), context)]
    return km.diffusion_model(x, training=False)


class DiffusersDraws(ti.StableDiffusionFineTuner):
    """The shipped trainer, with the random numbers diffusers drew: the posterior's
    epsilon, then the noise, then the timestep."""

    def use_draws(self, eps, noise, timestep):
        self.normal_draws = [eps, noise]
        self.timestep = timestep

    def standard_normal(self, shape):
        draw = self.normal_draws.pop(0)
        assert tuple(shape) == draw.shape, (shape, draw.shape)
        return draw

    def random_timesteps(self, shape):
        import tensorflow as tf

        return tf.fill(shape, tf.constant(self.timestep, "int32"))


@pytest.fixture
def fine_tuner(km, inputs):
    """The trainer of a run on the loaded checkpoint: `build_trainer` on the models of
    `--base-model`, the text encoder extended with `extend_text_encoder` from "cat",
    and diffusers' random draws; the plain text encoder is put back afterwards."""
    original = km.text_encoder
    km._text_encoder = ti.extend_text_encoder(original, ti.token_rows(original, [inputs["cat_id"]]))
    ti.freeze_models(km)
    trainer = ti.build_trainer(
        km, [NEW_TOKEN], learning_rate=LEARNING_RATE, seed=0, trainer_class=DiffusersDraws
    )
    trainer.use_draws(inputs["eps"], inputs["noise"], TIMESTEP_STEP)
    yield trainer
    km._text_encoder = original


def trainer_step(trainer, inputs):
    """The loss and the placeholder's gradient, as the trainer's `train_step` gets them."""
    import tensorflow as tf

    images, token_ids = tf.constant(inputs["image"]), tf.constant(inputs["step_ids"])
    loss, gradient = trainer.loss_and_gradient(images, token_ids)
    return float(loss), np.asarray(gradient)[0]


def compare(name, got, ref, tol_rel):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    max_abs = float(np.abs(got - ref).max())
    rel = max_abs / float(np.abs(ref).max())
    print(
        f"\n{name}: max|diff| {max_abs:.3g}, relative to max|ref| {rel:.3g} (tolerance {tol_rel:g})"
    )
    assert rel < tol_rel, f"{name}: {rel:.3g} >= {tol_rel:g}"


# Tolerances, relative to the reference's max |value|, ~10x above what was measured with this seed
# (rel: text 1.0e-6, VAE mean 1.9e-5, UNet 1.7e-4, decoder 8.2e-6, loss 9e-6, gradient 1.3e-4).
# Most of that is KerasCV's own arithmetic: its GEGLU uses tanh-approximated GELU, its
# GroupNorm epsilon is 1e-5 where the original VAE's is 1e-6.
# A wrongly mapped or untransposed weight moves these by 1e-2..1e0, far above the tolerances.
TOL = {"text": 2e-5, "vae_mean": 2e-4, "unet": 2e-3, "decoded": 1e-4, "loss": 1e-4, "grad": 2e-3}
# Adam's first step, relative to its largest component (about the learning rate):
# measured 2.2e-2 in float32 with XLA. Keras adds Adam's epsilon (1e-8) to sqrt(v),
# PyTorch to sqrt(v) / sqrt(1 - beta2), 32 times larger there: a component whose
# gradient is near 1e-5 moves a few percent less than in PyTorch. A lost update is off
# by 1, a wrong sign by 2.
TOL["update"] = 0.1
# In mixed_bfloat16 against diffusers in float32, measured on an AVX2-only AMD EPYC:
# loss 1.4e-3, gradient 3.8e-2 of its largest component. bfloat16 rounds each input of
# a product to 8 bits on every CPU; CPUs differ only in how they sum (in float32 with
# AVX-512 BF16 and AMX), which the UNet's tests bound at a few units in the last place
# of a layer's output. The bounds leave a factor of 5 or more. Adam's first step is
# about the learning rate times the gradient's sign, so a component whose gradient is
# near zero may flip: the update is compared in direction (a wrong or lost update has
# a cosine near 0 or below).
TOL_BF16 = {"loss": 1e-2, "grad": 0.2, "cosine": 0.99, "update_cosine": 0.9}


# ------------------------------------------------------------------ tests
def test_a_half_sd2_file_is_refused_from_the_command_line_before_anything_is_built(ckpt, tmp_path):
    """An SD 1.x file with an SD 2.x text encoder's embedding and context width."""
    path = str(tmp_path / "sd2.safetensors")
    write_safetensors(path, _bad("sd2", header_entries(ckpt)), sparse=True)
    with pytest.raises(ti.UserError, match="SD 2.x"):
        ti.parse_args(["--base-model", path])
    with pytest.raises(ti.UserError, match="exclude each other"):
        ti.parse_args(["--base-model", ckpt, "--random-weights"])


def test_the_four_models_hold_1130_variables_each_paired_with_one_key(km):
    counts = {
        n: len(getattr(km, n).weights)
        for n in ("text_encoder", "image_encoder", "decoder", "diffusion_model")
    }
    params = sum(int(np.prod(v.shape)) for n in counts for v in getattr(km, n).weights)
    assert counts == {
        "text_encoder": 196,
        "image_encoder": 108,
        "decoder": 140,
        "diffusion_model": 686,
    }
    assert params == sum(int(np.prod(s)) for s in ldm_spec().values())
    assert len(checkpoints.build_plan(km)) == 196 + 108 + 140 + 686


def test_the_text_encoder_encodes_as_transformers_does(km, torch_ref, inputs):
    compare("text", k_text(km, inputs["prompt_ids"]), torch_ref["text"], TOL["text"])


def test_the_vae_encoder_gives_the_diffusers_posterior_mean(km, torch_ref, inputs):
    moments = k_moments(km, inputs["image"])
    compare("vae_mean", moments[..., :4], torch_ref["vae_mean"], TOL["vae_mean"])
    scaled = km.image_encoder(
        inputs["image"], training=False
    )  # the model's own output: mean * 0.18215
    np.testing.assert_allclose(scaled, np.asarray(moments[..., :4]) * 0.18215, rtol=1e-5, atol=1e-6)


def test_the_unet_predicts_the_noise_diffusers_predicts(km, torch_ref, inputs):
    compare(
        "unet",
        k_unet(km, inputs["latents"], TIMESTEP_UNET, inputs["context"]),
        torch_ref["unet"],
        TOL["unet"],
    )


def test_the_decoder_draws_the_image_diffusers_draws(km, torch_ref, inputs):
    # the KerasCV decoder divides by 0.18215 itself; the reference got latents / 0.18215
    compare(
        "decoded",
        km.decoder(inputs["latents"], training=False),
        torch_ref["decoded"],
        TOL["decoded"],
    )


def assert_step_is_diffusers(loss, gradient, torch_ref):
    compare("loss", np.array([loss]), np.array([torch_ref["loss"]]), TOL["loss"])
    compare("grad", gradient, torch_ref["grad"], TOL["grad"])
    cosine = gradient @ torch_ref["grad"]
    cosine /= np.linalg.norm(gradient) * np.linalg.norm(torch_ref["grad"])
    assert cosine > 0.999


def test_the_training_step_gives_the_diffusers_loss_and_gradient(fine_tuner, torch_ref, inputs):
    assert_step_is_diffusers(*trainer_step(fine_tuner, inputs), torch_ref)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_with_the_unet_backward_the_script_uses_the_step_still_gives_diffusers_loss_and_gradient(
    gradient_checkpointing, fine_tuner, km, torch_ref, inputs
):
    """As the script trains on a CPU in float32: the VAE's and the UNet's group norms,
    attention in chunks and the fast input gradients, and with --gradient-checkpointing
    the UNet's blocks recomputed."""
    models = [km.image_encoder, km.decoder, km.diffusion_model]
    layers = [layer for model in models for layer in all_sublayers(model)]
    original_classes = {id(layer): layer.__class__ for layer in layers}
    try:
        unet_backward.speed_up_training(km, "float32", False, gradient_checkpointing)
        swapped = [layer for layer in layers if type(layer) is not original_classes[id(layer)]]
        assert len(swapped) > 250 + 32 + (38 if gradient_checkpointing else 0)
        # The group norms of the VAE encoder, which the step runs, are swapped too.
        fast_norm = unet_backward.FastGroupNormalization
        assert any(isinstance(layer, fast_norm) for layer in all_sublayers(km.image_encoder))
        loss, gradient = trainer_step(fine_tuner, inputs)
    finally:
        for layer in layers:
            layer.__class__ = original_classes[id(layer)]
    assert_step_is_diffusers(loss, gradient, torch_ref)


# ------------------------------------------------------------------ the traced step of `fit`
class RecordedDraws(DiffusersDraws):
    """Also keeps the placeholder's gradient of its last step, which `train_step` takes
    inside the traced function, in a variable the test reads."""

    def use_draws(self, eps, noise, timestep):
        super().use_draws(eps, noise, timestep)
        import tensorflow as tf

        self.draws_taken = 0
        zeros = tf.zeros(self.learned_embedding.shape)
        self.recorded_gradient = tf.Variable(zeros, trainable=False)

    def standard_normal(self, shape):
        """The two draws in turn: Keras may trace the step more than once."""
        draw = self.normal_draws[self.draws_taken % 2]
        self.draws_taken += 1
        assert tuple(shape) == draw.shape, (shape, draw.shape)
        return draw

    def loss_and_gradient(self, images, token_ids):
        loss, gradient = super().loss_and_gradient(images, token_ids)
        self.recorded_gradient.assign(gradient)
        return loss, gradient


def traced_training_step(stable_diffusion, inputs, precision, jit_compile):
    """One step of `fit`'s traced `train_step` (`train_on_batch`: the loss, the masked
    gradient, Adam's update, the vector written into the matrix), on the models as
    `main` prepares them for this precision and XLA setting, with diffusers' draws.
    Returns the loss, the gradient, the vector before and after the step, and its row
    in the matrix."""
    import tensorflow as tf

    models = [getattr(stable_diffusion, name) for name in ti.SD_PARTS[1:]]
    layers = [layer for model in models for layer in all_sublayers(model)]
    original_classes = {id(layer): layer.__class__ for layer in layers}
    original_encoder = stable_diffusion.text_encoder
    cat_row = ti.token_rows(original_encoder, [inputs["cat_id"]])
    start = np.asarray(cat_row[0])
    try:
        extended = ti.extend_text_encoder(original_encoder, cat_row)
        ti.set_part(stable_diffusion, "text_encoder", extended)
        ti.freeze_models(stable_diffusion)
        unet_backward.speed_up_training(stable_diffusion, precision, jit_compile, False)
        trainer = ti.build_trainer(
            stable_diffusion, [NEW_TOKEN], learning_rate=LEARNING_RATE, seed=0,
            jit_compile=jit_compile, trainer_class=RecordedDraws,
        )  # fmt: skip
        assert trainer.jit_compile is jit_compile  # Keras did not turn XLA off
        trainer.use_draws(inputs["eps"], inputs["noise"], TIMESTEP_STEP)
        logs = trainer.train_on_batch(
            tf.constant(inputs["image"]), tf.constant(inputs["step_ids"]), return_dict=True
        )
        row = ti.token_rows(stable_diffusion.text_encoder, [NEW_TOKEN])[0]
        return (
            float(logs["step_loss"]), trainer.recorded_gradient.numpy()[0],
            start, trainer.learned_embedding.numpy()[0], np.asarray(row),
        )  # fmt: skip
    finally:
        for layer in layers:
            layer.__class__ = original_classes[id(layer)]
        ti.set_part(stable_diffusion, "text_encoder", original_encoder)


def cosine_of(a, b):
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    print(f"\ncosine {cosine:.6f}")
    return cosine


def assert_update_is_diffusers(start, vector, row, torch_ref, tolerance):
    """Adam's step from `start` (cat's row) against the example's AdamW step, relative
    to the update's largest component, and the matrix's row is the vector. The first
    step moves each component by about the learning rate, whatever the gradient's size:
    a lost update or a wrong sign is off by a relative 1 or 2."""
    np.testing.assert_array_equal(row, vector)
    compare("update", vector - start, torch_ref["vector_after_step"] - start, tolerance)


def test_compiled_with_xla_the_traced_step_gives_diffusers_loss_gradient_and_update(
    km, torch_ref, inputs
):
    """As `--xla on` trains (and `--xla auto` on a GPU), in float32: one XLA program for
    the step, the script's swapped layers inside it."""
    loss, gradient, start, vector, row = traced_training_step(km, inputs, "float32", True)
    assert_step_is_diffusers(loss, gradient, torch_ref)
    assert_update_is_diffusers(start, vector, row, torch_ref, TOL["update"])


@pytest.fixture(scope="module")
def mixed_bfloat16_models(ckpt, inputs, torch_ref):
    """The checkpoint built as `--precision mixed_bfloat16` builds it, for the two tests
    that follow (then released with the module)."""
    return ti.build_base_model(
        RES, inputs["tokenizer"], ckpt, jit_compile=False, precision="mixed_bfloat16"
    )


def test_under_mixed_bfloat16_the_frozen_models_hold_their_weights_in_bfloat16(
    mixed_bfloat16_models,
):
    """No cast of a billion weights at every step: the VAE and the UNet are stored in
    bfloat16; the text encoder, which holds the learned row, in float32."""
    dtypes = {
        part: {weight.dtype for weight in getattr(mixed_bfloat16_models, part).weights}
        for part in ti.SD_PARTS
    }
    assert dtypes == {
        "text_encoder": {"float32"},
        "image_encoder": {"bfloat16"},
        "diffusion_model": {"bfloat16"},
        "decoder": {"bfloat16"},
    }


def test_in_mixed_bfloat16_with_attention_in_chunks_the_traced_step_gives_diffusers_results(
    mixed_bfloat16_models, torch_ref, inputs, monkeypatch
):
    """As `--precision auto` trains on a CPU with bfloat16 arithmetic, against diffusers
    in float32. At 128 px no attention is large enough to be chunked, so the chunks are
    made 64 queries: the 16x16 latents' self-attention runs in 4, and the backward
    recomputes the softmax of 3. On a CPU with bfloat16 arithmetic the step also takes
    the fast input gradients of the UNet's convolutions, as the script does."""
    monkeypatch.setattr(unet_backward, "ATTENTION_CHUNK_SCORES", 64 * 256)
    fast_gradients = []
    speed_up = unet_backward.speed_up_training

    def recorded_speed_up(stable_diffusion, *args):
        speed_up(stable_diffusion, *args)
        layers = all_sublayers(stable_diffusion.diffusion_model)
        fast = unet_backward.FastGradientConv2D
        fast_gradients.append(any(isinstance(layer, fast) for layer in layers))

    monkeypatch.setattr(unet_backward, "speed_up_training", recorded_speed_up)
    chunks = []
    attend = unet_backward.attention_in_query_chunks

    def recorded(query, key, value, scale, chunk=None):
        chunks.append((query.shape[2], chunk))
        return attend(query, key, value, scale, chunk)

    monkeypatch.setattr(unet_backward, "attention_in_query_chunks", recorded)
    loss, gradient, start, vector, row = traced_training_step(
        mixed_bfloat16_models, inputs, "mixed_bfloat16", False
    )
    assert (256, 64) in chunks
    assert fast_gradients == [unet_backward.fast_gradients_apply("mixed_bfloat16", False)]
    compare("loss", np.array([loss]), np.array([torch_ref["loss"]]), TOL_BF16["loss"])
    compare("grad", gradient, torch_ref["grad"], TOL_BF16["grad"])
    assert cosine_of(gradient, torch_ref["grad"]) > TOL_BF16["cosine"]
    np.testing.assert_array_equal(row, vector)
    update, reference_update = vector - start, torch_ref["vector_after_step"] - start
    assert cosine_of(update, reference_update) > TOL_BF16["update_cosine"]


# ------------------------------------------------------------------ refusals
def header_entries(path):
    return {
        k: (dt, shape, None) for k, (dt, shape, _) in checkpoints.safetensors_header(path).items()
    }


def fingerprint(km):
    return [
        float(np.abs(v.numpy()).sum())
        for m in (km.text_encoder, km.decoder)
        for v in m.weights[-2:]
    ]


def _bad(kind, entries):
    e = dict(entries)
    u, t = "model.diffusion_model.", "cond_stage_model.transformer.text_model."
    if kind == "sd2":  # OpenCLIP text encoder, 1024-wide cross-attention context
        e = {k: v for k, v in e.items() if not k.startswith("cond_stage_model.")}
        e["cond_stage_model.model.token_embedding.weight"] = ("F16", (49408, 1024), None)
        for k, (dt, s, f) in list(e.items()):
            if re.search(r"attn2\.to_[kv]\.weight$", k):
                e[k] = (dt, (s[0], 1024), f)
    elif kind == "sd2_width_only":  # only the cross-attention width betrays it
        for k, (dt, s, f) in list(e.items()):
            if re.search(r"attn2\.to_[kv]\.weight$", k):
                e[k] = (dt, (s[0], 1024), f)
    elif kind == "sdxl":
        e = {k: v for k, v in e.items() if not k.startswith("cond_stage_model.")}
        e["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (
            "F16",
            (49408, 768),
            None,
        )
        e[u + "label_emb.0.0.weight"] = ("F16", (1280, 2816), None)
    elif kind == "inpainting":
        e[u + "input_blocks.0.0.weight"] = ("F16", (320, 9, 3, 3), None)
    elif kind == "missing":
        del e[u + "output_blocks.5.2.conv.weight"]
    elif kind == "wrong_shape":
        e[t + "encoder.layers.11.mlp.fc2.weight"] = ("F16", (768, 3000), None)
    elif kind == "wrong_dtype":
        e[u + "out.2.bias"] = ("I64", (4,), None)
    return e


BAD = [
    "sd2",
    "sd2_width_only",
    "sdxl",
    "inpainting",
    "missing",
    "wrong_shape",
    "wrong_dtype",
    "truncated",
    "ckpt",
    "not_safetensors",
    "lora",
]


def write_bad_file(kind, ckpt, folder):
    """A file of `kind` made from the checkpoint's header (sparse: no data written)."""
    path = str(folder / f"{kind}.safetensors")
    if kind == "truncated":
        write_safetensors(path, header_entries(ckpt), sparse=True, cut=4096)
    elif kind == "ckpt":
        import torch

        path = str(folder / "model.ckpt")
        torch.save({"state_dict": {"x": torch.zeros(2)}}, path)
    elif kind == "not_safetensors":
        with open(path, "wb") as f:
            f.write(b"\xff" * 64)
    elif kind == "lora":
        write_safetensors(path, {"lora_unet_down_blocks_0.alpha": ("F32", (), None)}, sparse=True)
    else:
        write_safetensors(path, _bad(kind, header_entries(ckpt)), sparse=True)
    return path


def assert_one_sentence(message):
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.;]\s+[A-Z]", message), message


@pytest.mark.parametrize("kind", BAD)
def test_a_file_that_is_not_sd1x_is_refused_in_one_sentence_and_changes_nothing(
    kind, km, ckpt, tmp_path
):
    before = fingerprint(km)
    path = write_bad_file(kind, ckpt, tmp_path)
    with pytest.raises(ti.UserError) as e:
        checkpoints.load_base_model(path, km)
    msg = str(e.value)
    print(f"\n{kind}: {msg}")
    assert_one_sentence(msg)
    assert fingerprint(km) == before  # refused before any variable was touched
    if kind == "ckpt":
        assert "safetensors" in msg and "pickle" in msg


def refused_before_building(monkeypatch, tmp_path, base_model):
    """The refusal of `main` with --base-model, while building a model fails the test."""

    def build_base_model(*args, **kwargs):
        pytest.fail("a model was built before the base model was refused")

    monkeypatch.setattr(ti, "build_base_model", build_base_model)
    argv = ["--base-model", base_model, "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ti.UserError) as refusal:
        ti.main(argv)
    assert_one_sentence(str(refusal.value))
    assert base_model in str(refusal.value)
    return str(refusal.value)


@pytest.mark.parametrize("kind", BAD)
def test_a_file_that_is_not_sd1x_is_refused_by_the_command_line_before_any_model_is_built(
    kind, ckpt, tmp_path, monkeypatch
):
    """From the header alone, checked against sd1x_weights.json or sd2x_weights.json (the next test)."""
    refused_before_building(monkeypatch, tmp_path, write_bad_file(kind, ckpt, tmp_path))


def test_the_weights_checked_before_building_are_those_the_models_take(km):
    expected = checkpoints.expected_weights(checkpoints.build_plan(km))
    assert checkpoints.family_weights("SD 1.x") == expected


def test_a_diffusers_folder_missing_a_part_or_of_sdxl_is_refused_before_any_model_is_built(
    torch_ref, tmp_path, monkeypatch
):
    folder = torch_ref["folder"]
    without_vae = tmp_path / "without-vae"
    without_vae.mkdir()
    for part in ("unet", "text_encoder"):
        (without_vae / part).symlink_to(os.path.join(folder, part))
    message = refused_before_building(monkeypatch, tmp_path, str(without_vae))
    assert "has no vae/*.safetensors" in message
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (sdxl / part).symlink_to(os.path.join(folder, "text_encoder" if part[-1] == "2" else part))
    assert "is an SDXL model" in refused_before_building(monkeypatch, tmp_path, str(sdxl))


def test_a_base_model_path_that_does_not_exist_is_refused_with_what_to_give(tmp_path, monkeypatch):
    message = refused_before_building(monkeypatch, tmp_path, str(tmp_path / "v1-5.safetensors"))
    assert "does not exist" in message and "diffusers folder" in message


# ------------------------------------------------------------------ diffusers folder
def weight_digest(variable):
    """A variable's bytes, hashed where they lie (no copy of a 3 GB UNet's weights)."""
    return hashlib.sha1(np.ascontiguousarray(variable.numpy()).data).hexdigest()


def test_a_diffusers_folder_loads_the_weights_of_the_single_file(km, ckpt, torch_ref):
    folder = torch_ref["folder"]
    a, b = checkpoints.read_source(ckpt), checkpoints.read_source(folder)
    plan = checkpoints.build_plan(km)
    # The same LDM names, from the headers alone (VAE attention: Linear in diffusers);
    # that their tensors are the same, the load below shows.
    for _, key, _ in plan:
        assert np.prod(a[key][3]) == np.prod(b[key][3]), key
    digest = lambda: [weight_digest(v) for v, _, _ in plan]
    want = digest()
    for v, _, _ in plan:  # make sure the folder load really writes every variable
        v.assign(np.zeros(v.shape, v.dtype))
    info = checkpoints.load_base_model(folder, km)
    assert digest() == want and info["format"] == "diffusers"


def test_the_short_hash_reads_the_size_and_the_first_and_last_megabyte_only(tmp_path):
    """So that naming a 4 GB checkpoint in the embedding's metadata reads 2 MB of it: a
    byte changed in the middle keeps the hash; one in the first or the last MB, or
    another size, changes it."""
    path = tmp_path / "model.safetensors"
    size = 5 << 20
    path.write_bytes(bytes(size))
    original = checkpoints.short_hash(str(path))
    assert re.fullmatch(r"[0-9a-f]{10}", original) and checkpoints.short_hash(str(path)) == original

    def hash_with_byte_set(offset):
        data = bytearray(size)
        data[offset] = 1
        path.write_bytes(bytes(data))
        return checkpoints.short_hash(str(path))

    assert hash_with_byte_set(size // 2) == original
    assert hash_with_byte_set(10) != original
    assert hash_with_byte_set(size - 10) != original
    path.write_bytes(bytes(size + 1))
    assert checkpoints.short_hash(str(path)) != original


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float16_bfloat16_and_float32_tensors_read_exactly(dtype, tmp_path):
    import torch
    from safetensors.torch import save_file

    w = torch.randn(3, 5).to(getattr(torch, dtype))
    path = str(tmp_path / "w.safetensors")
    save_file({"w": w}, path)
    ((f, key, dt, shape, span),) = checkpoints.read_source(path).values()
    np.testing.assert_array_equal(
        checkpoints.read_tensor(f, key, dt, shape, span), w.float().numpy()
    )


def test_the_command_line_trains_and_draws_on_an_sd1x_file(ckpt, checkpoint_command_line_run):
    """It waits for the run, which started with the suite's other command-line runs: it
    trains, saves and draws its final images. (`tools/generate.py` draws on the SD 2.x
    file: test_sd2x_command_line.py.)"""
    folder, process = checkpoint_command_line_run
    process.wait(timeout=1500)
    train_log = (folder / "train.log").read_text()
    assert (folder / "sd1.status").read_text().strip() == "0", train_log[-3000:]
    assert f"Loading the SD 1.x base model {ckpt}" in train_log
    metadata = saving.load_embedding(str(folder / "run" / saving.EMBEDDING_FILE)).metadata
    assert (
        metadata["base_model"]
        == f"sd1x-random.safetensors (short sha256 {checkpoints.short_hash(ckpt)})"
    )
    assert len(os.listdir(folder / "run" / "final")) == len(ti.FINAL_PROMPTS)
