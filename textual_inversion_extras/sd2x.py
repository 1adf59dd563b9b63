"""Stable Diffusion 2.x, once `checkpoints.py` has loaded its weights into KerasCV's V2
classes: what else differs from SD 1.x.

- **Padding.** SD 2.x's OpenCLIP tokenizer pads a prompt with token 0 (`"!"`, the pad
  token of diffusers' SD 2.x tokenizer too) after its end-of-text token, where SD 1.x's
  CLIP pads with end-of-text. The text encoder's causal mask keeps the prompt's own
  tokens the same either way, but the UNet attends to all 77 outputs.
- **What the UNet predicts.** The 512-base models predict the noise (epsilon), as SD 1.x
  does; the 768-v models predict the velocity `v = sqrt(alpha_bar) * noise -
  sqrt(1 - alpha_bar) * latents` (Salimans and Ho, 2022). The trainer's loss then has the
  velocity as its target (`velocity`), and the sampler turns the prediction back into
  noise before its DDIM step (`StableDiffusion2x`).
- **GELU.** OpenCLIP's text encoder uses the exact GELU; KerasCV's `TextEncoderV2`
  computes the tanh approximation (`ops.gelu`'s default), which moves its encoding by
  about 2e-4 of its largest value (against transformers). `TextEncoderV2` here is
  KerasCV's with the exact one.
- **Which one a file is** is not in its weights: `prediction_type` takes it from a
  diffusers folder's scheduler configuration, from an AUTOMATIC1111-style `.yaml` beside
  a single file, or else from the file's name and the resolution, as diffusers' own
  conversion does (768 px means v).
"""

import json
import math
import os
import re

import keras
import keras_cv
import numpy as np
from keras import ops
from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD
# KerasCV's SD 2.x UNet, which keras_cv.models does not export.
from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModelV2  # noqa: F401
from keras_cv.src.models.stable_diffusion.text_encoder import CLIPEncoderLayer

from textual_inversion_extras.errors import UserError

PAD_TOKEN_ID = 0
MAX_PROMPT_LENGTH = 77
PREDICTION_TYPES = ["auto", "epsilon", "v_prediction"]


def exact_gelu(x):
    return ops.gelu(x, approximate=False)


class TextEncoderV2(keras_cv.models.stable_diffusion.TextEncoderV2):
    """KerasCV's SD 2.x text encoder (the same layers and weights), with OpenCLIP's exact
    GELU in each encoder layer's feed-forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            if isinstance(layer, CLIPEncoderLayer):
                layer.activation = exact_gelu


def text_encoder_class(width):
    """The text encoder whose rows are `width` wide: SD 2.x's (1024) or SD 1.x's (768)."""
    return TextEncoderV2 if width == 1024 else keras_cv.models.stable_diffusion.TextEncoder


def velocity(alphas_cumprod, latents, noise, timesteps):
    """The 768-v models' target at `timesteps`: sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * latents."""
    alpha_bar = ops.reshape(ops.take(alphas_cumprod, timesteps), (-1, 1, 1, 1))
    alpha_bar = ops.cast(alpha_bar, latents.dtype)
    return ops.sqrt(alpha_bar) * noise - ops.sqrt(1.0 - alpha_bar) * latents


def noise_from_velocity(v, latents, alpha_bar):
    """The noise that a velocity prediction `v` at the noisy `latents` implies."""
    return math.sqrt(alpha_bar) * v + math.sqrt(1.0 - alpha_bar) * latents


def prediction_type(flag, base_model, family, resolution):
    """(`--prediction-type`, why): as given, or for `auto` from the model (see above)."""
    if flag == "v_prediction" and family != "SD 2.x":
        raise UserError(
            "--prediction-type v_prediction is for SD 2.x 768-v models, and this base model "
            "is SD 1.x, which predicts the noise; leave the flag out."
        )
    if flag != "auto":
        return flag, "given"
    if family != "SD 2.x":
        return "epsilon", "SD 1.x models predict the noise"
    scheduler_config = os.path.join(base_model, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_config):
        with open(scheduler_config) as f:
            found = json.load(f).get("prediction_type", "epsilon")
        return found, "the folder's scheduler/scheduler_config.json says so"
    yaml = os.path.splitext(base_model)[0] + ".yaml"
    if os.path.isfile(yaml):
        with open(yaml) as f:
            v = re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", f.read(), re.MULTILINE)
        return ("v_prediction" if v else "epsilon"), f"{os.path.basename(yaml)} beside it says so"
    if "768" in os.path.basename(os.path.normpath(base_model)):
        return "v_prediction", "the file's name has 768 in it (an SD 2.x 768-v model)"
    if resolution >= 768:
        return "v_prediction", "SD 2.x at 768 px is a 768-v model"
    return "epsilon", "an SD 2.x model at 512 px or less is a 512-base model"


def pad_prompt(token_ids):
    """A tokenized prompt (with its start- and end-of-text tokens) as SD 2.x pads it."""
    return list(token_ids) + [PAD_TOKEN_ID] * (MAX_PROMPT_LENGTH - len(token_ids))


class StableDiffusion2x(keras_cv.models.StableDiffusionV2):
    """KerasCV's StableDiffusionV2, drawing as SD 2.x does: prompts (and the empty
    unconditional prompt) padded with 0, and each step's prediction read as noise or as
    velocity (`prediction_type`), then KerasCV's DDIM step (eta 0) and classifier-free
    guidance. Its models are set by the caller (`set_part`)."""

    def __init__(self, img_height, img_width, jit_compile=False, prediction_type="epsilon"):
        super().__init__(img_height, img_width, jit_compile)
        self.prediction_type = prediction_type

    def encode_text(self, prompt):
        token_ids = self.tokenizer.encode(prompt)
        if len(token_ids) > MAX_PROMPT_LENGTH:
            raise UserError(
                f'The prompt "{prompt}" is {len(token_ids)} tokens long, more than the '
                f"{MAX_PROMPT_LENGTH} the text encoder takes; shorten it."
            )
        tokens = ops.convert_to_tensor([pad_prompt(token_ids)], dtype="int32")
        return self.text_encoder.predict_on_batch([tokens, self._get_pos_ids()])

    def _get_unconditional_context(self):
        return self.encode_text("")

    def predict_noise(self, latent, timestep_embedding, context, alpha_bar):
        prediction = self.diffusion_model.predict_on_batch([latent, timestep_embedding, context])
        if self.prediction_type == "v_prediction":
            return noise_from_velocity(prediction, latent, alpha_bar)
        return prediction

    def generate_image(
        self,
        encoded_text,
        negative_prompt=None,
        batch_size=1,
        num_steps=50,
        unconditional_guidance_scale=7.5,
        seed=None,
    ):
        context = self._expand_tensor(encoded_text, batch_size)
        if negative_prompt is None:
            unconditional = self._get_unconditional_context()
        else:
            unconditional = self.encode_text(negative_prompt)
        unconditional = self._expand_tensor(unconditional, batch_size)
        latent = np.asarray(self._get_initial_diffusion_noise(batch_size, seed))
        # KerasCV's timesteps and DDIM step, as its StableDiffusion draws SD 1.x.
        ratio = 999 / (num_steps - 1) if num_steps > 1 else 1000
        timesteps = (np.arange(num_steps) * ratio).round().astype(np.int64)
        progress_bar = keras.utils.Progbar(num_steps)
        for index in reversed(range(num_steps)):
            alpha_bar = _ALPHAS_CUMPROD[timesteps[index]]
            alpha_bar_prev = _ALPHAS_CUMPROD[timesteps[index - 1]] if index else 1.0
            t_emb = self._get_timestep_embedding(timesteps[index], batch_size)
            noise_unconditional = self.predict_noise(latent, t_emb, unconditional, alpha_bar)
            noise_conditional = self.predict_noise(latent, t_emb, context, alpha_bar)
            noise = noise_unconditional + unconditional_guidance_scale * (
                noise_conditional - noise_unconditional
            )
            predicted_latents = (latent - math.sqrt(1 - alpha_bar) * noise) / math.sqrt(alpha_bar)
            latent = math.sqrt(1 - alpha_bar_prev) * noise + math.sqrt(alpha_bar_prev) * predicted_latents
            latent = latent.astype("float32")
            progress_bar.update(num_steps - index)
        decoded = self.decoder.predict_on_batch(latent)
        return np.clip((np.asarray(decoded) + 1) / 2 * 255, 0, 255).astype("uint8")
