"""Small stand-ins for the text encoder, the VAE encoder, the UNet and the VAE decoder, for
the tests that check mechanics (saving, resuming, accumulation, several vectors, signals,
the command line's wiring) rather than arithmetic.

Each takes the inputs and gives the outputs of the KerasCV class it replaces, so that a
trainer builds and traces in seconds. The VAE and the UNet have about 100k parameters in
all instead of about a billion. The text encoder is KerasCV's CLIP text encoder cut to one
of its twelve layers, built from KerasCV's own CLIP layers: the new token's row, its
embedding lookup and its gradient are the real ones. The tokenizer is KerasCV's own.

In-process, `stand_in_models()` swaps them in where `build_models` builds the
models. As a program, this file runs a script with them swapped in:

    python tests/stand_ins.py [--two-devices] [--signal SIGKILL --after-step 3] \\
        textual_inversion.py --random-weights ...

`--two-devices` splits the CPU into two logical devices first (for --distribute);
`--signal NAME --after-step N` makes the script send itself that signal right after it
logs step N, so that the step a signal comes after is the same however busy the machine.
"""

import argparse
import contextlib
import os
import runpy
import signal
import sys

import keras

LATENT_SCALE = 0.18215  # the VAE's latent scaling, as KerasCV's encoder applies it
WIDTH = 32  # channels of the stand-ins' hidden layers


def image_encoder(download_weights=False):
    """KerasCV's `ImageEncoder`: images in [-1, 1] to latents of 1/8 the size; its
    second-to-last layer gives the mean and log-variance, its last the scaled mean."""
    return keras.Sequential(
        [
            keras.layers.Input((None, None, 3)),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="swish"),
            keras.layers.Conv2D(WIDTH, 3, strides=2, padding="same", activation="swish"),
            keras.layers.Conv2D(WIDTH, 3, strides=2, padding="same", activation="swish"),
            keras.layers.Conv2D(8, 1),  # mean and log-variance of the latents
            keras.layers.Lambda(lambda moments: moments[..., :4] * LATENT_SCALE),
        ],
        name="stand_in_image_encoder",
    )


def diffusion_model(img_height, img_width, max_text_length, download_weights=False):
    """KerasCV's `DiffusionModel`: [latents, timestep embedding, text context] to the
    predicted noise, with one cross-attention from the latents to the context, so that
    the loss has a gradient with respect to every token of the prompt."""
    context = keras.layers.Input((max_text_length, 768), name="context")
    timestep_embedding = keras.layers.Input((320,), name="timestep_embedding")
    latent = keras.layers.Input((img_height // 8, img_width // 8, 4), name="latent")

    timestep = keras.layers.Dense(WIDTH, activation="swish")(timestep_embedding)
    x = keras.layers.Conv2D(WIDTH, 3, padding="same")(latent)
    x = keras.layers.Add()([x, keras.layers.Reshape((1, 1, WIDTH))(timestep)])
    pixels = keras.layers.Reshape((-1, WIDTH))(x)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=WIDTH // 2)(pixels, context)
    x = keras.layers.Add()(
        [x, keras.layers.Reshape((img_height // 8, img_width // 8, WIDTH))(attended)]
    )
    x = keras.layers.Activation("swish")(x)
    noise = keras.layers.Conv2D(4, 3, padding="same")(x)
    return keras.Model([latent, timestep_embedding, context], noise, name="stand_in_unet")


def decoder(img_height, img_width, download_weights=False):
    """KerasCV's `Decoder`: scaled latents to images of 8 times their size."""
    return keras.Sequential(
        [
            keras.layers.Input((img_height // 8, img_width // 8, 4)),
            keras.layers.Rescaling(1.0 / LATENT_SCALE),
            keras.layers.Conv2D(WIDTH, 3, padding="same", activation="swish"),
            keras.layers.UpSampling2D(8),
            keras.layers.Conv2D(3, 3, padding="same"),
        ],
        name="stand_in_decoder",
    )


def text_encoder(max_length, vocab_size=49408, name=None, download_weights=False):
    """KerasCV's `TextEncoder` with one CLIP encoder layer instead of twelve: [token ids,
    position ids] to the 768-wide context, through KerasCV's CLIPEmbedding, whose token
    row is what textual inversion trains. Building KerasCV's own twelve layers takes
    seconds of graph building, and a run builds the text encoder twice."""
    from keras_cv.src.models.stable_diffusion import text_encoder as clip

    tokens = keras.layers.Input((max_length,), dtype="int32", name="tokens")
    positions = keras.layers.Input((max_length,), dtype="int32", name="positions")
    x = clip.CLIPEmbedding(vocab_size, 768, max_length)([tokens, positions])
    x = clip.CLIPEncoderLayer(768, 12, activation=clip.quick_gelu)(x)
    context = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    return keras.Model([tokens, positions], context, name=name or "stand_in_text_encoder")


STAND_INS = {
    "TextEncoder": text_encoder,
    "ImageEncoder": image_encoder,
    "DiffusionModel": diffusion_model,
    "Decoder": decoder,
}


@contextlib.contextmanager
def stand_in_models():
    """Within it, the text encoder, the VAE and the UNet KerasCV builds are the stand-ins,
    with random weights: nothing is downloaded."""
    # Importing the submodule replaces keras_cv's lazy attribute with the module that
    # the script's own `from keras_cv.models.stable_diffusion import ...` gets.
    import keras_cv.models.stable_diffusion as module

    # KerasCV's StableDiffusion builds its parts, on first use, from the names of its
    # own module: both places take the stand-ins.
    from keras_cv.src.models.stable_diffusion import stable_diffusion as pipeline_module

    originals = {
        (place, name): getattr(place, name)
        for place in (module, pipeline_module)
        for name in STAND_INS
    }
    for place, name in originals:
        setattr(place, name, STAND_INS[name])
    try:
        yield
    finally:
        for (place, name), original in originals.items():
            setattr(place, name, original)


def signal_after_step(signal_name, after_step):
    """Makes the script's loss logger send `signal_name` to this process right after
    it logs step `after_step`."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from textual_inversion_extras import watching

    log_step = watching.LossLogger.on_train_batch_end

    def log_step_then_signal(self, batch, logs=None):
        log_step(self, batch, logs)
        if int(self.model.step.numpy()) == after_step:
            os.kill(os.getpid(), getattr(signal, signal_name))

    watching.LossLogger.on_train_batch_end = log_step_then_signal


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--two-devices", action="store_true", help="Split the CPU in two.")
    parser.add_argument("--signal", help="A signal to send after --after-step.")
    parser.add_argument("--after-step", type=int, help="The step the signal comes after.")
    parser.add_argument("script", help="The script to run.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Its arguments.")
    options = parser.parse_args()
    script_args = options.script_args
    if options.two_devices:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    if options.signal:
        signal_after_step(options.signal, options.after_step)
    sys.argv = [options.script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(options.script)))
    with stand_in_models():
        runpy.run_path(options.script, run_name="__main__")


if __name__ == "__main__":
    main()
