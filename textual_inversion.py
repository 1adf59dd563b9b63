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

With no flags this is the keras.io tutorial, which reads first; the flags' extras and the
command line follow. `tools/generate.py` draws with a saved embedding, `evaluate.py` scores it.
"""

import argparse
import errno
import functools
import math
import os
import re
import sys
import tempfile
from typing import NamedTuple

import keras
import keras_cv
import matplotlib
import numpy as np
import tensorflow as tf
from keras import ops
from keras_cv.models.stable_diffusion import NoiseScheduler

from textual_inversion_extras import checkpoints, hardware, photos, run_control, saving
from textual_inversion_extras import sd2x, unet_backward, watching
from textual_inversion_extras.errors import Interrupted, UserError, run_command
from textual_inversion_extras.errors import is_download_error, keras_download_cache
from textual_inversion_extras.watching import slugify
from textual_inversion_extras.hardware import global_dtype_policy
from textual_inversion_extras.keras_internals import set_part

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


"""
## Building StableDiffusion

We build a `keras_cv.models.StableDiffusion`, whose four parts (text encoder, VAE image
encoder, diffusion UNet, VAE decoder) we use below to fine-tune. It downloads their
weights (about 4 GB) the first time each part is used, so we touch each part now.
(`--random-weights`, `--base-model` and `--precision` build them their own way.)
"""

SD_PARTS = ("text_encoder", "image_encoder", "diffusion_model", "decoder")


def sd_parts(stable_diffusion, parts=SD_PARTS):
    """The models, built (and their weights downloaded) on first access."""
    try:
        return [getattr(stable_diffusion, part) for part in parts]
    except Exception as error:
        if not is_download_error(error):
            raise
        raise UserError(
            f"Could not download the Stable Diffusion weights ({error}); connect to "
            "the internet, or place kcv_encoder.h5, vae_encoder.h5, "
            "kcv_diffusion_model.h5 and kcv_decoder.h5 in "
            f"{keras_download_cache()}, or use --random-weights for a smoke run."
        ) from None


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


def build_stable_diffusion(resolution, tokenizer):
    stable_diffusion = keras_cv.models.StableDiffusion(
        img_height=resolution, img_width=resolution, jit_compile=True
    )
    # The tokenizer, extended with the new token below, was made before the models.
    set_part(stable_diffusion, "tokenizer", tokenizer)
    sd_parts(stable_diffusion)
    return stable_diffusion


"""
Next, a utility to show the generated images; each row also goes to a PNG file.
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
and scaled to [-1, 1], the range the StableDiffusion image encoder expects. Each is read
as a viewer shows it (`photos.read_photo`): turned upright as its EXIF tag says, as
phones write them, and in 8-bit RGB whatever the file's mode (16-bit, transparent...).
"""


def download_images(urls):
    files = []
    for url in urls:
        try:
            files.append(keras.utils.get_file(origin=url))
        except Exception as error:
            raise UserError(
                f"Could not download the image {url} ({error}); check the URL and "
                "your connection, or pass local files with --images."
            ) from None
    return files


def load_images(files, resolution, warn_if_small=True):
    resize = keras.layers.Resizing(height=resolution, width=resolution, crop_to_aspect_ratio=True)
    images = []
    for path in files:
        image = photos.read_photo(path)
        if warn_if_small:
            photos.warn_if_upscaled(path, image, resolution)
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
tokenized, and is padded to the text encoder's fixed length of 77 with the end-of-text
token (or the tokenizer's `pad_token_id` where one is set: SD 2.x pads with 0).
"""


def encode_prompt(tokenizer, prompt):
    token_ids = tokenizer.encode(prompt)
    if len(token_ids) > MAX_PROMPT_LENGTH:
        raise UserError(
            f'The prompt "{prompt}" is {len(token_ids)} tokens long, more than the '
            f"{MAX_PROMPT_LENGTH} the text encoder takes; shorten it."
        )
    pad_token_id = getattr(tokenizer, "pad_token_id", tokenizer.end_of_text)
    padding = [pad_token_id] * (MAX_PROMPT_LENGTH - len(token_ids))
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


def token_matrix(text_encoder):
    """The text encoder's token embedding matrix, as a numpy array."""
    return get_embedding_layer(text_encoder).token_embedding.get_weights()[0]


def token_rows(text_encoder, token_ids):
    """The embedding rows of `token_ids`, as a numpy array."""
    return token_matrix(text_encoder)[np.array(token_ids)]


def extend_text_encoder(text_encoder, new_rows, jit_compile=False):
    """A copy of `text_encoder` whose token embedding has `new_rows` appended."""
    old_embedding = get_embedding_layer(text_encoder)
    old_token_weights = old_embedding.token_embedding.get_weights()[0]
    new_token_weights = np.concatenate([old_token_weights, new_rows], axis=0)
    encoder_class = sd2x.text_encoder_class(width=new_token_weights.shape[1])
    with global_dtype_policy(text_encoder.dtype_policy.name):
        new_encoder = encoder_class(
            MAX_PROMPT_LENGTH, vocab_size=len(new_token_weights),
            download_weights=False,  # the pretrained weights have the old vocabulary size
        )  # fmt: skip
    for old_layer, new_layer in zip(text_encoder.layers, new_encoder.layers):
        if old_layer is old_embedding:
            new_layer.token_embedding.set_weights([new_token_weights])
            new_layer.position_embedding.set_weights(old_embedding.position_embedding.get_weights())
        else:
            new_layer.set_weights(old_layer.get_weights())
    new_encoder.compile(jit_compile=jit_compile)
    return new_encoder


"""
Before training, the new token draws as a cat. `draw_samples` draws 3 images of a
prompt, fixed seed, into `samples/epoch-NNN_<prompt>.png` (epoch 0: before training).
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

Textual inversion trains only the placeholder's embedding; everything else is frozen.
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

- `sample_from_encoder_outputs` samples the latents from the distribution the VAE image
  encoder predicts, not only its mean (`standard_normal(shape)` gives the noise for it).
- `get_timestep_embedding` makes the diffusion model's sinusoidal embedding of a batch
  of timesteps, at once (the tutorial mapped over them one by one).
- `get_position_ids` gives the text encoder's position ids, `[[0, 1, ..., 76]]`.
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
loss is the mean squared error between the true and the predicted noise (a velocity
for SD 2.x's 768-v models). Its gradient reaches the token embedding matrix through the
text encoder; we keep only the placeholder's row of it, let the optimizer update the
learned vector, and write that back into the matrix. The step's random numbers come
from the trainer's seed generator; `step` counts steps.
"""


class StableDiffusionFineTuner(keras.Model):
    def __init__(
        self, stable_diffusion, noise_scheduler, placeholder_token_ids, seed=None,
        prediction_type="epsilon", **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.stable_diffusion = stable_diffusion
        self.noise_scheduler, self.prediction_type = noise_scheduler, prediction_type
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

        # Predict the noise (SD 2.x 768-v models: the velocity), and compare with the truth.
        noise_pred = self.stable_diffusion.diffusion_model(
            [noisy_latents, get_timestep_embedding(timesteps), encoder_hidden_state]
        )
        target = noise
        if self.prediction_type == "v_prediction":
            target = sd2x.velocity(self.noise_scheduler.alphas_cumprod, latents, noise, timesteps)
        return ops.mean(ops.square(target - ops.cast(noise_pred, "float32")))

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
    stable_diffusion, placeholder_token_ids, learning_rate, seed=None, jit_compile=False,
    trainer_class=None, prediction_type="epsilon",
):  # fmt: skip
    noise_scheduler = NoiseScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", train_timesteps=1000
    )
    # The extras' trainers extend this one. It computes in the text encoder's precision
    # (under mixed_float16 Keras then scales the loss).
    trainer = (trainer_class or StableDiffusionFineTuner)(
        stable_diffusion, noise_scheduler, placeholder_token_ids, seed=seed, name="trainer",
        dtype=stable_diffusion.text_encoder.dtype_policy.name, prediction_type=prediction_type,
    )  # fmt: skip
    optimizer = keras.optimizers.Adam(
        weight_decay=0.004, learning_rate=learning_rate, epsilon=1e-8, global_clipnorm=10
    )
    trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
    return trainer


def train(trainer, train_ds, epoch_steps, epochs=EPOCHS, callbacks=(), **fit_options):
    # The dataset holds the whole run, already shuffled: Keras is told where an epoch
    # ends, and that the data needs no shuffling of its own.
    return trainer.fit(
        train_ds, epochs=epochs, steps_per_epoch=epoch_steps, callbacks=list(callbacks),
        shuffle=False, **fit_options,
    )  # fmt: skip


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
**The whole run.** The steps above in the tutorial's order, cheap ones first: a bad
token or a missing image is reported before 4 GB of weights download. `TutorialRun`
holds the tutorial's settings and steps; the command line overrides some, for its flags.
"""


class TutorialRun:
    resolution, epochs, learning_rate, seed = RESOLUTION, EPOCHS, LEARNING_RATE, SEED
    sample_every, sample_steps, output_dir = SAMPLE_EVERY, SAMPLE_STEPS, OUTPUT_DIR
    placeholder_token, initializer_token = PLACEHOLDER_TOKEN, INITIALIZER_TOKEN
    images, prompts = SINGLE_IMAGE_URLS, SINGLE_PROMPTS
    group_images, group_prompts = GROUP_IMAGE_URLS, GROUP_PROMPTS
    max_train_steps = None  # the tutorial trains every epoch; a number stops sooner
    build_tokenizer = staticmethod(build_tokenizer)

    def add_token(self, tokenizer):
        """The new token's ids, and the ids of the words their rows start from."""
        token_id, initializer_id = add_placeholder_token(
            tokenizer, self.placeholder_token, self.initializer_token
        )
        return [token_id], [initializer_id]

    def text_image_pairs(self, tokenizer):
        return [
            assemble_dataset(download_images(images), prompts, tokenizer, self.placeholder_token, self.resolution)
            for images, prompts in [(self.images, self.prompts), (self.group_images, self.group_prompts)]
        ]  # fmt: skip

    def build_stable_diffusion(self, tokenizer):
        return build_stable_diffusion(self.resolution, tokenizer)

    def extend_text_encoder(self, stable_diffusion, initializer_ids):
        new_rows = token_rows(stable_diffusion.text_encoder, initializer_ids)
        new_encoder = extend_text_encoder(stable_diffusion.text_encoder, new_rows)
        set_part(stable_diffusion, "text_encoder", new_encoder)

    def freeze_models(self, stable_diffusion):
        freeze_models(stable_diffusion)

    def train(self, stable_diffusion, sets, placeholder_token_ids):
        sample_prompts = [prompt.format(self.placeholder_token) for prompt in SAMPLE_PROMPTS]
        options = dict(steps=self.sample_steps, seed=self.seed)
        for prompt in sample_prompts:
            draw_samples(stable_diffusion, prompt, 0, self.output_dir, **options)
        epoch_steps = steps_per_epoch(sets)
        learning_rate = keras.optimizers.schedules.CosineDecay(
            self.learning_rate, decay_steps=epoch_steps * self.epochs
        )
        trainer = build_trainer(stable_diffusion, placeholder_token_ids, learning_rate, self.seed)
        callbacks = [
            GenerateImages(stable_diffusion, prompt, self.output_dir, self.sample_every, **options)
            for prompt in sample_prompts
        ]
        if self.max_train_steps:
            callbacks.append(run_control.StopAfterSteps(self.max_train_steps))
        train_ds = assemble_train_dataset(sets, seed=self.seed, epochs=self.epochs)
        train(trainer, train_ds, epoch_steps, self.epochs, callbacks)
        return trainer

    def spin(self, stable_diffusion):
        generate_final_images(
            stable_diffusion, self.placeholder_token, self.output_dir, self.sample_steps, self.seed
        )


def run_tutorial(run=None):
    run = run or TutorialRun()
    tokenizer = run.build_tokenizer()
    placeholder_token_ids, initializer_ids = run.add_token(tokenizer)
    sets = run.text_image_pairs(tokenizer)
    stable_diffusion = run.build_stable_diffusion(tokenizer)
    run.extend_text_encoder(stable_diffusion, initializer_ids)
    run.freeze_models(stable_diffusion)
    trainer = run.train(stable_diffusion, sets, placeholder_token_ids)
    run.spin(stable_diffusion)
    return stable_diffusion, trainer


"""
# Beyond the tutorial

The tutorial ends here. Everything below goes further, reached through flags (`--help`),
and builds on the steps above without changing them. Without flags, the run is the
tutorial's, and it also keeps what it learns: the embedding, the loss log, pictures.
"""

"""
## Extras: your own concept

`--images` takes URLs, files or folders of your own photos. Without them the tutorial's
two image sets are used; with them, the tutorial's group photos are left out unless
`--group-images` names some.
"""

# HEIC and AVIF, as phones write them, are listed so that a folder of them is not
# silently empty: a file Pillow cannot open is refused by name, with what to do.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_EXTENSIONS += (".heic", ".heif", ".avif")


def synthetic_image_file(url):
    """A smooth random-colour image file standing for `url`, the same for the same URL:
    with --random-weights (a smoke run) an image not in the Keras cache yet is not
    downloaded."""
    cached = os.path.join(keras_download_cache(), os.path.basename(url))
    if os.path.exists(cached):
        return cached
    print(f"--random-weights: {url} is not downloaded; using a synthetic image.")
    corners = np.random.default_rng(sum(url.encode())).uniform(0, 1, size=(2, 2, 3))
    weights = np.linspace(0, 1, 64)
    rows = corners[0] * (1 - weights[:, None, None]) + corners[1] * weights[:, None, None]
    image = (
        rows[:, 0][:, None] * (1 - weights[None, :, None])
        + rows[:, 1][:, None] * weights[None, :, None]
    )
    path = os.path.join(tempfile.mkdtemp(prefix="synthetic-"), os.path.basename(url) + ".png")
    plt.imsave(path, image)
    return path


def resolve_image_files(sources, download=True):
    """Local files for `sources` (URLs, files, folders)."""
    files = []
    for source in sources:
        if re.match(r"^(https?|ftp|file)://", source):
            files.append(download_images([source])[0] if download else synthetic_image_file(source))
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
## Extras: keeping, watching and stopping a run

Each of these lives in a module of its own, in `textual_inversion_extras/`:

- `saving.py`: the learned embedding, `learned_embeds.safetensors`, a single tensor
  `{placeholder_token: float32 [num_vectors, 768]}`, the layout diffusers'
  `load_textual_inversion`, AUTOMATIC1111 and ComfyUI read for SD 1.x; beside it the
  training state (Adam's moments, the step, the random state), so that `--resume` goes
  on as if the run had never stopped. Both are written whole or not at all.
- `run_control.py`: how long a run is; Ctrl-C, SIGTERM and a non-finite loss stop it
  after the step and keep the last good state.
- `watching.py`: the progress bar, the loss of every step (`loss.csv`, `loss.png`), a
  montage of the sample images, and the words nearest to the learned vectors.
- `hardware.py`: `--precision auto` and `--xla auto` by what the hardware computes
  fast, the devices of `--distribute`, and freed memory kept for reuse on a CPU.
"""

"""
**The UNet's backward.** Textual inversion needs the gradient of the loss with respect
to the text context only, back through the frozen UNet; that backward is most of a
step. `textual_inversion_extras/unet_backward.py` computes the same gradient more
cheaply, by swapping the class of KerasCV's layers in place, before the train step is
traced:

- attention in query chunks, which never holds a whole attention matrix (always);
- group normalization with its statistics summed per channel first, in the VAE too,
  whose backward keeps no float32 copy of its input (always);
- fast input gradients for the Conv2D and Dense layers that see few pixels, where
  TensorFlow's CPU kernels are slow (on a CPU without XLA, in float32 or bfloat16);
- `--gradient-checkpointing`: the UNet's blocks recompute their forward in the
  backward instead of keeping it, for a lower peak of memory.
"""


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
every step (`benchmarks/train_step.py` shows its share of a step). `--cache-latents` encodes
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


"""
**Building the models for the flags.** `build_models` is `build_stable_diffusion` with
the flags' choices: `--random-weights` builds the KerasCV classes with
`download_weights=False`; `--xla` sets `jit_compile`; under a mixed `--precision` the
frozen VAE and UNet hold their weights in the compute dtype, as diffusers does, while
the text encoder, whose token matrix holds the learned vector, keeps float32 weights.
The global dtype policy is as it was afterwards (`global_dtype_policy`).
"""


def build_models(
    resolution, tokenizer, random_weights=False, jit_compile=True, precision="float32",
    family="SD 1.x", prediction_type="epsilon",
):  # fmt: skip
    """KerasCV's four models of `family`; SD 2.x's are its V2 classes, in `StableDiffusion2x`."""
    sd_models = keras_cv.models.stable_diffusion
    if family == "SD 2.x":
        size = (resolution, resolution)
        stable_diffusion = sd2x.StableDiffusion2x(*size, jit_compile, prediction_type)
        text_encoder_class, unet_class = sd2x.TextEncoderV2, sd2x.DiffusionModelV2
    else:
        stable_diffusion = keras_cv.models.StableDiffusion(
            img_height=resolution, img_width=resolution, jit_compile=jit_compile
        )
        text_encoder_class, unet_class = sd_models.TextEncoder, sd_models.DiffusionModel
    set_part(stable_diffusion, "tokenizer", tokenizer)
    with global_dtype_policy(keras.mixed_precision.Policy(precision).compute_dtype):
        if random_weights:
            image_encoder = sd_models.ImageEncoder(download_weights=False)
            unet = unet_class(resolution, resolution, MAX_PROMPT_LENGTH, download_weights=False)
            unet_backward.use_float32_attention_where_needed(unet, family, unet.compute_dtype)
            decoder = sd_models.Decoder(resolution, resolution, download_weights=False)
            set_part(stable_diffusion, "image_encoder", image_encoder)
            set_part(stable_diffusion, "diffusion_model", unet)
            set_part(stable_diffusion, "decoder", decoder)
        frozen_models = sd_parts(stable_diffusion, SD_PARTS[1:])
    with global_dtype_policy(precision):
        if random_weights:
            text_encoder = text_encoder_class(MAX_PROMPT_LENGTH, download_weights=False)
            set_part(stable_diffusion, "text_encoder", text_encoder)
            for model in [stable_diffusion.text_encoder, *frozen_models]:
                model.compile(jit_compile=jit_compile)  # as keras-cv does
        sd_parts(stable_diffusion, SD_PARTS[:1])
    return stable_diffusion


"""
## Extras: other Stable Diffusion 1.x and 2.x checkpoints

`--base-model PATH` trains (and `tools/` draw) on any SD 1.x or 2.x checkpoint, a
`.safetensors` file or a diffusers folder, read by `textual_inversion_extras/checkpoints.py`
into KerasCV's four models (SD 2.x: its V2 classes, `textual_inversion_extras/sd2x.py`);
nothing is downloaded. The header tells the family; `--prediction-type` whether the UNet
predicts the noise or, as SD 2.x's 768-v models do, the velocity.
"""


def build_base_model(
    resolution, tokenizer, base_model=None, random_weights=False, jit_compile=True,
    precision="float32", prediction_type="epsilon",
):  # fmt: skip
    """`build_models`, with the weights of the `base_model` file or folder when one is
    given (the models, of its family, are then built without downloading any)."""
    family = checkpoints.check_base_model(base_model) if base_model else "SD 1.x"
    stable_diffusion = build_models(
        resolution, tokenizer, random_weights or bool(base_model), jit_compile, precision,
        family, prediction_type,
    )  # fmt: skip
    if base_model:
        print(f"Loading the {family} base model {base_model}.")
        checkpoints.load_base_model(base_model, stable_diffusion)
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
        "--images", nargs="+", default=SINGLE_IMAGE_URLS, metavar="IMAGE",
        help="Images of the concept: URLs, files or folders (default: the tutorial's 5 "
        "photos of a cat doll).",
    )  # fmt: skip
    concept.add_argument(
        "--group-images", nargs="*", default=None, metavar="IMAGE",
        help="Images of a group of the concept, trained with the group prompts; the flag "
        "alone uses none (default: the tutorial's 3 group photos when --images is the "
        "tutorial's, else none).",
    )  # fmt: skip
    concept.add_argument(
        "--prompts", nargs="+", default=None, metavar="TEMPLATE",
        help="Prompt templates for --images, {} standing for the token; an image x.jpg "
        "with a caption file x.txt beside it trains with that caption instead (default: "
        "the tutorial's 25 object prompts, or 16 style prompts with --learnable-property "
        "style).",
    )  # fmt: skip
    concept.add_argument(
        "--learnable-property", choices=["object", "style"], default="object",
        help="Teach an object or a style; sets the default prompts (default: %(default)s).",
    )  # fmt: skip
    concept.add_argument(
        "--placeholder-token", default=PLACEHOLDER_TOKEN,
        help="The new token, one lowercase word that is not in the vocabulary "
        "(default: %(default)s).",
    )  # fmt: skip
    concept.add_argument(
        "--initializer-token", default=INITIALIZER_TOKEN,
        help="A one-token word whose embedding the new token starts from "
        "(default: %(default)s).",
    )  # fmt: skip
    concept.add_argument(
        "--num-vectors", type=int, default=1,
        help="Learn the concept as this many consecutive new tokens, each its own "
        "vector, all starting from the initializer word (default: %(default)s, the "
        "tutorial's).",
    )  # fmt: skip
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs", type=int, default=EPOCHS,
        help="Epochs to train; an epoch is every prompt 5 times, 250 steps with the "
        "tutorial's images (default: %(default)s).",
    )  # fmt: skip
    training.add_argument(
        "--max-train-steps", type=int, default=None,
        help="Stop after this many training steps (batches) in all, if that is fewer "
        "than --epochs makes (default: no limit).",
    )  # fmt: skip
    training.add_argument(
        "--learning-rate", type=float, default=LEARNING_RATE,
        help="Where the cosine decay of the learning rate starts (default: %(default)s).",
    )  # fmt: skip
    training.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE,
        help="Images per step; with --distribute, over all devices (default: %(default)s).",
    )  # fmt: skip
    training.add_argument(
        "--gradient-accumulation-steps", type=int, default=1,
        help="Split each batch into this many micro-batches, run one after the other, "
        "for one update: the memory of a smaller batch (default: %(default)s).",
    )  # fmt: skip
    training.add_argument(
        "--cache-latents", action="store_true",
        help=f"Encode {CACHED_VIEWS} augmented views of each image once, before training, "
        "instead of a new crop at every step: faster, less varied (default: off).",
    )  # fmt: skip
    training.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="Recompute each UNet block's forward in the backward instead of keeping "
        "it: less memory, a slower step (default: off).",
    )  # fmt: skip
    training.add_argument(
        "--resolution", type=int, default=RESOLUTION,
        help="Image size in pixels, a multiple of 128 (default: %(default)s).",
    )  # fmt: skip
    training.add_argument(
        "--seed", type=int, default=SEED,
        help="Seed of the data order, the noise and the sample images; the same seed "
        "gives the same run (default: %(default)s).",
    )  # fmt: skip
    output = parser.add_argument_group("what a run writes")
    output.add_argument(
        "--output-dir", default=OUTPUT_DIR,
        help="Folder for the embedding, samples, loss log and final images "
        "(default: %(default)s).",
    )  # fmt: skip
    output.add_argument(
        "--sample-every", type=int, default=SAMPLE_EVERY,
        help="Draw the sample prompts every this many epochs; 0: never " "(default: %(default)s).",
    )  # fmt: skip
    output.add_argument(
        "--sample-prompts", nargs="+", default=SAMPLE_PROMPTS, metavar="TEMPLATE",
        help="Prompt templates of the sample images, {} standing for the token "
        "(default: the tutorial's: " + "; ".join(SAMPLE_PROMPTS) + ").",
    )  # fmt: skip
    output.add_argument(
        "--sample-steps", type=int, default=SAMPLE_STEPS,
        help="Diffusion steps per sample and final image (default: %(default)s).",
    )  # fmt: skip
    output.add_argument(
        "--save-every", type=int, default=1,
        help=f"Save the learned embedding ({saving.EMBEDDING_FILE}) and the training state "
        f"({saving.TRAINING_STATE_FILE}) every this many epochs, and always at the end; 0: "
        "only at the end (default: %(default)s).",
    )  # fmt: skip
    output.add_argument(
        "--save-every-steps", type=int, default=saving.SAVE_EVERY_STEPS,
        help="Also save them every this many steps, so that a run killed without "
        "warning (kill -9, out of memory, a Colab disconnect) loses at most as many "
        "steps; a save writes a few kilobytes. 0: only every --save-every epochs "
        "(default: %(default)s).",
    )  # fmt: skip
    output.add_argument(
        "--snapshots", action=argparse.BooleanOptionalAction, default=True,
        help="Keep each epoch's save and the last as snapshots/step-NNNNNN.safetensors "
        "with its training state, a few kilobytes each, to choose the best step "
        "afterwards (tools/evaluate.py --run); --no-snapshots keeps none "
        "(default: keep them).",
    )  # fmt: skip
    output.add_argument(
        "--resume", metavar="EMBEDDING_FILE",
        help=f"Go on from a saved embedding ({saving.EMBEDDING_FILE} or a snapshot) and the "
        "step it reached, instead of starting from the initializer word. With the training "
        "state saved with it, the run goes on exactly as if it had not stopped "
        "(default: start afresh).",
    )  # fmt: skip
    machine = parser.add_argument_group("machine")
    add_machine_flags(machine)
    machine.add_argument(
        "--distribute", action="store_true",
        help="Train data-parallel on all GPUs with MirroredStrategy; --batch-size is "
        "split evenly among them (default: off).",
    )  # fmt: skip
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def add_machine_flags(parser):
    """Flags that say how to run the models, shared with the tools."""
    parser.add_argument(
        "--precision", choices=hardware.PRECISIONS, default="auto",
        help="Keras dtype policy of the models; auto: mixed_bfloat16 on GPUs of compute "
        "capability 8.0+ and CPUs with bfloat16 arithmetic, mixed_float16 (with loss "
        "scaling) on older GPUs, float32 elsewhere (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--xla", choices=["auto", "on", "off"], default="auto",
        help="Compile the models with XLA; auto: on a GPU, and not with --distribute "
        "(default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--base-model", metavar="PATH",
        help="An SD 1.x or 2.x checkpoint to use instead of KerasCV's v1.4 weights: a "
        ".safetensors file in the original (CompVis) layout, such as "
        "v1-5-pruned-emaonly.safetensors or v2-1_768-ema-pruned.safetensors, or a "
        "diffusers folder; nothing is downloaded (default: KerasCV's v1.4, downloaded once).",
    )  # fmt: skip
    parser.add_argument(
        "--prediction-type", choices=sd2x.PREDICTION_TYPES, default="auto",
        help="What the base model's UNet predicts: the noise (epsilon; SD 1.x, SD 2.x 512-base) "
        "or the velocity (v_prediction; SD 2.x 768-v). auto: a diffusers folder's scheduler "
        "config, else a .yaml beside the file (AUTOMATIC1111's), else v_prediction for an "
        "SD 2.x file named *768* or at --resolution 768+, else epsilon (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--random-weights", action="store_true",
        help="Build the KerasCV models with random weights and download nothing (image "
        "URLs not in the Keras cache become synthetic stand-ins): for smoke runs and "
        "tests; the images are noise (default: off).",
    )  # fmt: skip


def add_drawing_flags(parser, images_flag, images_default):
    """Adds the flags that the drawing tools share; `images_flag` is their name for
    the number of images per prompt."""
    parser.add_argument(
        images_flag, type=int, default=images_default,
        help="Images per prompt (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--sample-steps", type=int, default=SAMPLE_STEPS,
        help="Diffusion steps per image (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=SEED, help="Seed of the images (default: %(default)s)."
    )
    parser.add_argument(
        "--resolution", type=int, default=RESOLUTION,
        help="Image size in pixels, a multiple of 128 (default: %(default)s).",
    )  # fmt: skip
    parser.add_argument(
        "--output-dir", default=OUTPUT_DIR,
        help="Folder the images and reports go into (default: %(default)s).",
    )  # fmt: skip
    add_machine_flags(parser)


def check_machine_args(args):
    """The model flags: a base model that is not a whole SD 1.x or 2.x model is refused
    before any model is built (from the file's header alone), and its family kept in
    `args.base_model_family`; --prediction-type auto becomes what the model predicts."""
    if args.base_model and args.random_weights:
        raise UserError("--base-model and --random-weights exclude each other; pass one.")
    family = checkpoints.check_base_model(args.base_model) if args.base_model else "SD 1.x"
    args.base_model_family, flag = family, args.prediction_type
    args.prediction_type, reason = sd2x.prediction_type(flag, args.base_model, family, args.resolution)
    if flag == "auto" and family == "SD 2.x":
        print(f"--prediction-type auto: {args.prediction_type}; {reason}.")


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
    for template in [*(args.prompts or []), *args.sample_prompts]:
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
        callbacks.append(watching.ProgressMontage(samples_dir, sample_prompts, args.sample_every))
    callbacks.append(
        saving.SaveEmbedding(
            args.output_dir,
            placeholder_token,
            saving.embedding_metadata(args, placeholder_token),
            fingerprint,
            every_epochs=args.save_every,
            every_steps=args.save_every_steps,
            snapshots=args.snapshots,
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


def fine_tuner_class(args):
    if args.distribute:
        return DistributedFineTuner
    if args.gradient_accumulation_steps > 1:
        steps = args.gradient_accumulation_steps
        return functools.partial(AccumulatingFineTuner, accumulation_steps=steps)
    return StableDiffusionFineTuner


"""
`CommandLineRun` is the tutorial's run with the flags' settings, made once from them
(and from the embedding a run resumes): it takes the steps of `run_tutorial` its own
way where a flag asks for it, and keeps what is learned however training ends.
"""


class CommandLineRun(TutorialRun):
    def __init__(self, args):
        self.args = args
        for setting in ("resolution", "epochs", "learning_rate", "seed", "sample_every"):
            setattr(self, setting, getattr(args, setting))
        self.sample_steps, self.output_dir = args.sample_steps, args.output_dir
        saving.prepare_output_dir(args.output_dir, args.resume)
        # The same --seed gives the same models (with --random-weights) and the same run.
        keras.utils.set_random_seed(args.seed)
        self.resumed = saving.load_embedding(args.resume, args.base_model_family) if args.resume else None
        self.token = self.resumed.token if self.resumed else args.placeholder_token
        self.num_vectors = len(self.resumed.vectors) if self.resumed else args.num_vectors
        if self.resumed and self.resumed.token != args.placeholder_token:
            print(f"Resuming the embedding of {self.token} from {args.resume}.")
        # The placeholder as prompts write it: all its vectors' tokens.
        self.placeholder_token = placeholder_text(self.token, self.num_vectors)
        self.precision = hardware.resolve_precision(args.precision)
        self.jit_compile = hardware.use_xla(args.xla, args.distribute)
        # With --distribute the models are built on every device.
        self.strategy = hardware.distribution_strategy(args.distribute, args.batch_size)
        self.state, self.initial_step, self.fingerprint = None, 0, {}
        self.saver, self.total_steps = None, None  # set as training starts

    def build_tokenizer(self):
        tokenizer = build_tokenizer()
        if self.args.base_model_family == "SD 2.x":
            tokenizer.pad_token_id = sd2x.PAD_TOKEN_ID  # as SD 2.x's OpenCLIP pads prompts
        return tokenizer

    def add_token(self, tokenizer):
        args = self.args
        self.placeholder_token_ids, initializer_id = add_placeholder_tokens(
            tokenizer, self.token, args.initializer_token, self.num_vectors
        )
        return self.placeholder_token_ids, [initializer_id] * self.num_vectors

    def text_image_pairs(self, tokenizer):
        """The sets, and with them what a resumed run goes on from."""
        args = self.args
        sets = training_sets(args, tokenizer, self.placeholder_token)
        check_batch_fits(sets, args.batch_size)
        encode_prompts(tokenizer, args.sample_prompts, self.placeholder_token)  # their length
        self.fingerprint = saving.run_fingerprint(
            args, sets, self.precision, self.token, self.num_vectors
        )
        if self.resumed:
            self.state = saving.resume_state(args.resume, self.resumed, self.fingerprint)
            if self.state:
                self.resumed = self.resumed._replace(vectors=self.state["learned_embedding"])
            saved_step = self.state["step"] if self.state else self.resumed.metadata.get("step", 0)
            self.initial_step = int(saved_step)
            # A run with no steps left is refused now, before the models are built.
            epoch_steps = steps_per_epoch(sets, args.batch_size)
            run_control.planned_steps(epoch_steps, args.epochs, args.max_train_steps, saved_step)
        return sets

    def build_stable_diffusion(self, tokenizer):
        args = self.args
        with self.strategy.scope():
            return build_base_model(
                args.resolution, tokenizer, args.base_model, args.random_weights,
                self.jit_compile, self.precision, args.prediction_type,
            )  # fmt: skip

    def extend_text_encoder(self, stable_diffusion, initializer_ids):
        if self.resumed:
            new_rows = rows_in_id_order(self.resumed.vectors, self.placeholder_token_ids)
        else:
            new_rows = token_rows(stable_diffusion.text_encoder, initializer_ids)
        with self.strategy.scope():
            new_encoder = extend_text_encoder(
                stable_diffusion.text_encoder, new_rows, self.jit_compile
            )
            set_part(stable_diffusion, "text_encoder", new_encoder)

    def freeze_models(self, stable_diffusion):
        hardware.sample_on_one_device(sd_parts(stable_diffusion))
        freeze_models(stable_diffusion)
        unet_backward.speed_up_training(
            stable_diffusion, self.precision, self.jit_compile, self.args.gradient_checkpointing
        )
        hardware.keep_freed_memory()

    def write_failure(self, error):
        saved_step = self.saver.saved_step if self.saver else None
        return saving.write_failure(error, self.args.output_dir, saved_step, self.total_steps)

    def train(self, stable_diffusion, sets, placeholder_token_ids):
        args, initial_step = self.args, self.initial_step
        if args.cache_latents:
            latent_encoder = latent_distribution_encoder(stable_diffusion.image_encoder)
            sets = cache_latents(sets, latent_encoder, args.seed)
        sample_prompts = [p.replace("{}", self.placeholder_token) for p in args.sample_prompts]
        epoch_steps = steps_per_epoch(sets, args.batch_size)
        total_steps = run_control.planned_steps(
            epoch_steps, args.epochs, args.max_train_steps, initial_step
        )
        self.total_steps, sampling = total_steps, (args.sample_steps, args.seed)
        if args.sample_every and not initial_step:
            for prompt in sample_prompts:  # before training, as the tutorial does
                draw_samples(stable_diffusion, prompt, 0, args.output_dir, *sampling)

        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=args.learning_rate, decay_steps=epoch_steps * args.epochs
        )
        with self.strategy.scope():
            trainer = build_trainer(
                stable_diffusion, placeholder_token_ids, learning_rate, seed=args.seed,
                jit_compile=self.jit_compile, trainer_class=fine_tuner_class(args),
                prediction_type=args.prediction_type,
            )  # fmt: skip
        if self.state:
            saving.restore_training_state(trainer, self.state)
        else:
            run_control.continue_from_step(trainer, initial_step)
        augmentation = augment
        if args.cache_latents:
            use_cached_latents(trainer)
            augmentation = pick_cached_view

        loss_log = os.path.join(args.output_dir, "loss.csv")
        watching.cut_loss_log(loss_log, initial_step)
        loss_logger = watching.LossLogger(loss_log)
        non_finite_guard = run_control.StopOnNonFiniteLoss()
        # The loss is logged first, under its own step, before a non-finite one is undone.
        progress_bar = watching.StepProgressBar(epoch_steps, total_steps)
        callbacks = [loss_logger, non_finite_guard, progress_bar]
        callbacks.append(run_control.StopAfterSteps(total_steps))
        callbacks += training_callbacks(
            stable_diffusion, args, self.token, sample_prompts, self.fingerprint
        )
        self.saver = next(c for c in callbacks if isinstance(c, saving.SaveEmbedding))

        def steps_from(step):
            return assemble_train_dataset(
                sets, args.batch_size, args.seed, args.epochs, step, augmentation
            )

        on_off = {True: "on", False: "off"}
        print(
            f"Training in {self.precision}, XLA {on_off[self.jit_compile]}, gradient "
            f"checkpointing {on_off[args.gradient_checkpointing]}, {trainer.prediction_type} target."
        )
        with run_control.stop_training_on_signals(trainer) as signals_received:
            callbacks.append(run_control.StopAfterSignal(signals_received))
            try:
                run_control.train_from_step(
                    trainer, steps_from, epoch_steps, args.epochs, initial_step, callbacks
                )
            finally:
                progress_bar.end_line()  # an error starts on a line of its own
        loss_logger.print_step_time()

        output = args.output_dir
        watching.plot_loss(loss_log, os.path.join(output, "loss.png"))
        words_path = os.path.join(output, "learned_words.json")
        matrix = token_matrix(stable_diffusion.text_encoder)
        watching.report_nearest_words(
            stable_diffusion.tokenizer, matrix, placeholder_token_ids, words_path
        )
        embedding_path = os.path.join(output, saving.EMBEDDING_FILE)
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


def main(argv=None):
    run = CommandLineRun(parse_args(argv))
    try:
        return run_tutorial(run)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise run.write_failure(error) from None  # a full disk outside a save


if __name__ == "__main__":
    run_command(main)
