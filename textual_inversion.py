"""
Title: Teach StableDiffusion new concepts via Textual Inversion
Authors: Ian Stenbit, Luke Wood (keras.io, 2022); ported to TensorFlow 2.21, Keras 3
    and KerasCV 0.9 as a tested script.
Date created: 2022/12/09
Description: Learning new visual concepts with KerasCV's StableDiffusion implementation.

## Textual Inversion

Textual inversion teaches a frozen image generator a visual concept from a handful of
photos (Gal et al., 2022). A new token, `<my-funny-cat-token>`, is added to the CLIP
tokenizer; its embedding starts as a copy of a seed word's (`cat`) and is the only
thing trained, while the VAE, the UNet and every other token stay frozen. Afterwards
"Gandalf the Gray as a <my-funny-cat-token>" draws the new concept.

    python textual_inversion.py                      # the tutorial (a GPU hour)
    python textual_inversion.py --images my_photos/  # your own concept
    python textual_inversion.py --help               # every flag, with its default

With no flags this is the keras.io tutorial, which reads top to bottom first; what goes
beyond it follows, reached through flags; the command line comes last.
`tools/generate.py` draws with a saved embedding, `tools/evaluate.py` scores it.
"""

import argparse
import contextlib
import csv
import functools
import glob
import hashlib
import json
import math
import os
import re
import signal
import struct
import sys
import time
from typing import NamedTuple

import keras
import keras_cv
import matplotlib
import numpy as np
import safetensors
import safetensors.numpy
import tensorflow as tf
from keras import ops
from keras_cv.models.stable_diffusion import NoiseScheduler

if not hasattr(sys, "ps1") and "ipykernel" not in sys.modules:
    # Run as a script, draw into files; in a notebook (Colab) keep the inline plots.
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

"""
## Hyperparameters

The tutorial's settings. Every command-line flag defaults to one of these.
"""

RESOLUTION = 512  # pixels; the UNet takes multiples of 128
EPOCHS = 50
LEARNING_RATE = 1e-4  # where the cosine decay starts
BATCH_SIZE = 1
SAMPLE_EVERY = 10  # epochs between the sample images drawn during training
SAMPLE_STEPS = 50  # diffusion steps per sample image
SEED = 1337
PLACEHOLDER_TOKEN = "<my-funny-cat-token>"
INITIALIZER_TOKEN = "cat"
OUTPUT_DIR = "outputs"

MAX_PROMPT_LENGTH = 77  # the CLIP text encoder's fixed input length
LATENT_SCALE = 0.18215  # the "magic" constant Stable Diffusion's latents were scaled by


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, without a traceback."""

    exit_code = 2


"""
## Building StableDiffusion

We build a `keras_cv.models.StableDiffusion`, whose four parts (text encoder, VAE image
encoder, diffusion UNet, VAE decoder) we use below to fine-tune. It downloads their
weights (about 4 GB) the first time each part is used, so we touch each part now.

For smoke runs and tests on a machine without the weights, `random_weights=True` builds
the very same KerasCV classes with `download_weights=False` instead.
"""


def sd_parts(stable_diffusion):
    """The four models, built (and their weights loaded) on first access."""
    parts = ("text_encoder", "image_encoder", "diffusion_model", "decoder")
    return [getattr(stable_diffusion, part) for part in parts]


def keras_download_cache():
    """Where `keras.utils.get_file` keeps (and first looks for) its downloads."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "datasets")


def is_download_error(error):
    return "fetch failure" in str(error) or "URL" in str(error)


def build_tokenizer():
    try:
        return keras_cv.models.stable_diffusion.SimpleTokenizer()
    except Exception as error:
        if not is_download_error(error):
            raise
        raise UserError(
            f"Could not download the CLIP vocabulary ({error}); connect to the "
            "internet, or place bpe_simple_vocab_16e6.txt.gz in "
            f"{keras_download_cache()}."
        ) from None


def build_stable_diffusion(
    resolution, tokenizer, random_weights=False, jit_compile=True, precision="float32"
):
    # The dtype policy applies to every layer built from here on.
    keras.mixed_precision.set_global_policy(precision)
    stable_diffusion = keras_cv.models.StableDiffusion(
        img_height=resolution, img_width=resolution, jit_compile=jit_compile
    )
    # The tokenizer, extended with the new token below, was made before the models.
    stable_diffusion._tokenizer = tokenizer
    try:
        if random_weights:
            sd_models = keras_cv.models.stable_diffusion
            stable_diffusion._text_encoder = sd_models.TextEncoder(
                MAX_PROMPT_LENGTH, download_weights=False
            )
            stable_diffusion._image_encoder = sd_models.ImageEncoder(download_weights=False)
            stable_diffusion._diffusion_model = sd_models.DiffusionModel(
                resolution, resolution, MAX_PROMPT_LENGTH, download_weights=False
            )
            stable_diffusion._decoder = sd_models.Decoder(
                resolution, resolution, download_weights=False
            )
            for model in sd_parts(stable_diffusion):
                model.compile(jit_compile=jit_compile)  # as keras-cv does
        # Touch each part so that its weights load (or download) now, not mid-run.
        sd_parts(stable_diffusion)
    except Exception as error:
        if not is_download_error(error):
            raise
        raise UserError(
            f"Could not download the Stable Diffusion weights ({error}); connect to "
            "the internet, or place kcv_encoder.h5, vae_encoder.h5, "
            "kcv_diffusion_model.h5 and kcv_decoder.h5 in "
            f"{keras_download_cache()}, or use --random-weights for a smoke run."
        ) from None
    return stable_diffusion


"""
Next, a visualization utility to show the generated images. Run as a script there is
no screen, so every row of images is also written to a PNG file.
"""


def plot_images(images, title=None):
    plt.figure(figsize=(20, 20))
    for i in range(len(images)):
        ax = plt.subplot(1, len(images), i + 1)
        plt.imshow(images[i])
        plt.axis("off")
        if title and i == 0:
            ax.set_title(title, loc="left")
    if matplotlib.get_backend().lower() != "agg":
        plt.show()
    plt.close()


def save_images(images, path):
    """Writes a batch of uint8 images side by side into one PNG file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plt.imsave(path, np.concatenate(list(images), axis=1))


def slugify(text, max_length=60):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length]


"""
## Assembling a text-image pair dataset

To train the new token's embedding we need a dataset of text-image pairs: an image of
the concept, and a caption that describes it with the new token where the concept goes.

The tutorial's concept is a cat doll, in 5 photos of it alone, with generic captions:
the prompt templates of the textual-inversion paper, `{}` standing for the token.
"""

SINGLE_IMAGE_URLS = [
    "https://i.imgur.com/VIedH1X.jpg",
    "https://i.imgur.com/eBw13hE.png",
    "https://i.imgur.com/oJ3rSg7.png",
    "https://i.imgur.com/5mCL6Df.jpg",
    "https://i.imgur.com/4Q6WWyI.jpg",
]

SINGLE_PROMPTS = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

"""
The images are downloaded once into the Keras cache, resized to the model's resolution
and scaled to [-1, 1], the range the StableDiffusion image encoder expects. With random
weights (a smoke run) nothing is downloaded: a URL that is not in the Keras cache yet
becomes a synthetic stand-in image.
"""


def download_images(urls, download=True):
    files = []
    for url in urls:
        cached = os.path.join(keras_download_cache(), os.path.basename(url))
        if not download:
            files.append(cached if os.path.exists(cached) else url)
            continue
        try:
            files.append(keras.utils.get_file(origin=url))
        except Exception as error:
            raise UserError(
                f"Could not download the image {url} ({error}); check the URL and "
                "your connection, or pass local files with --images."
            ) from None
    return files


def synthetic_image(name, resolution):
    """A smooth random-colour image, the same for the same name (smoke runs only)."""
    rng = np.random.default_rng(sum(name.encode()))
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype("float32")
    return ops.convert_to_numpy(
        keras.layers.Resizing(resolution, resolution, interpolation="bilinear")(corners)
    )


def load_images(files, resolution):
    resize = keras.layers.Resizing(height=resolution, width=resolution, crop_to_aspect_ratio=True)
    images = []
    for path in files:
        if re.match(r"^(https?|ftp)://", path):
            print(f"--random-weights: {path} is not downloaded; using a synthetic image.")
            images.append(synthetic_image(path, resolution))
            continue
        try:
            image = keras.utils.img_to_array(keras.utils.load_img(path))
        except Exception as error:
            raise UserError(
                f"Could not read the image {path} ({error}); remove it or replace it "
                "with a JPEG or PNG file."
            ) from None
        images.append(ops.convert_to_numpy(resize(image)))
    # The StableDiffusion image encoder expects pixel values in [-1, 1].
    return (np.array(images) / 127.5 - 1).astype("float32")


"""
Every time an image is used it gets some random noise: a random square crop of 80 to
100% of its area, resized back, and a horizontal flip half of the time. The tutorial's
KerasCV layers (`RandomCropAndResize`, `RandomFlip`) draw these from a generator that
moves on with every image; we make the same crops and flips with *stateless* random
ops, from a seed that comes with the image. A run then repeats step by step, and a
stopped run can resume exactly where it stopped.
"""


def random_crop_box(seed):
    """[y1, x1, y2, x2], in fractions of the image, of a square of 80 to 100% of it."""
    area_seed, corner_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    side = tf.sqrt(tf.random.stateless_uniform((), area_seed, minval=0.8, maxval=1.0))
    corner = tf.random.stateless_uniform((2,), corner_seed, maxval=1.0 - side)
    return tf.concat([corner, corner + side], axis=0)


def augment(image, seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    box = random_crop_box(crop_seed)
    image = tf.image.crop_and_resize(image[None], box[None], [0], image.shape[:2])[0]
    flip = tf.random.stateless_uniform((), flip_seed) < 0.5
    return tf.where(flip, tf.image.flip_left_right(image), image)


"""
Next the text: each prompt template gets the placeholder token in place of `{}`, is
tokenized, and is padded with the end-of-text token to the text encoder's fixed length
of 77.
"""


def encode_prompt(tokenizer, prompt):
    token_ids = tokenizer.encode(prompt)
    if len(token_ids) > MAX_PROMPT_LENGTH:
        raise UserError(
            f'The prompt "{prompt}" is {len(token_ids)} tokens long, more than the '
            f"{MAX_PROMPT_LENGTH} the text encoder takes; shorten it."
        )
    padding = [tokenizer.end_of_text] * (MAX_PROMPT_LENGTH - len(token_ids))
    return np.array(token_ids + padding, dtype="int32")


def encode_prompts(tokenizer, templates, placeholder_token):
    prompts = [template.replace("{}", placeholder_token) for template in templates]
    return np.stack([encode_prompt(tokenizer, prompt) for prompt in prompts])


"""
The images and the prompts of the photos of one cat doll make a set of text-image
pairs. In an epoch each prompt is used 5 times (the tutorial's authors found this
anecdotally improves results), in a shuffled order, and the images take turns beside
them, shuffled again for every pass over them. `epoch_pairs` draws one epoch's pairs of
a set, as indices, from a NumPy random generator.
"""

PROMPT_REPEATS = 5


class TextImagePairs(NamedTuple):
    images: np.ndarray  # [images, resolution, resolution, 3], in [-1, 1]
    token_ids: np.ndarray  # [prompts, 77]


def assemble_dataset(image_files, prompts, tokenizer, placeholder_token, resolution):
    images = load_images(image_files, resolution)
    return TextImagePairs(images, encode_prompts(tokenizer, prompts, placeholder_token))


def epoch_pairs(pairs, rng):
    """(image indices, prompt indices) of one epoch of `pairs`, side by side."""
    prompt_ids = [rng.permutation(len(pairs.token_ids)) for _ in range(PROMPT_REPEATS)]
    prompt_ids = np.concatenate(prompt_ids)
    passes = math.ceil(len(prompt_ids) / len(pairs.images))
    image_ids = np.concatenate([rng.permutation(len(pairs.images)) for _ in range(passes)])
    return image_ids[: len(prompt_ids)], prompt_ids


"""
## On the importance of prompt accuracy

The tutorial's authors first trained on photos of single cat dolls and of groups of
them with the same generic prompts, and the results were mediocre. Captions that
describe the image accurately ("a photo of a group of {}") improved them
*significantly*. So the group photos get prompts of their own ...
"""

GROUP_IMAGE_URLS = [
    "https://i.imgur.com/yVmZ2Qa.jpg",
    "https://i.imgur.com/JbyFbZJ.jpg",
    "https://i.imgur.com/CCubd3q.jpg",
]

GROUP_PROMPTS = [
    "a photo of a group of {}",
    "a rendering of a group of {}",
    "a cropped photo of the group of {}",
    "the photo of a group of {}",
    "a photo of a clean group of {}",
    "a photo of my group of {}",
    "a photo of a cool group of {}",
    "a close-up photo of a group of {}",
    "a bright photo of the group of {}",
    "a cropped photo of a group of {}",
    "a photo of the group of {}",
    "a good photo of the group of {}",
    "a photo of one group of {}",
    "a close-up photo of the group of {}",
    "a rendition of the group of {}",
    "a photo of the clean group of {}",
    "a rendition of a group of {}",
    "a photo of a nice group of {}",
    "a good photo of a group of {}",
    "a photo of the nice group of {}",
    "a photo of the small group of {}",
    "a photo of the weird group of {}",
    "a photo of the large group of {}",
    "a photo of a cool group of {}",
    "a photo of a small group of {}",
]

"""
... and the two sets make up each epoch together: (25 + 25) prompts x 5 = 250
examples, shuffled, in batches of `BATCH_SIZE`: 250 steps an epoch. (With a batch above
1, the examples that do not fill a last batch are left out of that epoch.) The order of
an epoch comes from a random generator seeded with (seed, epoch), so any epoch of a run
can be drawn again on its own.
"""


def steps_per_epoch(sets, batch_size=BATCH_SIZE):
    return sum(len(pairs.token_ids) * PROMPT_REPEATS for pairs in sets) // batch_size


def epoch_order(sets, seed, epoch, batch_size=BATCH_SIZE):
    """The epoch's examples in training order, as indices into all the sets' images and
    all their prompts, one after the other."""
    rng = np.random.default_rng([seed, epoch])
    drawn = [epoch_pairs(each, rng) for each in sets]
    image_starts = np.cumsum([0] + [len(pairs.images) for pairs in sets])
    prompt_starts = np.cumsum([0] + [len(pairs.token_ids) for pairs in sets])
    image_ids = np.concatenate([ids + start for (ids, _), start in zip(drawn, image_starts)])
    prompt_ids = np.concatenate([ids + start for (_, ids), start in zip(drawn, prompt_starts)])
    order = rng.permutation(len(prompt_ids))[: steps_per_epoch(sets, batch_size) * batch_size]
    return image_ids[order], prompt_ids[order]


"""
The training dataset is the run's examples, epoch after epoch, in batches: example
number `n` of the run is augmented with the seed (seed, n). Every batch of the run is
thus a function of the seed alone; `first_step` starts the dataset at any step, which
is how a resumed run picks up the very batch it stopped at. The augmentation can run in
parallel, as each example brings its own seed.
"""


def assemble_train_dataset(
    sets, batch_size=BATCH_SIZE, seed=SEED, epochs=EPOCHS, first_step=0, make_view=augment
):
    orders = [epoch_order(sets, seed, epoch, batch_size) for epoch in range(epochs)]
    image_ids = np.concatenate([image_ids for image_ids, _ in orders])
    prompt_ids = np.concatenate([prompt_ids for _, prompt_ids in orders])
    example_numbers = np.arange(len(image_ids), dtype="int64")
    images = tf.constant(np.concatenate([pairs.images for pairs in sets]))
    token_ids = tf.constant(np.concatenate([pairs.token_ids for pairs in sets]))

    def make_example(image_id, prompt_id, example_number):
        example_seed = tf.stack([tf.constant(seed, "int64"), example_number])
        view = make_view(tf.gather(images, image_id), example_seed)
        return view, tf.gather(token_ids, prompt_id)

    first = first_step * batch_size
    dataset = tf.data.Dataset.from_tensor_slices(
        (image_ids[first:], prompt_ids[first:], example_numbers[first:])
    )
    dataset = dataset.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


"""
## Adding a new token to the text encoder

The tokenizer learns the placeholder as a new token at the end of its vocabulary
(id 49408), and we look up the id of the initializer word, which must be one token.
"""


def initializer_token_id(tokenizer, initializer_token):
    initializer_ids = tokenizer.encode(initializer_token)[1:-1]  # without start and end
    if len(initializer_ids) != 1:
        pieces = [tokenizer.decode([i]).strip() for i in initializer_ids]
        raise UserError(
            f'The initializer word "{initializer_token}" is {len(initializer_ids)} '
            f"tokens ({', '.join(pieces)}), not one; pick a single-token word."
        )
    return initializer_ids[0]


def add_placeholder_token(tokenizer, placeholder_token, initializer_token):
    """Adds the placeholder to the tokenizer; returns its id and the initializer's."""
    initializer_id = initializer_token_id(tokenizer, initializer_token)
    tokenizer.add_tokens(placeholder_token)
    return tokenizer.encoder[placeholder_token], initializer_id


"""
The text encoder's token embedding then needs one more row. We build a new KerasCV
`TextEncoder` with the larger vocabulary, copy every weight of the old one into it, and
give the new row the embedding of the initializer word, `cat`: before any training,
the new token means "cat".
"""


def get_embedding_layer(text_encoder):
    """The text encoder's CLIPEmbedding layer (token and position embeddings)."""
    for layer in text_encoder.layers:
        if hasattr(layer, "token_embedding"):
            return layer
    raise ValueError("This text encoder has no CLIP embedding layer.")


def token_rows(text_encoder, token_ids):
    """The embedding rows of `token_ids`, as a numpy array."""
    token_weights = get_embedding_layer(text_encoder).token_embedding.get_weights()[0]
    return token_weights[np.array(token_ids)]


def extend_text_encoder(text_encoder, new_rows, jit_compile=False):
    """A copy of `text_encoder` whose token embedding has `new_rows` appended."""
    old_embedding = get_embedding_layer(text_encoder)
    old_token_weights = old_embedding.token_embedding.get_weights()[0]
    new_token_weights = np.concatenate([old_token_weights, new_rows], axis=0)

    new_encoder = keras_cv.models.stable_diffusion.TextEncoder(
        MAX_PROMPT_LENGTH,
        vocab_size=len(new_token_weights),
        # Otherwise it would load the pretrained weights, of the old vocabulary size.
        download_weights=False,
    )
    for old_layer, new_layer in zip(text_encoder.layers, new_encoder.layers):
        if old_layer is old_embedding:
            new_layer.token_embedding.set_weights([new_token_weights])
            new_layer.position_embedding.set_weights(old_embedding.position_embedding.get_weights())
        else:
            new_layer.set_weights(old_layer.get_weights())
    new_encoder.compile(jit_compile=jit_compile)
    return new_encoder


"""
Before training, StableDiffusion draws the new token as a cat, the word it started
from. `draw_samples` draws 3 images of a prompt with a fixed seed into
`samples/epoch-NNN_<prompt>.png` (epoch 0: before training).
"""

SAMPLE_PROMPTS = [
    "an oil painting of {}",
    "gandalf the gray as a {}",
    "two {} getting married, photorealistic, high quality",
]


def draw_samples(stable_diffusion, prompt, epoch, output_dir, steps=SAMPLE_STEPS, seed=SEED):
    images = stable_diffusion.text_to_image(prompt, batch_size=3, num_steps=steps, seed=seed)
    name = f"epoch-{epoch:03d}_{slugify(prompt)}.png"
    save_images(images, os.path.join(output_dir, "samples", name))
    plot_images(images, title=f"epoch {epoch}: {prompt}" if epoch else f"before training: {prompt}")


"""
## Freezing everything but the new embedding

The only part of the model textual inversion trains is the placeholder's embedding
vector. The UNet, the VAE and the text encoder are frozen.

Keras's `Adam` weight-decays every row of a trainable variable, so training the whole
49,409 x 768 token matrix, as the tutorial did, moves every other token too. The
learned vector is a variable of its own, written into its row after each step.
"""


def freeze_models(stable_diffusion):
    for model in sd_parts(stable_diffusion):
        model.trainable = False


"""
## Training the new embedding

A few utilities first:

- `sample_from_encoder_outputs` samples from the distribution the VAE image encoder
  predicts, instead of taking only its mean as many StableDiffusion applications do
  (`standard_normal(shape)` gives the noise for it).
- `get_timestep_embedding` makes the diffusion model's sinusoidal embedding of a batch
  of timesteps, at once (the tutorial mapped over them one by one).
- `get_position_ids` gives the text encoder's position ids, `[[0, 1, ..., 76]]`;
  `latent_distribution_encoder` gives the VAE's mean and log-variance.
"""


def latent_distribution_encoder(image_encoder):
    """Without its last layer (which keeps the mean only, scaled), the image encoder
    gives the mean and log-variance of the latent distribution."""
    return keras.Model(image_encoder.inputs, image_encoder.layers[-2].output)


def sample_from_encoder_outputs(outputs, standard_normal):
    mean, logvar = ops.split(ops.cast(outputs, "float32"), 2, axis=-1)
    logvar = ops.clip(logvar, -30.0, 20.0)
    std = ops.exp(0.5 * logvar)
    return mean + std * standard_normal(ops.shape(mean))


def get_timestep_embedding(timesteps, dim=320, max_period=10000):
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(0, half, dtype="float32") / half)
    args = ops.cast(timesteps, "float32")[:, None] * freqs[None, :]
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def get_position_ids():
    return ops.expand_dims(ops.arange(MAX_PROMPT_LENGTH, dtype="int32"), 0)


"""
The tutorial's masked gradient. The gradient of an embedding lookup is a
`tf.IndexedSlices`: a row of `values` for every token position of the batch, and its
token id in `indices`. We keep the rows of the placeholder's id, zero all others, and
sum them (a prompt may hold the placeholder more than once).
"""


def placeholder_gradient(embedding_gradient, placeholder_token_ids):
    if not isinstance(embedding_gradient, tf.IndexedSlices):
        return ops.take(embedding_gradient, placeholder_token_ids, axis=0)
    is_placeholder = ops.equal(
        ops.cast(embedding_gradient.indices, "int32")[:, None],
        placeholder_token_ids[None, :],
    )
    mask = ops.cast(is_placeholder, embedding_gradient.values.dtype)
    return ops.matmul(ops.transpose(mask), embedding_gradient.values)


"""
Now the heart of textual inversion, `StableDiffusionFineTuner`: a `keras.Model` whose
`train_step` trains the placeholder's embedding. In each step the frozen VAE encodes
the training images into latents (a sample of the predicted distribution, scaled by
0.18215), random noise is added at a random timestep, and the frozen diffusion model
predicts that noise, guided by the text encoder's encoding of the image's prompt. The
loss is the mean squared error between the true and the predicted noise. Its gradient
reaches the token embedding matrix through the text encoder; we keep only the
placeholder's row of it, let the optimizer update the learned vector, and write that
back into the matrix.

The step's random numbers come from the trainer's seed generator; `step` counts steps.
"""


class StableDiffusionFineTuner(keras.Model):
    def __init__(
        self, stable_diffusion, noise_scheduler, placeholder_token_ids, seed=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.stable_diffusion = stable_diffusion
        self.noise_scheduler = noise_scheduler
        self.placeholder_token_ids = ops.convert_to_tensor(placeholder_token_ids, dtype="int32")
        self.training_image_encoder = latent_distribution_encoder(stable_diffusion.image_encoder)
        self.token_embedding = get_embedding_layer(stable_diffusion.text_encoder).token_embedding
        initial_vectors = ops.take(
            self.token_embedding.embeddings, self.placeholder_token_ids, axis=0
        )
        self.learned_embedding = self.add_weight(
            shape=tuple(initial_vectors.shape), initializer="zeros", name="learned_embedding"
        )
        self.learned_embedding.assign(initial_vectors)
        # One count of steps, also on several devices.
        self.step = self.add_weight(
            shape=(), dtype="int64", trainable=False, aggregation="only_first_replica", name="step"
        )
        self.position_ids = get_position_ids()
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def standard_normal(self, shape):
        return keras.random.normal(shape, seed=self.seed_generator)

    def random_timesteps(self, shape):
        maxval = self.noise_scheduler.train_timesteps
        return keras.random.randint(shape, 0, maxval, dtype="int32", seed=self.seed_generator)

    def compute_denoising_loss(self, images, token_ids):
        # Sample from the predicted distribution of the training images' latents, and
        # scale it the way StableDiffusion's latents were scaled in its training.
        latents = sample_from_encoder_outputs(
            self.training_image_encoder(images, training=False), self.standard_normal
        )
        latents = latents * LATENT_SCALE

        # Random noise, and a random timestep for each sample in the batch.
        noise = self.standard_normal(ops.shape(latents))
        timesteps = self.random_timesteps((ops.shape(latents)[0],))

        # Add noise to the latents according to each sample's timestep.
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

        # Encode the prompts: the diffusion model's guide (its "context").
        encoder_hidden_state = self.stable_diffusion.text_encoder([token_ids, self.position_ids])

        # Predict the noise, and compare it with the noise that was added.
        noise_pred = self.stable_diffusion.diffusion_model(
            [noisy_latents, get_timestep_embedding(timesteps), encoder_hidden_state]
        )
        return ops.mean(ops.square(noise - ops.cast(noise_pred, "float32")))

    def scaled_loss(self, loss):
        """The loss to differentiate: the loss itself, unless the optimizer scales it
        (mixed_float16, see "Speed" below)."""
        return self.optimizer.scale_loss(loss)

    def write_learned_embedding(self):
        """Copies the learned vectors into their rows of the text encoder's matrix."""
        self.token_embedding.embeddings.value.scatter_nd_update(
            self.placeholder_token_ids[:, None], self.learned_embedding.value
        )

    def loss_and_gradient(self, images, token_ids):
        embedding_matrix = self.token_embedding.embeddings.value
        with tf.GradientTape() as tape:
            tape.watch(embedding_matrix)
            loss = self.compute_denoising_loss(images, token_ids)
            scaled_loss = self.scaled_loss(loss)

        # The masked gradient: only the placeholder's rows of the matrix's gradient.
        embedding_gradient = tape.gradient(scaled_loss, embedding_matrix)
        return loss, placeholder_gradient(embedding_gradient, self.placeholder_token_ids)

    def train_step(self, data):
        images, token_ids, _ = keras.utils.unpack_x_y_sample_weight(data)
        loss, gradient = self.loss_and_gradient(images, token_ids)
        self.optimizer.apply_gradients([(gradient, self.learned_embedding)])
        self.write_learned_embedding()
        self.step.assign_add(1)

        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "step_loss": loss}


"""
To watch training, a callback draws the sample prompts every `SAMPLE_EVERY` epochs,
each with the same seed.
"""


class GenerateImages(keras.callbacks.Callback):
    def __init__(self, stable_diffusion, prompt, output_dir, frequency=SAMPLE_EVERY, **options):
        super().__init__()
        self.stable_diffusion, self.prompt, self.output_dir = stable_diffusion, prompt, output_dir
        self.frequency = frequency
        self.options = options  # draw_samples's steps and seed

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.frequency == 0:
            draw_samples(
                self.stable_diffusion, self.prompt, epoch + 1, self.output_dir, **self.options
            )


"""
Then, as with any Keras model, `compile()` and `fit()`. The noise scheduler is the one
StableDiffusion was trained with; the learning rate follows a cosine decay over the
whole run; Adam has a small weight decay and the gradient norm is clipped.
"""


def build_trainer(
    stable_diffusion,
    placeholder_token_ids,
    learning_rate,
    seed=None,
    jit_compile=False,
    trainer_class=None,
):
    noise_scheduler = NoiseScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", train_timesteps=1000
    )
    # The extras' trainers extend this one; the tutorial's is StableDiffusionFineTuner.
    trainer = (trainer_class or StableDiffusionFineTuner)(
        stable_diffusion, noise_scheduler, placeholder_token_ids, seed=seed, name="trainer"
    )
    optimizer = keras.optimizers.Adam(
        weight_decay=0.004, learning_rate=learning_rate, epsilon=1e-8, global_clipnorm=10
    )
    trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
    return trainer


def train(trainer, train_ds, epoch_steps, epochs=EPOCHS, callbacks=(), **fit_options):
    # The dataset holds the whole run, already shuffled: Keras is told where an epoch
    # ends, and that the data needs no shuffling of its own.
    return trainer.fit(
        train_ds,
        epochs=epochs,
        steps_per_epoch=epoch_steps,
        callbacks=list(callbacks),
        shuffle=False,
        **fit_options,
    )


"""
## Taking the fine-tuned model for a spin

Now the really fun part: with the token's embedding learned, StableDiffusion draws it
like any other word. The tutorial's closing prompts:
"""

FINAL_PROMPTS = [
    "Gandalf as a {} fantasy art drawn by disney concept artists, golden colour, "
    "high quality, highly detailed, elegant, sharp focus, concept art, character "
    "concepts, digital painting, mystery, adventure",
    "A masterpiece of a {} crying out to the heavens. Behind the {}, an dark, evil "
    "shade looms over it - sucking the life right out of it.",
    "An evil {}.",
    "A mysterious {} approaches the great pyramids of egypt.",
]


def generate_final_images(
    stable_diffusion, placeholder_token, output_dir, steps=SAMPLE_STEPS, seed=SEED
):
    for prompt in FINAL_PROMPTS:
        prompt = prompt.format(*[placeholder_token] * prompt.count("{}"))
        images = stable_diffusion.text_to_image(prompt, batch_size=3, num_steps=steps, seed=seed)
        save_images(images, os.path.join(output_dir, "final", f"{slugify(prompt)}.png"))
        plot_images(images, title=prompt)


"""
# Beyond the tutorial

The tutorial ends here. Everything below goes further, and is reached through flags
(`python textual_inversion.py --help`). Each capability has a section of its own and
builds on the steps above without changing them. Without flags, the run is the
tutorial's, and it also keeps what it learns: the embedding file, the loss log and a
few pictures to look at.
"""

"""
## Extras: your own concept

`--images` takes URLs, files or folders of your own photos. Without them the tutorial's
two image sets are used; with them, the tutorial's group photos are left out unless
`--group-images` names some.
"""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def resolve_image_files(sources, download=True):
    """Local files for `sources` (URLs, files, folders)."""
    files = []
    for source in sources:
        if re.match(r"^(https?|ftp)://", source):
            files.extend(download_images([source], download))
        elif os.path.isdir(source):
            found = sorted(
                os.path.join(source, name)
                for name in os.listdir(source)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise UserError(
                    f"The folder {source} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "put your photos there or pass image files with --images."
                )
            files.extend(found)
        elif os.path.isfile(source):
            files.append(source)
        else:
            raise UserError(
                f"The image {source} does not exist; check the path, or pass a URL "
                "or a folder with --images."
            )
    return files


"""
**Captions.** The tutorial's lesson is that accurate prompts matter. An image `x.jpg`
with a text file `x.txt` beside it trains with that caption, `{}` standing for the
token ("a photo of {} asleep on a red sofa"), instead of the generic prompts. Each
captioned image makes a set of its own, one image with one prompt, and so appears 5
times an epoch, like each generic prompt.
"""


def read_caption(image_path):
    caption_path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(caption_path):
        return None
    with open(caption_path, encoding="utf-8") as f:
        caption = " ".join(f.read().split())
    if "{}" not in caption:
        raise UserError(
            f"The caption in {caption_path} has no {{}}; put {{}} where the concept is, "
            'as in "a photo of {} on a red sofa".'
        )
    return caption


def assemble_captioned_dataset(files, captions, tokenizer, placeholder_token, resolution):
    """One set of pairs per image: the image and its own caption."""
    images = load_images(files, resolution)
    token_ids = encode_prompts(tokenizer, captions, placeholder_token)
    return [TextImagePairs(images[i : i + 1], token_ids[i : i + 1]) for i in range(len(files))]


"""
**Styles.** `--learnable-property style` teaches a style instead of an object, with
prompts that say so. `--prompts` replaces the prompts altogether.
"""

STYLE_PROMPTS = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


def concept_prompts(args):
    """The prompt templates for --images: --prompts, or the default for the property."""
    if args.prompts:
        return args.prompts
    return STYLE_PROMPTS if args.learnable_property == "style" else SINGLE_PROMPTS


def group_image_sources(args):
    """--group-images, or the tutorial's group photos when --images is the tutorial's."""
    if args.group_images is not None:
        return args.group_images
    tutorial = args.images == SINGLE_IMAGE_URLS and args.learnable_property == "object"
    return GROUP_IMAGE_URLS if tutorial else []


"""
**Several vectors.** `--num-vectors N` makes the concept N consecutive new tokens,
`<my-funny-cat-token> <my-funny-cat-token-1> ...`, each with a vector of its own, as in
diffusers and AUTOMATIC1111. Prompts name the placeholder once; it is written out as
all N tokens before tokenizing. With N=1 (the default) this is the tutorial. A new
token must be one lowercase word (the tokenizer lowercases prompts) that is not in the
vocabulary yet.
"""


def placeholder_names(token, num_vectors):
    extra = [
        f"{token[:-1]}-{i}>" if token.endswith(">") else f"{token}-{i}"
        for i in range(1, num_vectors)
    ]
    return [token] + extra


def placeholder_text(token, num_vectors):
    return " ".join(placeholder_names(token, num_vectors))


def check_new_token(tokenizer, token):
    if not token or any(c.isspace() for c in token):
        raise UserError(
            f'The placeholder token "{token}" is empty or has spaces; use one word '
            "such as <my-concept>."
        )
    if token != token.lower():
        raise UserError(
            f"The placeholder token {token} has capital letters; use lowercase, "
            f"such as {token.lower()}."
        )
    if token in tokenizer.encoder or len(tokenizer.encode(token)) == 3:
        raise UserError(
            f"The placeholder token {token} is already in the vocabulary; choose a "
            "new one, such as <my-concept>."
        )


def add_new_tokens(tokenizer, token, num_vectors):
    """Adds the token's names to the tokenizer; returns their ids, in name order."""
    names = placeholder_names(token, num_vectors)
    for name in names:
        check_new_token(tokenizer, name)
    # The tokenizer finds added tokens with a regex that tries them in the order they
    # were added: the longer names go first, so that "<t>" never matches in "<t-1>".
    tokenizer.add_tokens(names[::-1])
    return [tokenizer.encoder[name] for name in names]


def add_placeholder_tokens(tokenizer, token, initializer_token, num_vectors=1):
    """`add_placeholder_token` for N vectors; returns (their ids, the initializer's)."""
    initializer_id = initializer_token_id(tokenizer, initializer_token)
    return add_new_tokens(tokenizer, token, num_vectors), initializer_id


def rows_in_id_order(vectors, token_ids):
    """`vectors` (in name order) reordered to the order of their token ids, the
    order in which `extend_text_encoder` appends rows."""
    return np.asarray(vectors)[np.argsort(token_ids)]


"""
## Extras: keeping what was learned

The tutorial's result died with its Colab session. Here the learned embedding is saved
every `--save-every` epochs and at the end, as `learned_embeds.safetensors`: a single
tensor, `{placeholder_token: float32 [num_vectors, 768]}`. That is the layout diffusers'
`load_textual_inversion`, AUTOMATIC1111 and ComfyUI read for Stable Diffusion 1.x
models, which all share this CLIP ViT-L/14 text encoder. The file's metadata header
records how it was made. `--resume` goes on training from such a file.
"""

EMBEDDING_FILE = "learned_embeds.safetensors"
EMBEDDING_WIDTH = 768  # CLIP ViT-L/14, the text encoder of Stable Diffusion 1.x
BASE_MODEL = "KerasCV StableDiffusion v1.4 (CLIP ViT-L/14 text encoder)"


class LearnedEmbedding(NamedTuple):
    token: str
    vectors: np.ndarray  # float32 [num_vectors, 768]
    metadata: dict


def embedding_metadata(args, placeholder_token):
    return {
        "token": placeholder_token,
        "initializer_token": args.initializer_token,
        "epochs": args.epochs,
        "resolution": args.resolution,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "base_model": base_model_name(args.base_model),
        "random_weights": args.random_weights,
    }


def save_embedding(path, token, vectors, metadata):
    """Writes the embedding beside `path`, then renames it: never a half-written file."""
    metadata = {key: str(value) for key, value in metadata.items()}
    # "pt" is what PyTorch loaders (diffusers, transformers) look for; the tensor
    # itself is plain float32, as every safetensors file is.
    metadata["format"] = "pt"
    partial_path = path + ".partial"
    safetensors.numpy.save_file(
        {token: np.asarray(vectors, dtype="float32")}, partial_path, metadata=metadata
    )
    os.replace(partial_path, path)


def load_embedding(path):
    if not os.path.isfile(path):
        raise UserError(
            f"The embedding file {path} does not exist; pass the {EMBEDDING_FILE} "
            "that a training run wrote into its output folder."
        )
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise UserError(
            f"{path} is not a valid safetensors embedding ({error}); pass a "
            f"{EMBEDDING_FILE} written by this script or another textual-inversion tool."
        ) from None
    if len(tensors) != 1:
        raise UserError(
            f"{path} holds {len(tensors)} tensors, but an embedding file holds one, "
            "named by its token; pass a textual-inversion embedding."
        )
    token, vectors = next(iter(tensors.items()))
    vectors = np.asarray(vectors, dtype="float32")
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != EMBEDDING_WIDTH:
        raise UserError(
            f"The embedding in {path} has shape {list(vectors.shape)}, but this model's "
            f"token vectors are {EMBEDDING_WIDTH} wide (Stable Diffusion 1.x); "
            "embeddings for SD 2.x (1024) or SDXL do not fit it."
        )
    return LearnedEmbedding(token, vectors, metadata)


"""
**The training state.** The vector alone does not let a run go on as if it had never
stopped: Adam's moments, the random state that draws the noise and the timesteps, and
the run's place in its data matter too. So `training_state.safetensors` goes beside
the embedding: the learned vectors, the step, the trainer's seed-generator state, and
every variable of the optimizer (its iteration count, its moments and, under
mixed_float16, its loss scale). The data needs no saving, as every batch is a function
of the seed and the step. The embedding stays the single tensor other tools load.

Both files are saved every `--save-every-steps` steps, every `--save-every` epochs, and
whenever training stops, each written to a `.partial` file first and then renamed over
the old one. A run killed at any moment (kill -9, an out-of-memory kill, a Colab
session that disconnects) leaves the files of its last save whole; a save that fails
(a full disk) leaves them as they were. The state is renamed first, and holds the
vectors too: on resume it is what counts.

A state fits only the run that saved it: `run_fingerprint` records what must not
change (the training images and prompts, the batch, the precision, the number of
vectors, the seed, ...).
"""

TRAINING_STATE_FILE = "training_state.safetensors"
SAVE_EVERY_STEPS = 10


def run_fingerprint(args, sets, precision, placeholder_token, num_vectors):
    data = hashlib.sha256()
    for pairs in sets:
        data.update(str((pairs.images.shape, pairs.token_ids.shape)).encode())
        data.update(np.ascontiguousarray(pairs.images).tobytes())
        data.update(np.ascontiguousarray(pairs.token_ids).tobytes())
    return {
        "token": placeholder_token,
        "images and prompts": data.hexdigest()[:16],
        "--batch-size": args.batch_size,
        "--precision": precision,
        "--num-vectors": num_vectors,
        "--seed": args.seed,
        "--cache-latents": args.cache_latents,
        "--base-model": base_model_name(args.base_model),
        "--random-weights": args.random_weights,
    }


def build_optimizer(trainer):
    """Keras builds an optimizer's variables at its first step; a state saved or
    restored before it needs them now."""
    if not trainer.optimizer.built:
        with trainer.distribute_strategy.scope():
            trainer.optimizer.build([trainer.learned_embedding])


def training_state(trainer):
    """The trainer's whole state, as NumPy arrays by name."""
    build_optimizer(trainer)
    state = {
        "learned_embedding": ops.convert_to_numpy(trainer.learned_embedding),
        "step": ops.convert_to_numpy(trainer.step),
        "seed_generator_state": ops.convert_to_numpy(trainer.seed_generator.state),
    }
    for index, variable in enumerate(trainer.optimizer.variables):
        state[f"optimizer/{index:03d}/{variable.path}"] = ops.convert_to_numpy(variable)
    return state


def restore_training_state(trainer, state):
    optimizer_keys = sorted(key for key in state if key.startswith("optimizer/"))
    build_optimizer(trainer)
    with trainer.distribute_strategy.scope():
        variables = trainer.optimizer.variables
        shapes = [tuple(variable.shape) for variable in variables]
        if shapes != [tuple(state[key].shape) for key in optimizer_keys]:
            raise UserError(
                "The training state does not fit this run's optimizer; resume with the "
                "settings of the run that saved it."
            )
        for variable, key in zip(variables, optimizer_keys):
            variable.assign(state[key])
        trainer.learned_embedding.assign(state["learned_embedding"])
        trainer.write_learned_embedding()
        trainer.step.assign(state["step"])
        trainer.seed_generator.state.assign(state["seed_generator_state"])


def save_training(output_dir, token, trainer, metadata, fingerprint):
    """Writes the training state, then the embedding, each all or nothing."""
    state_path = os.path.join(output_dir, TRAINING_STATE_FILE)
    embedding_path = os.path.join(output_dir, EMBEDDING_FILE)
    state = training_state(trainer)
    try:
        safetensors.numpy.save_file(
            state, state_path + ".partial", metadata={"run": json.dumps(fingerprint)}
        )
        save_embedding(embedding_path + ".partial", token, state["learned_embedding"], metadata)
        os.replace(state_path + ".partial", state_path)
        os.replace(embedding_path + ".partial", embedding_path)
    finally:
        for path in (state_path + ".partial", embedding_path + ".partial"):
            if os.path.exists(path):
                os.remove(path)


def load_training_state(path, fingerprint):
    """The state saved at `path`, or None if there is none; a state of another run is
    refused."""
    if not os.path.isfile(path):
        return None
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            saved = json.loads((f.metadata() or {})["run"])
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise UserError(
            f"The training state {path} cannot be read ({error}); delete it to resume "
            "from the embedding alone."
        ) from None
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            what = (
                f"other {key}"
                if key in ("token", "images and prompts")
                else f"{key} {saved.get(key)}"
            )
            raise UserError(
                f"The training state {path} was saved by a run with {what}, not this "
                f"one's; resume with that run's settings, or delete {path} to resume "
                "from the embedding alone."
            )
    return state


def resume_state(embedding_path, resumed, fingerprint):
    """The training state saved beside the embedding to resume, if there is one; says
    which way the run resumes."""
    state_path = os.path.join(os.path.dirname(embedding_path), TRAINING_STATE_FILE)
    state = load_training_state(state_path, fingerprint)
    embedding_step = int(resumed.metadata.get("step", 0))
    if state and (
        int(state["step"]) != embedding_step
        or not np.array_equal(state["learned_embedding"], resumed.vectors)
    ):
        print(
            f"The training state {state_path} is of step {int(state['step'])}, the embedding "
            f"{embedding_path} of step {embedding_step}: resuming the embedding alone."
        )
        state = None
    if state:
        print(
            f"Resuming step {int(state['step'])} with its training state ({state_path}): "
            "the run goes on as if it had not stopped."
        )
    else:
        print(
            f"No {TRAINING_STATE_FILE} beside {embedding_path}: resuming its vectors and "
            f"step ({resumed.metadata.get('step', 0)}); Adam's moments and the random "
            "state of the noise start afresh."
        )
    return state


class SaveEmbedding(keras.callbacks.Callback):
    """Saves the learned embedding and the training state every `every_epochs` epochs,
    every `every_steps` steps, and when training ends."""

    def __init__(self, output_dir, token, metadata, fingerprint, every_epochs, every_steps):
        super().__init__()
        self.output_dir, self.token = output_dir, token
        self.metadata, self.fingerprint = metadata, fingerprint
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.saved_step = None

    def save(self):
        step = int(self.model.step.numpy())
        if step == self.saved_step:
            return
        metadata = dict(self.metadata, step=step)
        try:
            save_training(self.output_dir, self.token, self.model, metadata, self.fingerprint)
        except (OSError, safetensors.SafetensorError) as error:
            kept = f"step {self.saved_step}" if self.saved_step else "the last save"
            embedding_path = os.path.join(self.output_dir, EMBEDDING_FILE)
            raise UserError(
                f"Saving step {step} into {self.output_dir} failed ({error}); the files of "
                f"{kept} are kept there: make room and continue with --resume "
                f"{embedding_path}."
            ) from None
        self.saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and int(self.model.step.numpy()) % self.every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


"""
A run never mixes into another: if the output folder already holds one, the script
refuses to start, unless it is resuming the embedding of that very folder.
"""


def prepare_output_dir(output_dir, resume=None):
    old_run_files = [
        name
        for name in (EMBEDDING_FILE, "loss.csv")
        if os.path.exists(os.path.join(output_dir, name))
    ]
    resuming_here = resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(
        output_dir
    )
    if old_run_files and not resuming_here:
        existing = os.path.join(output_dir, old_run_files[0])
        raise UserError(
            f"{output_dir} already holds a run ({existing}); continue it with --resume "
            f"{os.path.join(output_dir, EMBEDDING_FILE)}, or choose a new --output-dir."
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError(
            f"Cannot write to the output folder {output_dir} ({error.strerror}); "
            "choose another --output-dir."
        ) from None


"""
**How long a run is.** A run has `--epochs` epochs of steps, or `--max-train-steps`
steps in all if that is fewer; a step is one batch. A resumed run goes on from the step
its embedding reached, and stops at the same total; the cosine decay runs over
`--epochs`, so a larger `--epochs` stretches the rest of it.
"""


def planned_steps(steps_per_epoch, epochs, max_train_steps=None, initial_step=0):
    total_steps = steps_per_epoch * epochs
    if max_train_steps:
        total_steps = min(total_steps, max_train_steps)
    if initial_step >= total_steps:
        raise UserError(
            f"The embedding to resume already has {initial_step} steps, the whole "
            f"run ({total_steps}); raise --epochs or --max-train-steps to go on."
        )
    return total_steps


def continue_from_step(trainer, step):
    trainer.step.assign(step)
    trainer.optimizer.iterations.assign(step)  # the learning rate's place in its schedule


class StopAfterSteps(keras.callbacks.Callback):
    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step.numpy()) >= self.max_steps:
            self.model.stop_training = True


"""
**Interruptions.** Ctrl-C or SIGTERM ends training after the current step, and the
embedding reached so far is saved as at any end of training; a second Ctrl-C stops at
once. A loss (or vector) that stops being finite ends training too, and the last good
state, not the broken one, is put back and saved.
"""


class Interrupted(UserError):
    exit_code = 130  # the shell's code for a program ended by Ctrl-C


@contextlib.contextmanager
def stop_training_on_signals(trainer):
    """Within it, SIGINT and SIGTERM stop `trainer` after its current step; yields
    the list of the signals received."""
    received = []

    def stop_after_this_step(signal_number, frame):
        if received:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        received.append(signal.Signals(signal_number).name)
        print(f"\n{received[0]}: stopping after this step to save the embedding.")
        trainer.stop_training = True

    previous_handlers = {
        sig: signal.signal(sig, stop_after_this_step) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


class StopAfterSignal(keras.callbacks.Callback):
    """Keras clears `stop_training` when a `fit` begins: a signal that came just before
    still stops training, after the next step."""

    def __init__(self, signals_received):
        super().__init__()
        self.signals_received = signals_received

    def on_train_batch_end(self, batch, logs=None):
        if self.signals_received:
            self.model.stop_training = True


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.failed_step = None
        self.remember_good_state()

    def remember_good_state(self):
        self.good_state = training_state(self.model)  # a few small arrays
        self.good_step = int(self.good_state["step"])

    def on_train_batch_end(self, batch, logs=None):
        vector = self.model.learned_embedding.numpy()
        if math.isfinite(float(logs["step_loss"])) and np.isfinite(vector).all():
            self.remember_good_state()
            return
        self.failed_step = int(self.model.step.numpy())
        restore_training_state(self.model, self.good_state)
        self.model.stop_training = True


"""
## Extras: watching training

Four views of a run: a progress bar that counts the steps the run will take, the loss
of every step, a montage of the sample images, and the words nearest to the learned
vector.

**The progress bar** counts to the steps an epoch will really take, also when
`--max-train-steps` or a resume ends it early (Keras's own bar would count to the
epoch's full length).
"""


class StepProgressBar(keras.callbacks.Callback):
    def __init__(self, steps_per_epoch, total_steps):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.epochs_to_run = None

    def on_train_begin(self, logs=None):
        if self.epochs_to_run is None:  # a resumed run may call `fit` twice
            first_epoch = int(self.model.step.numpy()) // self.steps_per_epoch
            self.epochs_to_run = math.ceil(self.total_steps / self.steps_per_epoch) - first_epoch
            self.epochs_begun = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs_begun += 1
        end_of_epoch = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        self.steps_this_epoch = end_of_epoch - int(self.model.step.numpy())
        print(f"Epoch {epoch + 1} ({self.epochs_begun} of {self.epochs_to_run} in this run)")
        self.bar = keras.utils.Progbar(self.steps_this_epoch, stateful_metrics=["loss"])

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(min(batch + 1, self.steps_this_epoch), [("loss", float(logs["loss"]))])


"""
**The loss** of every step goes to `loss.csv` (step, epoch, loss, seconds) and, at the
end, to `loss.png`. A resumed run first cuts the log back to the step it resumes from.
A real run's loss is noisy from step to step, as each step draws a new timestep and
noise; the plot adds a running mean.
"""


class LossLogger(keras.callbacks.Callback):
    """Appends (step, epoch, loss, seconds) to a CSV file after every training step,
    and prints the typical time of a step at the end."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.epoch = 0
        self.step_seconds = []

    def on_train_begin(self, logs=None):
        if not os.path.exists(self.path):
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "epoch", "loss", "seconds"])

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_begin(self, batch, logs=None):
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self.step_start
        self.step_seconds.append(seconds)
        step = int(self.model.step.numpy())
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([step, self.epoch, float(logs["step_loss"]), round(seconds, 4)])

    def print_step_time(self):
        if len(self.step_seconds) > 1:
            # The first step also traces (and compiles) the train step: leave it out.
            print(
                f"Trained {len(self.step_seconds)} steps: "
                f"{1000 * np.median(self.step_seconds[1:]):.0f} ms/step (median; the "
                f"first step, which traces the model, took {self.step_seconds[0]:.1f} s)."
            )


def cut_loss_log(path, step):
    """Keeps the rows of the steps up to `step`, which a resumed run goes on from: a
    run killed after its last save logged steps that the resumed run takes again."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f)) or [["step", "epoch", "loss", "seconds"]]
    kept = [row for row in rows if len(row) == len(header) and row[0].isdigit()]
    kept = [row for row in kept if int(row[0]) <= step]
    with open(path + ".partial", "w", newline="") as f:
        csv.writer(f).writerows([header, *kept])
    os.replace(path + ".partial", path)


def plot_loss(csv_path, png_path):
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(row["step"]) for row in rows])
    losses = np.array([float(row["loss"]) for row in rows])
    plt.figure(figsize=(8, 4))
    plt.plot(steps, losses, alpha=0.4, label="loss per step")
    window = min(50, len(losses) // 3)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        plt.plot(steps[window - 1 :], smooth, label=f"mean of {window} steps")
    plt.xlabel("step")
    plt.ylabel("denoising loss (MSE)")
    plt.legend()
    plt.tight_layout()
    plt.savefig(png_path)
    plt.close()


"""
**A progress montage.** Each sampling epoch rebuilds `samples/progress.png` from the
sample files: a row per sample prompt, a column per sampling epoch (the first image of
each batch), so the concept can be seen emerging at a glance.
"""

MONTAGE_LABEL_HEIGHT = 20  # pixels of label above the columns and above each row


def montage_cells(samples_dir, prompts):
    """{(row, epoch): path} of the sample files of `prompts` found in `samples_dir`."""
    cells = {}
    for row, prompt in enumerate(prompts):
        pattern = re.compile(rf"^epoch-(\d+)_{re.escape(slugify(prompt))}\.png$")
        for name in os.listdir(samples_dir):
            match = pattern.match(name)
            if match:
                cells[(row, int(match.group(1)))] = os.path.join(samples_dir, name)
    return cells


def build_progress_montage(samples_dir, prompts, path=None):
    """Draws the montage from the files alone, so a resumed run rebuilds it whole."""
    path = path or os.path.join(samples_dir, "progress.png")
    cells = montage_cells(samples_dir, prompts)
    if not cells:
        return None
    epochs = sorted({epoch for _, epoch in cells})
    tile = plt.imread(next(iter(cells.values()))).shape[0]  # tiles are square
    label = MONTAGE_LABEL_HEIGHT
    height = label + len(prompts) * (label + tile)
    width = len(epochs) * tile
    canvas = np.ones((height, width, 3), dtype="float32")
    for (row, epoch), cell_path in cells.items():
        first_image = plt.imread(cell_path)[:tile, :tile, :3]
        top = label + row * (label + tile) + label
        left = epochs.index(epoch) * tile
        canvas[top : top + tile, left : left + tile] = first_image

    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = figure.add_axes([0, 0, 1, 1])
    axes.imshow(canvas, interpolation="nearest")
    axes.set_axis_off()
    text = dict(fontsize=8, va="center", clip_on=True)
    for column, epoch in enumerate(epochs):
        name = "before training" if epoch == 0 else f"epoch {epoch}"
        axes.text(column * tile + 3, label / 2, name, **text)
    for row, prompt in enumerate(prompts):
        axes.text(3, label + row * (label + tile) + label / 2, prompt, **text)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


class ProgressMontage(keras.callbacks.Callback):
    """Rebuilds the montage after the sample callbacks of each sampling epoch."""

    def __init__(self, samples_dir, prompts, frequency):
        super().__init__()
        self.samples_dir = samples_dir
        self.prompts = prompts
        self.frequency = frequency

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.frequency == 0:
            build_progress_montage(self.samples_dir, self.prompts)


"""
**The nearest words.** For each learned vector: the 5 vocabulary tokens nearest to it by
cosine similarity, its norm, and the median norm of the vocabulary's rows. Right after
initialization the nearest word is the initializer itself; a vector far longer than real
words is a known sign of overtraining (it drowns the rest of the prompt).
"""


def nearest_words(stable_diffusion, token_ids, k=5):
    tokenizer = stable_diffusion.tokenizer
    matrix = get_embedding_layer(stable_diffusion.text_encoder).token_embedding.get_weights()[0]
    vocabulary = np.delete(matrix, token_ids, axis=0)  # the original words only
    vocabulary_ids = np.delete(np.arange(len(matrix)), token_ids)
    vocabulary_norms = np.linalg.norm(vocabulary, axis=1)
    report = []
    for token_id in token_ids:
        vector = matrix[token_id]
        similarity = vocabulary @ vector / (vocabulary_norms * np.linalg.norm(vector) + 1e-12)
        nearest = np.argsort(-similarity)[:k]
        report.append(
            {
                "token": tokenizer.decoder[int(token_id)],
                "norm": float(np.linalg.norm(vector)),
                "vocabulary_median_norm": float(np.median(vocabulary_norms)),
                "nearest": [
                    {
                        "word": tokenizer.decoder[int(vocabulary_ids[i])].replace("</w>", ""),
                        "cosine": float(similarity[i]),
                    }
                    for i in nearest
                ],
            }
        )
    return report


def report_nearest_words(stable_diffusion, token_ids, path=None):
    report = nearest_words(stable_diffusion, token_ids)
    for entry in report:
        words = ", ".join(f"{n['word']} ({n['cosine']:.2f})" for n in entry["nearest"])
        print(
            f"{entry['token']}: nearest words {words}; norm {entry['norm']:.3f} "
            f"(median word {entry['vocabulary_median_norm']:.3f})"
        )
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    return report


"""
## Extras: speed

`--precision` sets Keras's dtype policy for every model; the learned vector and the
loss stay in float32 under each. `auto`, the default, picks by what the hardware
computes fast:

- `mixed_bfloat16` on a GPU of compute capability 8.0 or more (A100, L4, RTX 30xx and
  later compute bfloat16 as fast as float16, and bfloat16 needs no loss scaling), and
  on a CPU with bfloat16 arithmetic (`avx512_bf16` or `amx_bf16`);
- `mixed_float16`, with Keras's loss scaling (which `scaled_loss` in the trainer
  applies), on older GPUs with float16 tensor cores (compute capability 7.x: V100, and
  the T4 of Colab's free tier);
- `float32` elsewhere: on a CPU without bfloat16 arithmetic both mixed policies made a
  step more than twice as slow in our measurements.

The GPU choices follow TensorFlow's mixed-precision guide; they are unmeasured here.
`mixed_bfloat16` computes the float32 loss within 1% (tested).

`--xla` compiles the models with XLA. `auto` turns it on with a GPU only: on a CPU it
made training slower in our measurements, and Keras itself leaves it off under
`tf.distribute`. `benchmarks/train_step.py` times a step.
"""

PRECISIONS = ["auto", "float32", "mixed_float16", "mixed_bfloat16"]
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags():
    """The CPU's feature flags, as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_facts():
    """(name, compute capability) of the first GPU, or None without one."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", gpus[0].name), details.get("compute_capability")


def choose_precision(gpu, cpu_flags):
    """(policy, reason) for `--precision auto`; `gpu` is `gpu_facts()`."""
    if gpu:
        name, capability = gpu
        if capability and capability >= (8, 0):
            return (
                "mixed_bfloat16",
                f"{name} (compute capability {capability[0]}.{capability[1]}) computes bfloat16 natively",
            )
        if capability and capability >= (7, 0):
            return (
                "mixed_float16",
                f"{name} (compute capability {capability[0]}.{capability[1]}) has float16 tensor cores, not bfloat16",
            )
        return "float32", f"{name} has no float16 tensor cores"
    found = [flag for flag in BFLOAT16_CPU_FLAGS if flag in cpu_flags]
    if found:
        return "mixed_bfloat16", f"this CPU has bfloat16 arithmetic ({', '.join(found)})"
    return "float32", "no GPU, and this CPU has no bfloat16 arithmetic (no avx512_bf16 or amx_bf16)"


def resolve_precision(precision_flag):
    """The dtype policy for `--precision`: as given, or chosen for the hardware."""
    if precision_flag != "auto":
        return precision_flag
    precision, reason = choose_precision(gpu_facts(), cpu_flags())
    print(f"--precision auto: {precision}, as {reason}.")
    return precision


def use_xla(xla_flag, distribute=False):
    if xla_flag == "auto":
        return bool(tf.config.list_physical_devices("GPU")) and not distribute
    return xla_flag == "on"


"""
**The UNet's backward.** Textual inversion needs the gradient of the loss with respect
to the text context only: back through every UNet layer that follows a cross-attention,
input gradients all the way, and no weight gradients (TensorFlow prunes those). Yet a
profile of a float32 step at 128 px on a 2-core AVX2 CPU found the UNet's backward
costing 2.9 forwards, two thirds of it in `Conv2DBackpropInput` and most of the rest in
the transposed `MatMul`s of the Dense layers' input gradients. TensorFlow's CPU kernels
for these are 3 to 10 times slower than the forward op when a layer sees few pixels or
tokens: the UNet's 4x4 and 2x2 levels at 128 px (and its 8x8 level at 512 px). The
same numbers come from a plain matmul with the kernel on the left and, for a
convolution, a sum of the kernel taps' shifted slices ("col2im").

`use_fast_input_gradients` gives the UNet's Conv2D and Dense layers that gradient where
they see at most `FAST_GRADIENT_ROWS` rows (batch x pixels, or batch x tokens); the
forward ops are TensorFlow's own. The UNet's backward then cost about one forward (872
against 2617 ms in the profile's process). It applies on a CPU in float32 without XLA,
the case we measured; on a GPU cuDNN's kernels stay.
"""

FAST_GRADIENT_ROWS = 128


def kernel_first_matmul(kernel_2d, upstream_2d):
    """upstream_2d @ kernel_2d.T, computed as (kernel_2d @ upstream_2d.T).T."""
    return tf.transpose(tf.matmul(kernel_2d, upstream_2d, transpose_b=True))


def dilate(tensor, stride):
    """Puts stride - 1 zeros after every pixel of [batch, height, width, channels]."""
    if stride == 1:
        return tensor
    _, height, width, channels = tensor.shape
    spread = tf.pad(
        tensor[:, :, None, :, None],
        [[0, 0], [0, 0], [0, stride - 1], [0, 0], [0, stride - 1], [0, 0]],
    )
    return tf.reshape(spread, [-1, height * stride, width * stride, channels])


def conv_input_gradient(kernel, upstream, input_shape, stride):
    """The gradient of a "valid" convolution with respect to its input (col2im)."""
    kernel_height, kernel_width, in_channels, out_channels = kernel.shape
    _, height, width, _ = input_shape
    _, out_height, out_width, _ = upstream.shape
    columns = kernel_first_matmul(
        ops.reshape(kernel, (-1, out_channels)), ops.reshape(upstream, (-1, out_channels))
    )
    columns = ops.reshape(
        columns, (-1, out_height, out_width, kernel_height * kernel_width, in_channels)
    )
    taps = []
    for i in range(kernel_height):
        for j in range(kernel_width):
            tap = dilate(columns[:, :, :, i * kernel_width + j], stride)
            below, right = height - i - tap.shape[1], width - j - tap.shape[2]
            tap = tf.pad(tap, [[0, 0], [i, max(below, 0)], [j, max(right, 0)], [0, 0]])
            taps.append(tap[:, :height, :width])
    return tf.add_n(taps)


def static_rows(shape):
    return math.prod(shape[:-1]) if None not in shape[:-1] else None


def convolution_with_fast_input_gradient(stride):
    @tf.custom_gradient
    def convolve(x, kernel, bias):
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, stride, "VALID"), bias)

        def gradient(upstream):
            strides = [1, stride, stride, 1]
            rows = static_rows(upstream.shape)
            if rows is not None and rows <= FAST_GRADIENT_ROWS:
                x_gradient = conv_input_gradient(kernel, upstream, x.shape, stride)
            else:
                x_gradient = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=kernel, out_backprop=upstream,
                    strides=strides, padding="VALID",
                )  # fmt: skip
            kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=upstream,
                strides=strides, padding="VALID",
            )  # fmt: skip
            return x_gradient, kernel_gradient, tf.reduce_sum(upstream, axis=[0, 1, 2])

        return y, gradient

    return convolve


CONVOLUTIONS = {stride: convolution_with_fast_input_gradient(stride) for stride in (1, 2)}


@tf.custom_gradient
def dense_with_fast_input_gradient(x, kernel, bias):
    in_features, out_features = kernel.shape
    x_2d = tf.reshape(x, (-1, in_features))
    y_2d = tf.nn.bias_add(tf.matmul(x_2d, kernel), bias)
    y = tf.reshape(y_2d, tf.concat([tf.shape(x)[:-1], [out_features]], axis=0))

    def gradient(upstream):
        upstream_2d = tf.reshape(upstream, (-1, out_features))
        rows = static_rows(x.shape)
        if rows is not None and rows <= FAST_GRADIENT_ROWS:
            x_gradient = kernel_first_matmul(kernel, upstream_2d)
        else:
            x_gradient = tf.matmul(upstream_2d, kernel, transpose_b=True)
        kernel_gradient = tf.matmul(x_2d, upstream_2d, transpose_a=True)
        bias_gradient = tf.reduce_sum(upstream_2d, axis=0)
        return tf.reshape(x_gradient, tf.shape(x)), kernel_gradient, bias_gradient

    return y, gradient


class FastGradientConv2D(keras.layers.Conv2D):
    def call(self, inputs):
        bias = self.bias if self.use_bias else ops.zeros((self.filters,), inputs.dtype)
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(bias)
        y = CONVOLUTIONS[self.strides[0]](inputs, kernel, bias)
        return self.activation(y)


class FastGradientDense(keras.layers.Dense):
    def call(self, inputs, training=None):
        bias = self.bias if self.use_bias else ops.zeros((self.units,), inputs.dtype)
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(bias)
        y = dense_with_fast_input_gradient(inputs, kernel, bias)
        return self.activation(y)


def use_fast_input_gradients(diffusion_model):
    """Gives the UNet's plain Conv2D and Dense layers the fast input gradient, in place
    (the same weights); before the train step is traced. Returns how many."""
    swapped = 0
    for layer in diffusion_model._flatten_layers(include_self=False):
        if getattr(layer, "quantization_mode", None) is not None:
            continue
        if type(layer) is keras.layers.Conv2D and layer.padding == "valid":
            plain = layer.groups == 1 and tuple(layer.dilation_rate) == (1, 1)
            plain = plain and layer.data_format == "channels_last"
            if plain and layer.strides[0] == layer.strides[1] and layer.strides[0] in CONVOLUTIONS:
                layer.__class__ = FastGradientConv2D
                swapped += 1
        elif type(layer) is keras.layers.Dense:
            layer.__class__ = FastGradientDense
            swapped += 1
    return swapped


def fast_gradients_apply(precision, jit_compile):
    return precision == "float32" and not jit_compile and not tf.config.list_physical_devices("GPU")


"""
**Gradient accumulation.** `--gradient-accumulation-steps N` splits each batch of
`--batch-size` images into N micro-batches, run one after the other, and updates the
vector once with their mean gradient: a batch of 4 then needs the memory of a batch of
1 (`--batch-size 4 --gradient-accumulation-steps 4`). A step is still one update, so
`--max-train-steps`, the learning-rate schedule, `loss.csv` and `--resume` count as
without it. Each micro-batch draws its rows of the random numbers the whole batch
would draw, so 2 micro-batches of 1 take the very step one batch of 2 takes (tested).
"""


def rows_of_whole_draw(draw, shape, parts, part):
    """Draws `shape`'s values for all `parts` parts of a batch; returns part `part`'s
    rows. Each part then gets the random numbers the whole batch would give it."""
    rows = shape[0]
    return draw((rows * parts, *shape[1:]))[part * rows : (part + 1) * rows]


class AccumulatingFineTuner(StableDiffusionFineTuner):
    def __init__(self, *args, accumulation_steps=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps

    def standard_normal(self, shape):
        draw = super().standard_normal
        return rows_of_whole_draw(draw, shape, self.accumulation_steps, self.micro_batch)

    def random_timesteps(self, shape):
        draw = super().random_timesteps
        return rows_of_whole_draw(draw, shape, self.accumulation_steps, self.micro_batch)

    def loss_and_gradient(self, images, token_ids):
        rows = images.shape[0] // self.accumulation_steps
        # Every micro-batch makes the batch's draws from the same random state.
        random_state = tf.identity(self.seed_generator.state.value)

        def add_micro_batch(i, loss_sum, gradient_sum):
            self.seed_generator.state.assign(random_state)
            self.micro_batch = i
            loss, gradient = super(AccumulatingFineTuner, self).loss_and_gradient(
                images[i * rows : (i + 1) * rows], token_ids[i * rows : (i + 1) * rows]
            )
            return i + 1, loss_sum + loss, gradient_sum + gradient

        _, loss_sum, gradient_sum = tf.while_loop(
            lambda i, *sums: i < self.accumulation_steps,
            add_micro_batch,
            (tf.constant(0), tf.constant(0.0), tf.zeros_like(self.learned_embedding.value)),
        )
        return loss_sum / self.accumulation_steps, gradient_sum / self.accumulation_steps


"""
**Cached latents.** The frozen VAE encoder turns the same few photos into latents at
every step: 569 of a 4532 ms CPU step at 128 px in our measurements. `--cache-latents` encodes
`CACHED_VIEWS` augmented views (random crops and flips) of each image once, before
training, and keeps the encoder's outputs, the mean and log-variance of each view's
latent distribution. Each step then picks a cached view at random and samples from
its distribution, as the tutorial samples, without the encoder. 10 views: each of the
tutorial's photos is seen 25 times an epoch, so 10 views keep most of the variety of
crops while the encoder runs 80 times in all instead of 12,500. Off by default, as the
tutorial draws a new crop every step (AUTOMATIC1111 and kohya's sd-scripts offer the
same trade).
"""

CACHED_VIEWS = 10


def encode_views(images, latent_encoder, seed=SEED, views=CACHED_VIEWS, make_view=augment):
    """The encoder's outputs for `views` augmented views of each image, as an array
    [images, views, resolution / 8, resolution / 8, 8]. View v of image i is augmented
    with the seed (seed, i * views + v), so the same seed caches the same views."""
    progress = keras.utils.Progbar(len(images) * views, unit_name="view")
    print(f"Caching the latents of {views} views of {len(images)} images:")
    encoded = []
    for i, image in enumerate(images):
        for v in range(views):
            view = make_view(image, tf.constant([seed, i * views + v], "int64"))
            encoded.append(ops.convert_to_numpy(latent_encoder(view[None], training=False))[0])
            progress.add(1)
    return np.stack(encoded).reshape(len(images), views, *encoded[0].shape).astype("float32")


def cache_latents(sets, latent_encoder, seed=SEED, views=CACHED_VIEWS):
    """The sets with the encoder's outputs for cached views in place of the images."""
    encoded = encode_views(
        np.concatenate([pairs.images for pairs in sets]), latent_encoder, seed, views
    )
    ends = np.cumsum([len(pairs.images) for pairs in sets])
    starts = ends - [len(pairs.images) for pairs in sets]
    return [
        TextImagePairs(encoded[start:end], pairs.token_ids)
        for start, end, pairs in zip(starts, ends, sets)
    ]


def pick_cached_view(views, seed):
    """`assemble_train_dataset`'s augmentation with cached latents: one of the image's
    cached views, chosen by the example's seed."""
    view = tf.random.stateless_uniform((), seed, 0, views.shape[0], dtype="int32")
    return views[view]


def use_cached_latents(trainer):
    """The trainer's batches hold encoder outputs already: its encoder is the identity."""
    trainer.training_image_encoder = keras.layers.Identity()


"""
## Extras: training on several devices

`--distribute` trains data-parallel with `tf.distribute.MirroredStrategy`: every GPU
holds a copy of the models, each step's batch (`--batch-size`, the global batch) is
split evenly among them, and the optimizer sums their gradients before it updates the
learned vector on all of them at once. `DistributedFineTuner` is the tutorial's trainer
with three things changed:

- each replica's loss counts `1 / replicas`, so that the summed gradient is the mean
  over the global batch (Keras's convention for `tf.distribute`);
- every replica draws the step's random numbers (latent sample, noise, timesteps) for
  the whole global batch, from the same seed, and keeps the rows of its own examples:
  each example gets its own noise, exactly as on one device;
- the learned vector is written into every device's copy of the token matrix through
  the strategy (a `merge_call`), so that the copies stay equal.

So 2 devices with 1 image each take the same step as 1 device with a batch of 2 (tested
on two logical CPU devices, with real images). One difference remains: Keras clips
gradients (`global_clipnorm=10`) per replica, before summing them; the two agree
whenever the gradient norm is under 10. As every batch is a function of the seed and
the step, a distributed run repeats with the same `--seed`, and resumes exactly.

Without GPUs the strategy spreads over the CPU's logical devices: just one unless the
program splits the CPU first with `tf.config.set_logical_device_configuration`, as the
test does.
"""


class DistributedFineTuner(StableDiffusionFineTuner):
    def rows_of_this_replica(self, draw, shape):
        replica = tf.distribute.get_replica_context()
        parts, part = replica.num_replicas_in_sync, replica.replica_id_in_sync_group
        return rows_of_whole_draw(draw, shape, parts, part)

    def standard_normal(self, shape):
        return self.rows_of_this_replica(super().standard_normal, shape)

    def random_timesteps(self, shape):
        return self.rows_of_this_replica(super().random_timesteps, shape)

    def scaled_loss(self, loss):
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        return super().scaled_loss(loss / replicas)

    def write_learned_embedding(self):
        def write_rows(matrix, vectors):
            matrix.scatter_nd_update(self.placeholder_token_ids[:, None], vectors)

        def write_on_every_device(strategy, vectors):
            matrix = self.token_embedding.embeddings.value
            strategy.extended.update(matrix, write_rows, args=(vectors,), group=False)

        vectors = self.learned_embedding.value
        if tf.distribute.in_cross_replica_context():  # e.g. from a callback
            write_on_every_device(tf.distribute.get_strategy(), vectors)
        else:
            tf.distribute.get_replica_context().merge_call(write_on_every_device, args=(vectors,))


def distribution_strategy(distribute, batch_size):
    """MirroredStrategy over the GPUs (or logical CPUs) with --distribute, else
    TensorFlow's default strategy, whose `scope()` changes nothing."""
    if not distribute:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if batch_size % len(devices):
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over the "
            f"{len(devices)} devices of --distribute; use a multiple of {len(devices)}."
        )
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    print(
        f"Training on {strategy.num_replicas_in_sync} replicas "
        f"({', '.join(device.name for device in devices)}), "
        f"each with {batch_size // strategy.num_replicas_in_sync} of the {batch_size} "
        "images of a step."
    )
    return strategy


def sample_on_one_device(stable_diffusion):
    """KerasCV draws images with `predict_on_batch`, which under a MirroredStrategy
    would hand every replica the whole batch and return all their answers, one batch
    per replica. Drawing is not what we spread over devices: with this, the models
    predict as plain models do, with the first device's copy of the weights."""
    for model in sd_parts(stable_diffusion):
        # Keras's record of the strategy the model was built in (checked on Keras 3.15).
        model._distribute_strategy = None


"""
## Extras: other Stable Diffusion 1.x checkpoints

An embedding works best on the model it was trained on, and most people draw with
SD 1.5 or one of its fine-tunes, not KerasCV's v1.4. `--base-model PATH` trains (and
`tools/`) on any SD 1.x checkpoint: a single `.safetensors` file in the original
CompVis layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`; float16, bfloat16 or float32, with or
without EMA weights, such as `v1-5-pruned-emaonly.safetensors`), or a diffusers folder
(`unet/`, `vae/` and `text_encoder/` holding `*.safetensors`), whose keys are first
renamed to the CompVis ones. Nothing is downloaded. `.ckpt` pickles are refused: loading
one runs code from the file.

`load_base_model(path, stable_diffusion)` pairs every variable of the four KerasCV
models with a CompVis key by walking the KerasCV layers in the order the CompVis module
tree builds them, never by Keras's variable names, which come from global counters;
every variable must be paired exactly once. The whole file is checked from its
safetensors header (every key, shape and dtype) before any weight is written, so a
wrong file ends in one sentence and leaves the models as they were. Convolution
kernels go from OIHW to HWIO, dense kernels are transposed, and the VAE attention's
1x1 convolutions may be stored as linear layers (diffusers). `position_ids`,
`model_ema.*`, `first_stage_model.loss.*` and the noise-schedule buffers are not
weights of these models.

Checked against diffusers and transformers on the same random SD 1.x checkpoint
(`tests/test_diffusers_oracle.py`), relative to the largest reference value: text
encoder 1.0e-6, VAE posterior mean 1.9e-5, UNet noise prediction 1.7e-4, decoder
8.2e-6, and the textual-inversion step's loss 9.0e-6 and placeholder gradient 1.3e-4.
What remains is KerasCV's own arithmetic: its GEGLU uses the tanh approximation of
GELU (98% of the UNet's, the loss's and the gradient's difference), and its GroupNorm
epsilon is 1e-5 where the original VAE uses 1e-6 (two thirds of the VAE encoder's).
With both patched, every output agrees to float32 rounding (6.4e-6 at most).
"""

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."


def short_hash(path, chunk=1 << 20):
    """First 10 hex of sha256(size, first MB, last MB): fast even on 4 GB."""
    if os.path.isdir(path):  # a diffusers folder: the files load_base_model reads
        paths = [
            f
            for sub in ("unet", "vae", "text_encoder")
            for f in _pick_files(os.path.join(path, sub))
        ]
    else:
        paths = [path]
    h = hashlib.sha256()
    for p in paths:
        size = os.path.getsize(p)
        h.update(str(size).encode())
        with open(p, "rb") as f:
            h.update(f.read(chunk))
            f.seek(max(0, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:10]


def _header(path):
    """{key: (dtype, shape, (begin, end))} from a safetensors header; checks the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise UserError(
                f"{path} is not a valid .safetensors file (damaged or not safetensors); re-download or re-convert it."
            )
        try:
            meta = json.loads(f.read(n))
        except ValueError:
            raise UserError(
                f"{path} has a damaged safetensors header; re-download or re-convert it."
            ) from None
    meta.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in meta.values()), default=0)
    if size != 8 + n + end:
        raise UserError(
            f"{path} is truncated or damaged ({size} bytes instead of {8 + n + end}); re-download it."
        )
    return {
        k: (
            v["dtype"],
            tuple(v["shape"]),
            (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]),
        )
        for k, v in meta.items()
    }


def _read(path, key, dtype, shape, span):
    """One tensor as float32 numpy, read with safetensors; BF16 (numpy lacks it) is widened by hand.
    The file is opened per tensor so its memory map (page cache in RSS) never grows to the whole file.
    """
    if dtype == "BF16":
        raw = np.fromfile(path, np.uint16, (span[1] - span[0]) // 2, offset=span[0])
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    with safetensors.safe_open(path, framework="np") as f:
        return f.get_tensor(key).astype(np.float32)


def _pick_files(folder):
    """The *.safetensors of one diffusers component; prefer the plain variant over .fp16 etc."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    plain = [f for f in files if re.fullmatch(r"[\w-]+\.safetensors", os.path.basename(f))]
    return plain or files


def _unet_key(k, up_has_attn):
    # fmt: off
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    # fmt: on
    for a, b in fixed.items():
        if k.startswith(a + "."):
            return b + k[len(a) :]
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k
    )
    if m:
        side, b, kind, r, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "resnets":
            name, rest = rest.split(".", 1)
            rest = resnet.get(name, name) + "." + rest
        if side == "down":  # input_blocks.0 is conv_in; each level has 2 blocks + a downsampler
            if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.N.0.op.*
                return f"input_blocks.{3 * b + 3}.0.op." + rest.split(".", 1)[1]
            return f"input_blocks.{3 * b + r + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        i = 3 * b + (2 if kind == "upsamplers" else r)
        sub = {"resnets": "0", "attentions": "1", "upsamplers": "2" if up_has_attn[b] else "1"}[
            kind
        ]
        return f"output_blocks.{i}.{sub}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        rest = m[3]
        if m[1] == "resnets":
            name, rest = rest.split(".", 1)
            rest = resnet.get(name, name) + "." + rest
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}.{rest}"
    return "unmapped." + k


def _vae_key(k, n_up):
    # fmt: off
    attn = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
            "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
    # fmt: on
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
    m = re.fullmatch(r"(.*)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k)
    if m:
        return f"{m[1]}.mid.attn_1.{attn.get(m[2], m[2])}.{m[3]}"
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(
        r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k
    )
    # diffusers counts decoder up blocks from the bottom, CompVis from the top
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.resnets\.",
        lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.",
        k,
    )
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.",
        k,
    )
    return k


def read_diffusers_folder(folder):
    """{ldm_key: (file, file_key, dtype, shape, span)} for a diffusers folder (header only, no data read)."""
    parts = {}
    for sub in ("unet", "vae", "text_encoder"):
        files = _pick_files(os.path.join(folder, sub))
        if not files:
            raise UserError(
                f"{folder} has no {sub}/*.safetensors; give a diffusers SD 1.x folder or a single .safetensors checkpoint."
            )
        parts[sub] = {k: (f, k) + v for f in files for k, v in _header(f).items()}
    if os.path.isdir(os.path.join(folder, "text_encoder_2")) or any(
        k.startswith("add_embedding.") for k in parts["unet"]
    ):
        raise UserError(
            f"{folder} is an SDXL model, but only SD 1.x checkpoints (e.g. stable-diffusion-v1-5) are supported."
        )
    up_has_attn = {
        int(m[1]): True
        for k in parts["unet"]
        if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    up_has_attn = {b: up_has_attn.get(b, False) for b in range(16)}
    n_up = len({k.split(".")[2] for k in parts["vae"] if k.startswith("decoder.up_blocks.")})
    out = {}
    for k, v in parts["unet"].items():
        out[UNET + _unet_key(k, up_has_attn)] = v
    for k, v in parts["vae"].items():
        out[VAE + _vae_key(k, n_up)] = v
    for k, v in parts["text_encoder"].items():
        out[
            "cond_stage_model.transformer."
            + (k if k.startswith("text_model.") else "text_model." + k)
        ] = v
    return out


def read_source(path):
    """{ldm_key: (file, file_key, dtype, shape, span)} for a single file or a diffusers folder."""
    if not os.path.exists(path):
        raise UserError(
            f"{path} does not exist; give an SD 1.x .safetensors file or a diffusers folder."
        )
    if os.path.isdir(path):
        return read_diffusers_folder(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if path.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")) or magic in (
        b"PK",
        b"\x80\x02",
        b"\x80\x04",
    ):
        raise UserError(
            f"{path} is a PyTorch pickle, which can run code when loaded, so use the model's .safetensors "
            'release or, only if you trust its source, convert it once with python -c "import torch, '
            "safetensors.torch as s; d=torch.load('in.ckpt', map_location='cpu', weights_only=False); "
            "d=d.get('state_dict', d); s.save_file({k: v.clone().contiguous() for k, v in d.items() "
            "if torch.is_tensor(v)}, 'out.safetensors')\" and pass out.safetensors."
        )
    src = {k: (path, k) + v for k, v in _header(path).items()}
    old = "cond_stage_model.transformer.embeddings."  # pre-4.x transformers layout lacks "text_model."
    if old + "token_embedding.weight" in src:
        src = {
            (
                CLIP + k[len("cond_stage_model.transformer.") :]
                if k.startswith("cond_stage_model.transformer.")
                else k
            ): v
            for k, v in src.items()
        }
    return src


def _chain(model):
    """Layers on the main path of a functional model, input to output, following each
    layer's FIRST input backwards (x in ResBlock([x, t_emb]), Concatenate([x, skip]))."""
    out, op = [], model.outputs[0]._keras_history.operation
    while type(op).__name__ != "InputLayer":
        out.append(op)
        op = op._inbound_nodes[0].input_tensors[0]._keras_history.operation
    return out[::-1]


def _unet_plan():
    """(LDM prefix, KerasCV class) along the UNet main path, in CompVis order; None = no weights."""
    plan, i = [("input_blocks.0.0", "PaddedConv2D")], 1
    for level in range(4):
        for _ in range(2):
            plan.append((f"input_blocks.{i}.0", "ResBlock"))
            if level < 3:
                plan.append((f"input_blocks.{i}.1", "SpatialTransformer"))
            i += 1
        if level < 3:
            plan.append((f"input_blocks.{i}.0.op", "PaddedConv2D"))
            i += 1
    plan += [
        ("middle_block.0", "ResBlock"),
        ("middle_block.1", "SpatialTransformer"),
        ("middle_block.2", "ResBlock"),
    ]
    for j in range(12):
        plan += [(None, "Concatenate"), (f"output_blocks.{j}.0", "ResBlock")]
        if j >= 3:
            plan.append((f"output_blocks.{j}.1", "SpatialTransformer"))
        if j % 3 == 2 and j < 11:  # upsampler is sub-module 1 after a plain ResBlock, else 2
            plan.append((f"output_blocks.{j}.{1 if j < 3 else 2}", "Upsample"))
    return plan + [("out.0", "GroupNormalization"), (None, "Activation"), ("out.2", "PaddedConv2D")]


def _vae_plans():
    enc, dec = [("encoder.conv_in", "PaddedConv2D")], []
    for i in range(4):
        enc += [(f"encoder.down.{i}.block.{j}", "ResnetBlock") for j in range(2)]
        if i < 3:
            enc.append((f"encoder.down.{i}.downsample.conv", "PaddedConv2D"))
    mid = [
        ("mid.block_1", "ResnetBlock"),
        ("mid.attn_1", "AttentionBlock"),
        ("mid.block_2", "ResnetBlock"),
    ]
    enc += [("encoder." + p, c) for p, c in mid]
    enc += [
        ("encoder.norm_out", "GroupNormalization"),
        (None, "Activation"),
        ("encoder.conv_out", "PaddedConv2D"),
        ("quant_conv", "PaddedConv2D"),
        (None, "Lambda"),
    ]  # Lambda: mean * 0.18215
    dec = [
        (None, "Rescaling"),
        ("post_quant_conv", "PaddedConv2D"),
        ("decoder.conv_in", "PaddedConv2D"),
    ]
    dec += [("decoder." + p, c) for p, c in mid]
    for i in (3, 2, 1, 0):
        dec += [(f"decoder.up.{i}.block.{j}", "ResnetBlock") for j in range(3)]
        if i > 0:
            dec += [(None, "UpSampling2D"), (f"decoder.up.{i}.upsample.conv", "PaddedConv2D")]
    dec += [
        ("decoder.norm_out", "GroupNormalization"),
        (None, "Activation"),
        ("decoder.conv_out", "PaddedConv2D"),
    ]
    return enc, dec


def _pairs(layer, p):
    """(variable, LDM key, kind) for one KerasCV layer under LDM prefix p.
    kind: 'conv' OIHW->HWIO, 'dense' (out,in)->(in,out), 'same' (bias, norm gamma/beta, embeddings).
    """
    name = type(layer).__name__
    if name == "PaddedConv2D":
        return [
            (layer.conv2d.kernel, p + ".weight", "conv"),
            (layer.conv2d.bias, p + ".bias", "same"),
        ]
    if name == "Dense":
        return [(layer.kernel, p + ".weight", "dense")] + (
            [(layer.bias, p + ".bias", "same")] if layer.use_bias else []
        )
    if name in ("GroupNormalization", "LayerNormalization"):
        return [(layer.gamma, p + ".weight", "same"), (layer.beta, p + ".bias", "same")]
    if name == "Embedding":
        return [(layer.embeddings, p + ".weight", "same")]
    subs = {  # attribute -> LDM sub-module, per KerasCV block class
        "ResBlock": [
            ("entry_flow.0", "in_layers.0"),
            ("entry_flow.2", "in_layers.2"),
            ("embedding_flow.1", "emb_layers.1"),
            ("exit_flow.0", "out_layers.0"),
            ("exit_flow.2", "out_layers.3"),
            ("residual_projection", "skip_connection"),
        ],
        "ResnetBlock": [
            ("norm1", "norm1"),
            ("conv1", "conv1"),
            ("norm2", "norm2"),
            ("conv2", "conv2"),
            ("residual_projection", "nin_shortcut"),
        ],
        "AttentionBlock": [
            ("norm", "norm"),
            ("q", "q"),
            ("k", "k"),
            ("v", "v"),
            ("proj_out", "proj_out"),
        ],
        "SpatialTransformer": [
            ("norm", "norm"),
            ("proj1", "proj_in"),
            ("proj2", "proj_out"),
            ("transformer_block", "transformer_blocks.0"),
        ],
        "BasicTransformerBlock": [
            ("norm1", "norm1"),
            ("attn1", "attn1"),
            ("norm2", "norm2"),
            ("attn2", "attn2"),
            ("norm3", "norm3"),
            ("geglu.dense", "ff.net.0.proj"),
            ("dense", "ff.net.2"),
        ],
        # to_q/k/v have no bias; out_proj is the original to_out.0 (Linear, then Dropout)
        "CrossAttention": [
            ("to_q", "to_q"),
            ("to_k", "to_k"),
            ("to_v", "to_v"),
            ("out_proj", "to_out.0"),
        ],
        "Upsample": [("conv", "conv")],
        "CLIPEmbedding": [
            ("token_embedding", "token_embedding"),
            ("position_embedding", "position_embedding"),
        ],
        "CLIPEncoderLayer": [
            ("layer_norm1", "layer_norm1"),
            ("clip_attn", "self_attn"),
            ("layer_norm2", "layer_norm2"),
            ("fc1", "mlp.fc1"),
            ("fc2", "mlp.fc2"),
        ],
        "CLIPAttention": [(a, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")],
    }[name]
    out = []
    for attr, sub in subs:
        obj = layer
        for a in attr.split("."):
            obj = obj[int(a)] if a.isdigit() else getattr(obj, a)
        if hasattr(obj, "weights"):  # residual_projection is a lambda when shapes already match
            out += _pairs(obj, f"{p}.{sub}")
    return out


def _walk(layers, plan, prefix, what):
    names = [type(l).__name__ for l in layers]
    if names != [c for _, c in plan]:
        raise RuntimeError(f"KerasCV {what} does not have the expected SD 1.x structure: {names}")
    return [t for l, (p, _) in zip(layers, plan) if p for t in _pairs(l, prefix + p)]


def build_plan(sd):
    """[(variable, LDM key, kind)] covering every variable of the four models exactly once."""
    te, ie, dm, de = sd.text_encoder, sd.image_encoder, sd.diffusion_model, sd.decoder
    te_plan = [("embeddings", "CLIPEmbedding")] + [
        (f"encoder.layers.{i}", "CLIPEncoderLayer") for i in range(12)
    ]
    plan = _walk(
        _chain(te), te_plan + [("final_layer_norm", "LayerNormalization")], CLIP, "TextEncoder"
    )
    enc, dec = _vae_plans()
    plan += _walk(ie.layers, enc, VAE, "ImageEncoder") + _walk(de.layers, dec, VAE, "Decoder")
    chain = _chain(dm)
    plan += _walk(chain, _unet_plan(), UNET, "DiffusionModel")
    # time embedding MLP: walk back from the first ResBlock's second input (t_emb)
    op = chain[1]._inbound_nodes[0].input_tensors[1]._keras_history.operation
    t = []
    while type(op).__name__ != "InputLayer":
        t.append(op)
        op = op._inbound_nodes[0].input_tensors[0]._keras_history.operation
    plan += _walk(
        t[::-1],
        [("time_embed.0", "Dense"), (None, "Activation"), ("time_embed.2", "Dense")],
        UNET,
        "time MLP",
    )
    ids = [id(v) for v, _, _ in plan]
    every = [v for m in (te, ie, dm, de) for v in m.weights]
    if len(set(ids)) != len(ids) or set(ids) != {id(v) for v in every}:
        raise RuntimeError(f"mapping covers {len(set(ids))} of {len(every)} KerasCV variables")
    return plan


def _expected(var, kind):
    s = tuple(var.shape)
    if kind == "conv":  # Keras HWIO <- torch OIHW
        return (s[3], s[2], s[0], s[1])
    return (s[1], s[0]) if kind == "dense" else s


def check_model_family(src, path):
    """Refuses SDXL, SD 2.x and inpainting files from their header alone."""
    keys = set(src)
    shape = lambda k: src[k][3] if k in src else None
    if any(k.startswith(("conditioner.", UNET + "label_emb.")) for k in keys):
        raise UserError(
            f"{path} is an SDXL checkpoint, but only SD 1.x checkpoints (e.g. v1-5-pruned-emaonly.safetensors) are supported."
        )
    k_shape = shape(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    tok = shape(CLIP + "embeddings.token_embedding.weight")
    if (
        any(k.startswith("cond_stage_model.model.") for k in keys)
        or (k_shape and k_shape[1] == 1024)
        or (tok and tok[1] == 1024)
    ):
        raise UserError(
            f"{path} is an SD 2.x checkpoint (1024-wide text encoder), but only SD 1.x checkpoints (e.g. v1-5-pruned-emaonly.safetensors) are supported."
        )
    conv_in = shape(UNET + "input_blocks.0.0.weight")
    if conv_in and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(
            f"{path} has a {conv_in[1]}-channel UNet input (an inpainting or other special model); use a plain SD 1.x text-to-image checkpoint."
        )


def validate(src, plan, path):
    """Raises UserError unless `src` holds every SD 1.x weight with the right shape."""
    check_model_family(src, path)
    missing = [k for _, k, _ in plan if k not in src]
    if len(missing) == len(plan):
        raise UserError(
            f"{path} holds no SD 1.x model weights (is it a LoRA, an embedding or a VAE alone?); give a full SD 1.x checkpoint."
        )
    if missing:
        raise UserError(
            f"{path} is not a complete SD 1.x checkpoint: {len(missing)} of {len(plan)} weights are missing (e.g. {missing[0]})."
        )
    for var, k, kind in plan:
        want, got = _expected(var, kind), src[k][3]
        ok = got == want or (
            kind == "conv" and want[2:] == (1, 1) and got == want[:2]
        )  # 1x1 conv stored as Linear
        if src[k][2] not in ("F16", "F32", "F64", "BF16"):
            raise UserError(
                f"{path} is not an SD 1.x checkpoint: {k} is stored as {src[k][2]} where a float type is needed."
            )
        if not ok:
            raise UserError(
                f"{path} is not an SD 1.x checkpoint: {k} has shape {list(got)} where {list(want)} is needed."
            )


def load_base_model(path, stable_diffusion):
    """Sets every weight of the four KerasCV SD 1.x models from path; returns {'hash', 'format'}.

    stable_diffusion: object with .text_encoder, .image_encoder, .diffusion_model, .decoder
    (built at any resolution; text encoder with the plain 49408-token vocabulary).
    Not loaded: position_ids, model_ema.*, first_stage_model.loss.*, noise-schedule buffers.
    """
    path = os.fspath(path)
    src = read_source(path)
    plan = build_plan(stable_diffusion)
    validate(src, plan, path)  # nothing is assigned before this passes
    for var, k, kind in plan:
        w = _read(*src[k])
        if kind == "conv":
            w = np.transpose(w.reshape(w.shape + (1, 1)) if w.ndim == 2 else w, (2, 3, 1, 0))
        elif kind == "dense":
            w = w.T
        var.assign(np.ascontiguousarray(w, dtype=var.dtype))
    return {
        "hash": short_hash(path),
        "format": "diffusers" if os.path.isdir(path) else "safetensors",
    }


def build_base_model(
    resolution,
    tokenizer,
    base_model=None,
    random_weights=False,
    jit_compile=True,
    precision="float32",
):
    """`build_stable_diffusion`, with the weights of the `base_model` file or folder
    when one is given (the models are then built without downloading any)."""
    stable_diffusion = build_stable_diffusion(
        resolution, tokenizer, random_weights or bool(base_model), jit_compile, precision
    )
    if base_model:
        print(f"Loading the base model {base_model}.")
        load_base_model(base_model, stable_diffusion)
    return stable_diffusion


def base_model_name(base_model):
    """How the embedding's metadata names the model it was trained on."""
    if not base_model:
        return BASE_MODEL
    name = os.path.basename(os.path.normpath(base_model))
    return f"{name} (short sha256 {short_hash(base_model)})"


"""
## Extras: drawing with saved embeddings

`tools/generate.py` and `tools/evaluate.py` load embeddings into a fresh
StableDiffusion: each token is added to the tokenizer and its vectors to the text
encoder, as for training. `{}` in a prompt stands for the first embedding's token.
"""


def add_embeddings(tokenizer, embeddings, paths):
    """Adds each embedding's tokens to the tokenizer; returns the rows to append to
    the text encoder, in token id order."""
    vectors, token_ids = [], []
    for embedding, path in zip(embeddings, paths):
        if embedding.token in tokenizer.encoder:
            raise UserError(
                f"The token {embedding.token} of {path} is already in the vocabulary "
                "(it is a word, or another --embedding has it); load one file per token."
            )
        token_ids += add_new_tokens(tokenizer, embedding.token, len(embedding.vectors))
        vectors.append(embedding.vectors)
    return rows_in_id_order(np.concatenate(vectors), token_ids)


def prompts_with_tokens(prompt_templates, tokenizer, embeddings):
    """The prompts, `{}` standing for the first embedding's token, each token written
    out as all its vectors' names; each prompt must use a loaded token."""
    tokens = [embedding.token for embedding in embeddings]
    prompts = []
    for prompt in prompt_templates:
        prompt = prompt.replace("{}", tokens[0])
        if not any(token in prompt for token in tokens):
            raise UserError(
                f'The prompt "{prompt}" uses none of the loaded tokens '
                f"({', '.join(tokens)}); write one into it, or put {{}} where it goes."
            )
        for embedding in embeddings:
            text = placeholder_text(embedding.token, len(embedding.vectors))
            prompt = prompt.replace(embedding.token, text)
        encode_prompt(tokenizer, prompt)  # checks its length
        prompts.append(prompt)
    return prompts


def build_stable_diffusion_with_embeddings(args, tokenizer, new_rows):
    """A fresh StableDiffusion whose text encoder has `new_rows` for the tokens that
    `add_embeddings` added to `tokenizer`."""
    jit_compile = use_xla(args.xla)
    stable_diffusion = build_base_model(
        args.resolution,
        tokenizer,
        args.base_model,
        args.random_weights,
        jit_compile,
        resolve_precision(args.precision),
    )
    stable_diffusion._text_encoder = extend_text_encoder(
        stable_diffusion.text_encoder, new_rows, jit_compile
    )
    return stable_diffusion


"""
## The command line

Every flag, with its default: the tutorial's value wherever the tutorial has one.
"""

TOOLS_EPILOG = """\
separate jobs, from a saved embedding:
  python tools/generate.py --embedding FILE --prompt "an oil painting of {}"
      draw images with one or more learned embeddings (see its --help)
  python tools/evaluate.py --embedding FILE --images PATHS...
      score an embedding with CLIP, as the textual-inversion paper did (see its --help)
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Teach StableDiffusion a new concept via textual inversion "
        "(the keras.io tutorial, runnable today).",
        epilog=TOOLS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    concept = parser.add_argument_group("the concept")
    concept.add_argument(
        "--images",
        nargs="+",
        default=SINGLE_IMAGE_URLS,
        metavar="IMAGE",
        help="Images of the concept: URLs, files or folders (default: the tutorial's 5 "
        "photos of a cat doll).",
    )
    concept.add_argument(
        "--group-images",
        nargs="*",
        default=None,
        metavar="IMAGE",
        help="Images of a group of the concept, trained with the group prompts; the flag "
        "alone uses none (default: the tutorial's 3 group photos when --images is the "
        "tutorial's, else none).",
    )
    concept.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="TEMPLATE",
        help="Prompt templates for --images, {} standing for the token; an image x.jpg "
        "with a caption file x.txt beside it trains with that caption instead (default: "
        "the tutorial's 25 object prompts, or 16 style prompts with --learnable-property "
        "style).",
    )
    concept.add_argument(
        "--learnable-property",
        choices=["object", "style"],
        default="object",
        help="Teach an object or a style; sets the default prompts (default: %(default)s).",
    )
    concept.add_argument(
        "--placeholder-token",
        default=PLACEHOLDER_TOKEN,
        help="The new token, one lowercase word that is not in the vocabulary "
        "(default: %(default)s).",
    )
    concept.add_argument(
        "--initializer-token",
        default=INITIALIZER_TOKEN,
        help="A one-token word whose embedding the new token starts from "
        "(default: %(default)s).",
    )
    concept.add_argument(
        "--num-vectors",
        type=int,
        default=1,
        help="Learn the concept as this many consecutive new tokens, each its own "
        "vector, all starting from the initializer word (default: %(default)s, the "
        "tutorial's).",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=int,
        default=EPOCHS,
        help="Epochs to train; an epoch is every prompt 5 times, 250 steps with the "
        "tutorial's images (default: %(default)s).",
    )
    training.add_argument(
        "--max-train-steps",
        type=int,
        default=None,
        help="Stop after this many training steps (batches) in all, if that is fewer "
        "than --epochs makes (default: no limit).",
    )
    training.add_argument(
        "--learning-rate",
        type=float,
        default=LEARNING_RATE,
        help="Where the cosine decay of the learning rate starts (default: %(default)s).",
    )
    training.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help="Images per step; with --distribute, over all devices (default: %(default)s).",
    )
    training.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="Split each batch into this many micro-batches, run one after the other, "
        "for one update: the memory of a smaller batch (default: %(default)s).",
    )
    training.add_argument(
        "--cache-latents",
        action="store_true",
        help=f"Encode {CACHED_VIEWS} augmented views of each image once, before training, "
        "instead of a new crop at every step: faster, less varied (default: off).",
    )
    training.add_argument(
        "--resolution",
        type=int,
        default=RESOLUTION,
        help="Image size in pixels, a multiple of 128 (default: %(default)s).",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="Seed of the data order, the noise and the sample images; the same seed "
        "gives the same run (default: %(default)s).",
    )
    output = parser.add_argument_group("what a run writes")
    output.add_argument(
        "--output-dir",
        default=OUTPUT_DIR,
        help="Folder for the embedding, samples, loss log and final images "
        "(default: %(default)s).",
    )
    output.add_argument(
        "--sample-every",
        type=int,
        default=SAMPLE_EVERY,
        help="Draw the sample prompts every this many epochs; 0: never " "(default: %(default)s).",
    )
    output.add_argument(
        "--sample-steps",
        type=int,
        default=SAMPLE_STEPS,
        help="Diffusion steps per sample and final image (default: %(default)s).",
    )
    output.add_argument(
        "--save-every",
        type=int,
        default=1,
        help=f"Save the learned embedding ({EMBEDDING_FILE}) and the training state "
        f"({TRAINING_STATE_FILE}) every this many epochs, and always at the end; 0: "
        "only at the end (default: %(default)s).",
    )
    output.add_argument(
        "--save-every-steps",
        type=int,
        default=SAVE_EVERY_STEPS,
        help="Also save them every this many steps, so that a run killed without "
        "warning (kill -9, out of memory, a Colab disconnect) loses at most as many "
        "steps; a save writes a few kilobytes. 0: only every --save-every epochs "
        "(default: %(default)s).",
    )
    output.add_argument(
        "--resume",
        metavar="EMBEDDING_FILE",
        help="Go on from a saved embedding and the step it reached, instead of starting "
        f"from the initializer word. With the {TRAINING_STATE_FILE} saved beside it, the "
        "run goes on exactly as if it had not stopped (default: start afresh).",
    )
    machine = parser.add_argument_group("machine")
    add_machine_flags(machine)
    machine.add_argument(
        "--distribute",
        action="store_true",
        help="Train data-parallel on all GPUs with MirroredStrategy; --batch-size is "
        "split evenly among them (default: off).",
    )
    return parser


def parse_args(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] in (["generate"], ["evaluate"]):
        raise UserError(
            f"{argv[0]} is a script of its own now; run python tools/{argv[0]}.py "
            f"{' '.join(argv[1:])}"
        )
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def add_machine_flags(parser):
    """Flags that say how to run the models, shared with the tools."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="Keras dtype policy of the models; auto: mixed_bfloat16 on GPUs of compute "
        "capability 8.0+ and CPUs with bfloat16 arithmetic, mixed_float16 (with loss "
        "scaling) on older GPUs, float32 elsewhere (default: %(default)s).",
    )
    parser.add_argument(
        "--xla",
        choices=["auto", "on", "off"],
        default="auto",
        help="Compile the models with XLA; auto: on a GPU, and not with --distribute "
        "(default: %(default)s).",
    )
    parser.add_argument(
        "--base-model",
        metavar="PATH",
        help="An SD 1.x checkpoint to use instead of KerasCV's v1.4 weights: a "
        ".safetensors file in the original (CompVis) layout, such as "
        "v1-5-pruned-emaonly.safetensors, or a diffusers folder; nothing is downloaded "
        "(default: KerasCV's v1.4, downloaded once).",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="Build the KerasCV models with random weights and download nothing (image "
        "URLs not in the Keras cache become synthetic stand-ins): for smoke runs and "
        "tests; the images are noise (default: off).",
    )


def add_drawing_flags(parser, images_flag, images_default):
    """Adds the flags that the drawing tools share; `images_flag` is their name for
    the number of images per prompt."""
    parser.add_argument(
        images_flag,
        type=int,
        default=images_default,
        help="Images per prompt (default: %(default)s).",
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=SAMPLE_STEPS,
        help="Diffusion steps per image (default: %(default)s).",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help="Seed of the images (default: %(default)s)."
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=RESOLUTION,
        help="Image size in pixels, a multiple of 128 (default: %(default)s).",
    )
    parser.add_argument(
        "--output-dir",
        default=OUTPUT_DIR,
        help="Folder the images and reports go into (default: %(default)s).",
    )
    add_machine_flags(parser)


def check_machine_args(args):
    """The model flags: a base model that is no SD 1.x file is refused before any
    model is built (from the file's header alone)."""
    if args.base_model and args.random_weights:
        raise UserError("--base-model and --random-weights exclude each other; pass one.")
    if args.base_model:
        check_model_family(read_source(args.base_model), args.base_model)


def check_drawing_args(args):
    check_machine_args(args)
    check_resolution(args.resolution)
    check_at_least_one(
        args, *[n for n in ("batch_size", "num_images", "sample_steps") if n in args]
    )
    return args


def check_batch_fits(sets, batch_size):
    examples = steps_per_epoch(sets, batch_size=1)
    if batch_size > examples:
        raise UserError(
            f"--batch-size {batch_size} is more than the {examples} examples of an "
            f"epoch; use {examples} or less."
        )


def check_resolution(resolution):
    if resolution < 128 or resolution % 128:
        raise UserError(
            f"--resolution {resolution} is not a multiple of 128, which the UNet "
            "needs; use 512 (the tutorial's), 384, 256 or 128."
        )


def check_at_least_one(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} is {value}; it must be 1 or more.")


def check_args(args):
    """Settings the models cannot take, reported before anything is built."""
    check_machine_args(args)
    check_resolution(args.resolution)
    check_at_least_one(
        args,
        "batch_size",
        "gradient_accumulation_steps",
        "epochs",
        "num_vectors",
        "max_train_steps",
        "sample_steps",
    )
    accumulation = args.gradient_accumulation_steps
    if args.batch_size % accumulation:
        raise UserError(
            f"--batch-size {args.batch_size} does not split into "
            f"--gradient-accumulation-steps {accumulation} equal micro-batches; use a "
            f"multiple of {accumulation}."
        )
    if accumulation > 1 and args.distribute:
        raise UserError(
            "--gradient-accumulation-steps does not work with --distribute yet; leave "
            "one of them out."
        )
    for flag, value in [
        ("--sample-every", args.sample_every),
        ("--save-every", args.save_every),
        ("--save-every-steps", args.save_every_steps),
    ]:
        if value < 0:
            raise UserError(f"{flag} is {value}; it must be 0 (never) or more.")
    if args.learning_rate <= 0:
        raise UserError(f"--learning-rate is {args.learning_rate}; it must be above 0.")
    for template in args.prompts or []:
        if "{}" not in template:
            raise UserError(
                f'The prompt template "{template}" has no {{}}; put {{}} where the '
                'token goes, as in "a photo of my {}".'
            )


"""
`run_training` is the tutorial's "Training the new embedding" with the extras the
flags ask for: the before-training sample, the trainer (on several devices with
--distribute), the callbacks, and what is kept however training ends.
"""


def training_callbacks(stable_diffusion, args, placeholder_token, sample_prompts, fingerprint):
    callbacks = []
    if args.sample_every:
        options = dict(steps=args.sample_steps, seed=args.seed)
        callbacks += [
            GenerateImages(stable_diffusion, prompt, args.output_dir, args.sample_every, **options)
            for prompt in sample_prompts
        ]
        samples_dir = os.path.join(args.output_dir, "samples")
        callbacks.append(ProgressMontage(samples_dir, sample_prompts, args.sample_every))
    callbacks.append(
        SaveEmbedding(
            args.output_dir,
            placeholder_token,
            embedding_metadata(args, placeholder_token),
            fingerprint,
            every_epochs=args.save_every,
            every_steps=args.save_every_steps,
        )
    )
    return callbacks


def training_sets(args, tokenizer, placeholder):
    """The sets of text-image pairs of a run: uncaptioned images with the prompts,
    captioned ones with their captions, and the group images with the group prompts."""
    download = not args.random_weights
    files = resolve_image_files(args.images, download)
    captions = {path: read_caption(path) for path in files}
    uncaptioned = [path for path in files if captions[path] is None]
    captioned = [path for path in files if captions[path] is not None]
    group_files = resolve_image_files(group_image_sources(args), download)
    sets = []
    if uncaptioned:
        prompts = concept_prompts(args)
        sets.append(assemble_dataset(uncaptioned, prompts, tokenizer, placeholder, args.resolution))
    if captioned:
        captions = [captions[path] for path in captioned]
        sets += assemble_captioned_dataset(
            captioned, captions, tokenizer, placeholder, args.resolution
        )
    if group_files:
        sets.append(
            assemble_dataset(group_files, GROUP_PROMPTS, tokenizer, placeholder, args.resolution)
        )
    return sets


def train_from_step(trainer, steps_from, epoch_steps, epochs, first_step, callbacks):
    """Trains from `first_step` to the end of the last epoch, or until a callback stops
    training; `steps_from(step)` is the dataset from that step on. A run resumed within
    an epoch first finishes that epoch, in a `fit` of its own, as Keras's epochs all
    have one length."""
    epoch, steps_into_epoch = divmod(first_step, epoch_steps)
    options = dict(callbacks=callbacks, verbose=0)  # StepProgressBar shows the progress
    if steps_into_epoch:
        steps_left = epoch_steps - steps_into_epoch
        train(
            trainer, steps_from(first_step), steps_left, epoch + 1, initial_epoch=epoch, **options
        )
        epoch += 1
    if not trainer.stop_training and epoch < epochs:
        dataset = steps_from(epoch * epoch_steps)
        train(trainer, dataset, epoch_steps, epochs, initial_epoch=epoch, **options)


def fine_tuner_class(args):
    if args.distribute:
        return DistributedFineTuner
    if args.gradient_accumulation_steps > 1:
        steps = args.gradient_accumulation_steps
        return functools.partial(AccumulatingFineTuner, accumulation_steps=steps)
    return StableDiffusionFineTuner


def run_training(
    stable_diffusion,
    sets,
    placeholder_token_ids,
    args,
    placeholder_token,
    num_vectors=1,
    initial_step=0,
    state=None,
    fingerprint=None,
    strategy=None,
):
    placeholder = placeholder_text(placeholder_token, num_vectors)
    sample_prompts = [prompt.format(placeholder) for prompt in SAMPLE_PROMPTS]
    epoch_steps = steps_per_epoch(sets, args.batch_size)
    total_steps = planned_steps(epoch_steps, args.epochs, args.max_train_steps, initial_step)
    if args.sample_every and not initial_step:
        draw_samples(
            stable_diffusion, sample_prompts[0], 0, args.output_dir, args.sample_steps, args.seed
        )

    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.learning_rate, decay_steps=epoch_steps * args.epochs
    )
    with (strategy or tf.distribute.get_strategy()).scope():
        trainer = build_trainer(
            stable_diffusion,
            placeholder_token_ids,
            learning_rate,
            seed=args.seed,
            jit_compile=use_xla(args.xla, args.distribute),
            trainer_class=fine_tuner_class(args),
        )
    if state:
        restore_training_state(trainer, state)
    else:
        continue_from_step(trainer, initial_step)
    augmentation = augment
    if args.cache_latents:
        use_cached_latents(trainer)
        augmentation = pick_cached_view

    loss_log = os.path.join(args.output_dir, "loss.csv")
    cut_loss_log(loss_log, initial_step)
    loss_logger = LossLogger(loss_log)
    non_finite_guard = StopOnNonFiniteLoss()
    # The loss is logged first, under its own step, before a non-finite one is undone.
    callbacks = [loss_logger, non_finite_guard, StepProgressBar(epoch_steps, total_steps)]
    callbacks.append(StopAfterSteps(total_steps))
    callbacks += training_callbacks(
        stable_diffusion, args, placeholder_token, sample_prompts, fingerprint or {}
    )

    def steps_from(step):
        return assemble_train_dataset(
            sets, args.batch_size, args.seed, args.epochs, step, augmentation
        )

    with stop_training_on_signals(trainer) as signals_received:
        callbacks.append(StopAfterSignal(signals_received))
        train_from_step(trainer, steps_from, epoch_steps, args.epochs, initial_step, callbacks)
    loss_logger.print_step_time()

    output = args.output_dir
    plot_loss(loss_log, os.path.join(output, "loss.png"))
    words_path = os.path.join(output, "learned_words.json")
    report_nearest_words(stable_diffusion, placeholder_token_ids, words_path)
    embedding_path = os.path.join(output, EMBEDDING_FILE)
    if non_finite_guard.failed_step:
        raise UserError(
            f"The loss became non-finite at step {non_finite_guard.failed_step}, so "
            f"training stopped; the last good embedding (step {non_finite_guard.good_step}) "
            f"is in {embedding_path}: lower --learning-rate and --resume from it."
        )
    if signals_received:
        raise Interrupted(
            f"Stopped by {signals_received[0]} at step {int(trainer.step.numpy())}; the "
            f"embedding is saved in {embedding_path}: continue with --resume {embedding_path}."
        )
    return trainer


"""
`main()` runs the steps in the order of the tutorial. The cheap ones come first, so
that a bad token or a missing image is reported before the models are built.
"""


def main(argv=None):
    args = parse_args(argv)
    prepare_output_dir(args.output_dir, args.resume)
    # The same --seed gives the same models (with --random-weights) and the same run.
    keras.utils.set_random_seed(args.seed)

    resumed = load_embedding(args.resume) if args.resume else None
    placeholder_token = resumed.token if resumed else args.placeholder_token
    num_vectors = len(resumed.vectors) if resumed else args.num_vectors
    if resumed and resumed.token != args.placeholder_token:
        print(f"Resuming the embedding of {resumed.token} from {args.resume}.")
    placeholder = placeholder_text(placeholder_token, num_vectors)

    tokenizer = build_tokenizer()
    placeholder_token_ids, initializer_id = add_placeholder_tokens(
        tokenizer, placeholder_token, args.initializer_token, num_vectors
    )
    sets = training_sets(args, tokenizer, placeholder)
    check_batch_fits(sets, args.batch_size)
    precision = resolve_precision(args.precision)
    fingerprint = run_fingerprint(args, sets, precision, placeholder_token, num_vectors)
    state = resume_state(args.resume, resumed, fingerprint) if resumed else None
    if state:
        resumed = resumed._replace(vectors=state["learned_embedding"])
    initial_step = (
        int(state["step"]) if state else int(resumed.metadata.get("step", 0)) if resumed else 0
    )

    jit_compile = use_xla(args.xla, args.distribute)
    # With --distribute the models are built on every device.
    strategy = distribution_strategy(args.distribute, args.batch_size)
    with strategy.scope():
        stable_diffusion = build_base_model(
            args.resolution, tokenizer, args.base_model, args.random_weights, jit_compile, precision
        )
        if resumed:
            new_rows = rows_in_id_order(resumed.vectors, placeholder_token_ids)
        else:
            initializer_rows = [initializer_id] * num_vectors
            new_rows = token_rows(stable_diffusion.text_encoder, initializer_rows)
        stable_diffusion._text_encoder = extend_text_encoder(
            stable_diffusion.text_encoder, new_rows, jit_compile
        )
    sample_on_one_device(stable_diffusion)
    freeze_models(stable_diffusion)
    if fast_gradients_apply(precision, jit_compile):
        use_fast_input_gradients(stable_diffusion.diffusion_model)
    if args.cache_latents:
        latent_encoder = latent_distribution_encoder(stable_diffusion.image_encoder)
        sets = cache_latents(sets, latent_encoder, args.seed)

    run_training(
        stable_diffusion,
        sets,
        placeholder_token_ids,
        args,
        placeholder_token,
        num_vectors,
        initial_step,
        state,
        fingerprint,
        strategy,
    )
    generate_final_images(
        stable_diffusion, placeholder, args.output_dir, args.sample_steps, args.seed
    )


def run_command(main_function):
    """Runs a script's main(); a mistake the user can fix ends in one sentence."""
    try:
        main_function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    run_command(main)
