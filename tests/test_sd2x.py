"""What SD 2.x changes besides its weights (textual_inversion_extras/sd2x.py): prompts
padded with 0, what `--prediction-type auto` takes from the model, and a sampler that
follows the prediction type. Mechanics, on header-only files and on stand-in models;
the arithmetic against diffusers is in test_sd2x_oracle.py."""

import json
import math

import keras
import keras_cv
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

import textual_inversion as ti
from sd1x_checkpoint import ldm_spec, write_safetensors
from test_diffusers_oracle import assert_one_sentence
import stand_ins
from textual_inversion_extras import sd2x, unet_backward
from textual_inversion_extras.hardware import global_dtype_policy

START, END = 49406, 49407  # CLIP's start- and end-of-text tokens


@pytest.fixture(scope="module")
def sd2x_header_only(tmp_path_factory):
    """An SD 2.x checkpoint's header, every weight's key, shape and dtype, and no data."""
    path = str(tmp_path_factory.mktemp("sd2x") / "v2-1_512-header-only.safetensors")
    write_safetensors(path, {k: ("F16", s, None) for k, s in ldm_spec(sd2=True).items()}, sparse=True)
    return path


def test_the_command_line_pads_an_sd2_models_prompts_with_zero(sd2x_header_only, tmp_path):
    args = ti.parse_args(["--base-model", sd2x_header_only, "--output-dir", str(tmp_path)])
    tokenizer = ti.CommandLineRun(args).build_tokenizer()
    token_ids = ti.encode_prompt(tokenizer, "a photo of a cat")
    end = list(token_ids).index(END)
    assert token_ids[0] == START and end == 6  # 5 words
    assert set(token_ids[end + 1 :]) == {sd2x.PAD_TOKEN_ID}


def test_the_command_line_pads_an_sd1_models_prompts_with_end_of_text(tmp_path):
    tokenizer = ti.CommandLineRun(ti.parse_args(["--output-dir", str(tmp_path)])).build_tokenizer()
    token_ids = ti.encode_prompt(tokenizer, "a photo of a cat")
    assert set(token_ids[6:]) == {END}


@pytest.mark.parametrize(
    "name, resolution, expected",
    [
        ("v2-1_768-ema-pruned.safetensors", 512, "v_prediction"),
        ("v2-1_512-ema-pruned.safetensors", 512, "epsilon"),
        ("my-sd2-finetune.safetensors", 768, "v_prediction"),
        ("my-sd2-finetune.safetensors", 512, "epsilon"),
    ],
)
def test_auto_prediction_type_of_an_sd2_file_follows_its_name_and_the_resolution(
    name, resolution, expected, tmp_path
):
    found, _ = sd2x.prediction_type("auto", str(tmp_path / name), "SD 2.x", resolution)
    assert found == expected


@pytest.mark.parametrize("parameterization, expected", [("v", "v_prediction"), ("eps", "epsilon")])
def test_auto_prediction_type_follows_a_yaml_beside_the_file(parameterization, expected, tmp_path):
    """AUTOMATIC1111's convention: `model.yaml` beside `model.safetensors`, whose name
    would say otherwise here."""
    (tmp_path / "sd2-768.yaml").write_text(
        "model:\n  params:\n    parameterization: \"%s\"\n    linear_start: 0.00085\n" % parameterization
    )
    found, why = sd2x.prediction_type("auto", str(tmp_path / "sd2-768.safetensors"), "SD 2.x", 512)
    assert found == expected and "sd2-768.yaml" in why


def test_auto_prediction_type_of_a_diffusers_folder_is_its_schedulers(tmp_path):
    (tmp_path / "scheduler").mkdir()
    config = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert sd2x.prediction_type("auto", str(tmp_path), "SD 2.x", 512)[0] == "v_prediction"


def test_an_sd1_model_predicts_the_noise_and_v_prediction_for_it_is_refused():
    assert sd2x.prediction_type("auto", "v1-5-768.safetensors", "SD 1.x", 768)[0] == "epsilon"
    with pytest.raises(ti.UserError, match="leave the flag out") as refusal:
        sd2x.prediction_type("v_prediction", "v1-5.safetensors", "SD 1.x", 512)
    assert_one_sentence(str(refusal.value))


# ------------------------------------------------------------------ the sampler
class RecordingTextEncoder:
    """Stands in for TextEncoderV2: records the tokens it is given."""

    def __init__(self):
        self.tokens = []

    def predict_on_batch(self, inputs):
        self.tokens.append(np.asarray(inputs[0])[0].tolist())
        return np.zeros((1, ti.MAX_PROMPT_LENGTH, 1024), "float32")


class PerfectUNet:
    """Predicts, for every noisy latent, exactly the noise (or the velocity) that would
    have made it from `target`; the test's timestep embedding carries alpha_bar."""

    def __init__(self, target, prediction_type):
        self.target, self.prediction_type = target, prediction_type

    def predict_on_batch(self, inputs):
        latent, timestep_embedding, _ = (np.asarray(x, "float64") for x in inputs)
        alpha_bar = timestep_embedding[0, 0]
        noise = (latent - math.sqrt(alpha_bar) * self.target) / math.sqrt(1 - alpha_bar)
        if self.prediction_type == "epsilon":
            return noise
        return math.sqrt(alpha_bar) * noise - math.sqrt(1 - alpha_bar) * self.target


class LatentsAsImage:
    """Stands in for the decoder: the latents' first three channels are the image."""

    def predict_on_batch(self, latent):
        return np.asarray(latent)[..., :3]


def stand_in_sd2(unet, text_encoder=None):
    stable_diffusion = sd2x.StableDiffusion2x(128, 128, prediction_type=unet.prediction_type)
    ti.set_part(stable_diffusion, "tokenizer", ti.build_tokenizer())
    ti.set_part(stable_diffusion, "text_encoder", text_encoder or RecordingTextEncoder())
    ti.set_part(stable_diffusion, "diffusion_model", unet)
    ti.set_part(stable_diffusion, "decoder", LatentsAsImage())
    stable_diffusion._get_timestep_embedding = lambda timestep, batch_size: np.full(
        (batch_size, 320), _ALPHAS_CUMPROD[timestep]
    )
    return stable_diffusion


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_sd2_sampler_draws_what_a_perfect_unet_of_either_prediction_type_denoises_to(
    prediction_type,
):
    """DDIM with a perfect prediction lands on its target, whatever the schedule: read as
    noise, a velocity would land elsewhere."""
    target = np.random.default_rng(0).uniform(-0.9, 0.9, (1, 16, 16, 4))
    stable_diffusion = stand_in_sd2(PerfectUNet(target, prediction_type))
    images = stable_diffusion.text_to_image("a photo", num_steps=5, seed=1)
    expected = np.clip((target[..., :3] + 1) / 2 * 255, 0, 255)
    assert np.abs(images.astype("float64") - expected).max() <= 1.0


def test_the_sd2_sampler_pads_the_prompt_and_the_unconditional_prompt_with_zero():
    text_encoder = RecordingTextEncoder()
    unet = PerfectUNet(np.zeros((1, 16, 16, 4)), "epsilon")
    stand_in_sd2(unet, text_encoder).text_to_image("a photo", num_steps=1, seed=1)
    prompt, unconditional = text_encoder.tokens
    assert prompt[:4] == [START, 320, 1125, END] and set(prompt[4:]) == {sd2x.PAD_TOKEN_ID}
    assert unconditional[:2] == [START, END] and set(unconditional[2:]) == {sd2x.PAD_TOKEN_ID}


# ------------------------------------------------------------------ precision
def attention_with_identity_weights(layer_class, dtype):
    """KerasCV's attention layer of SD 2.x's head size, 2 heads, in `dtype`, whose
    projections are the identity: the scores are the tokens' own dot products."""
    with global_dtype_policy(dtype):
        layer = layer_class(num_heads=2, head_size=64)
    layer(np.zeros((1, 4, 128), "float32"))  # builds it
    for projection in (layer.to_q, layer.to_k, layer.to_v, layer.out_proj):
        projection.kernel.assign(np.eye(128))
    layer.out_proj.bias.assign(np.zeros(128))
    return layer


def test_under_float16_sd2s_attention_computes_in_float32_where_float16_overflows():
    """Tokens of +-100: a token's score with itself is 64 x 100^2 / 8 = 80,000 (float16's
    largest number is 65,504), so the chunked attention in float16 gives inf and NaN. In
    float32 each token attends to itself alone, and the output is the input."""
    tokens = 100 * np.sign(np.random.default_rng(0).standard_normal((1, 16, 128)))
    tokens = tokens.astype("float32")
    layer = attention_with_identity_weights(unet_backward.ChunkedCrossAttention, "float16")
    in_float16 = ops.convert_to_numpy(layer(tokens))
    unet = keras.Sequential([keras.layers.Input((16, 128)), layer])
    assert unet_backward.use_float32_attention(unet) == 1
    upcast = layer(tokens)
    assert not np.isfinite(in_float16).all()
    assert upcast.dtype == "float16"
    np.testing.assert_array_equal(ops.convert_to_numpy(upcast), tokens)


def test_under_float16_sd2s_attention_passes_back_a_finite_gradient_where_float16_overflows():
    tokens = 100 * np.sign(np.random.default_rng(0).standard_normal((1, 16, 128)))
    tokens = tf.constant(tokens, "float32")
    layer = attention_with_identity_weights(unet_backward.ChunkedCrossAttention, "float16")
    unet_backward.use_float32_attention(keras.Sequential([keras.layers.Input((16, 128)), layer]))
    with tf.GradientTape() as tape:
        tape.watch(tokens)
        total = tf.reduce_sum(tf.cast(layer(tokens), "float32") * tokens / 1e4)
    gradient = tape.gradient(total, tokens).numpy()
    assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0


class UNetWithOneAttention(keras.Model):
    """Where `build_models` builds the UNet: a model with one KerasCV attention layer."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.attention = unet_backward.CrossAttention(num_heads=2, head_size=64)


@pytest.mark.parametrize(
    "family, precision, in_float32",
    [("SD 2.x", "mixed_float16", True), ("SD 2.x", "mixed_bfloat16", False),
     ("SD 2.x", "float32", False), ("SD 1.x", "mixed_float16", False)],
)  # fmt: skip
def test_build_models_computes_attention_in_float32_for_sd2_under_float16_alone(
    family, precision, in_float32, monkeypatch
):
    sd_models = keras_cv.models.stable_diffusion
    monkeypatch.setattr(sd2x, "DiffusionModelV2", UNetWithOneAttention)
    monkeypatch.setattr(sd_models, "DiffusionModel", UNetWithOneAttention)
    monkeypatch.setattr(sd_models, "TextEncoder", stand_ins.text_encoder)
    monkeypatch.setattr(sd2x, "TextEncoderV2", stand_ins.text_encoder)
    monkeypatch.setattr(sd_models, "ImageEncoder", stand_ins.image_encoder)
    monkeypatch.setattr(sd_models, "Decoder", stand_ins.decoder)
    stable_diffusion = ti.build_models(128, None, True, False, precision, family)
    attention = stable_diffusion.diffusion_model.attention
    assert getattr(attention, "in_float32", False) is in_float32
    if in_float32:
        assert attention.compute_dtype == "float16"


def test_auto_precision_takes_float16_for_sd2_as_for_sd1_on_a_gpu_without_bfloat16(monkeypatch):
    """Its attention is then computed in float32 (above), so float16 trains SD 2.x."""
    from textual_inversion_extras import hardware

    monkeypatch.setattr(hardware, "gpu_facts", lambda: ("Tesla T4", (7, 5)))
    assert hardware.resolve_precision("auto") == "mixed_float16"


def test_mixed_float16_for_an_sd2_model_is_accepted(sd2x_header_only, tmp_path):
    argv = ["--base-model", sd2x_header_only, "--precision", "mixed_float16"]
    args = ti.parse_args([*argv, "--output-dir", str(tmp_path)])
    assert (args.base_model_family, args.precision) == ("SD 2.x", "mixed_float16")
