"""
Title: Teach StableDiffusion new concepts via Textual Inversion
Authors: Ian Stenbit, Luke Wood (keras.io, 2022); ported to TensorFlow 2.21, Keras 3
    and KerasCV 0.9 as a tested script.
Description: Learning new visual concepts with KerasCV's StableDiffusion implementation.

Textual inversion teaches a frozen Stable Diffusion a new visual concept from a handful
of photos. A new token, `<my-funny-cat-token>`, is added to the CLIP tokenizer, its
embedding row starts as a copy of a seed word's row (`cat`), and only that row is
trained, with the usual denoising loss, while the VAE, the UNet and every other token
stay frozen. Afterwards prompts like "Gandalf the Gray as a <my-funny-cat-token>" draw
the new concept.

With no flags this script is the keras.io tutorial: the same images, prompts, token,
optimizer and schedule, 50 epochs. Run it:

    python textual_inversion.py                       # the tutorial (a GPU hour)
    python textual_inversion.py --images my_photos/   # teach it your own concept
    python textual_inversion.py --random-weights --resolution 128 \\
        --max-train-steps 4 --sample-every 1 --sample-steps 2   # CPU smoke run

Everything a run makes goes into `--output-dir` (default `outputs/`): sample images
in `samples/` (and their montage, `samples/progress.png`), the loss per step in
`loss.csv` and `loss.png`, the learned embedding in `learned_embeds.safetensors`, its
nearest words in `learned_words.json`, and the closing images in `final/`.

The file reads like the tutorial, top to bottom; what goes beyond it follows the
tutorial's sections: saving and resuming, then two more commands that work from a
saved embedding,

    python textual_inversion.py generate --embedding FILE --prompt "an oil painting of {}"
    python textual_inversion.py evaluate --embedding FILE --images my_photos/

which draw with it, and score it with CLIP as the textual-inversion paper did.
"""

import argparse
import csv
import json
import math
import os
import re
import signal
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
from keras_cv import layers as cv_layers
from keras_cv.models.stable_diffusion import NoiseScheduler

if not hasattr(sys, "ps1") and "ipykernel" not in sys.modules:
    # Run as a script, draw into files; in a notebook (Colab) keep the inline plots.
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

"""
## The tutorial's settings

The prompt length of the CLIP text encoder, the images and prompts of the tutorial's
two datasets (single cat dolls and groups of them), and the prompts it samples with.
Every command-line flag below defaults to these values.
"""

MAX_PROMPT_LENGTH = 77

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

# Not in the tutorial: for teaching a style (--learnable-property style).
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

# Watched during training, every `--sample-every` epochs, with a fixed seed.
SAMPLE_PROMPTS = [
    "an oil painting of {}",
    "gandalf the gray as a {}",
    "two {} getting married, photorealistic, high quality",
]

# The tutorial's closing prompts, drawn once training is done.
FINAL_PROMPTS = [
    "Gandalf as a {} fantasy art drawn by disney concept artists, golden colour, "
    "high quality, highly detailed, elegant, sharp focus, concept art, character "
    "concepts, digital painting, mystery, adventure",
    "A masterpiece of a {} crying out to the heavens. Behind the {}, an dark, evil "
    "shade looms over it - sucking the life right out of it.",
    "An evil {}.",
    "A mysterious {} approaches the great pyramids of egypt.",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, without a traceback."""

    exit_code = 2


class Interrupted(UserError):
    exit_code = 130  # the shell's code for a program ended by Ctrl-C


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Teach StableDiffusion a new concept via textual inversion "
        "(the keras.io tutorial, runnable today).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=SINGLE_IMAGE_URLS,
        help="Images of the concept: URLs, files or folders.",
    )
    parser.add_argument(
        "--learnable-property",
        choices=["object", "style"],
        default="object",
        help="Teach an object (the tutorial's prompts) or a style (style prompts).",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        help="Prompt templates for --images, {} standing for the token (default: the "
        "tutorial's 25 object prompts, or style prompts). An image x.jpg with a caption "
        "file x.txt beside it trains with that caption instead.",
    )
    parser.add_argument(
        "--group-images",
        nargs="*",
        default=None,
        help="Images of a group of the concept, trained with the group prompts "
        "(default: the tutorial's group images when --images is the tutorial's too); "
        "pass the flag with no value to skip them.",
    )
    parser.add_argument("--placeholder-token", default="<my-funny-cat-token>")
    parser.add_argument("--initializer-token", default="cat")
    parser.add_argument(
        "--num-vectors",
        type=int,
        default=1,
        help="Learn the concept as this many consecutive new tokens, each its own "
        "vector, all starting from the initializer word (1: the tutorial).",
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument(
        "--max-train-steps",
        type=int,
        default=None,
        help="Stop after this many training steps in total (for short runs).",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Image size in pixels; a multiple of 128.",
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        default=10,
        help="Draw the sample prompts every this many epochs (0: never).",
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=50,
        help="Diffusion steps per sample image.",
    )
    parser.add_argument(
        "--xla",
        choices=["auto", "on", "off"],
        default="auto",
        help="Compile the models with XLA; auto means on a GPU only (on a CPU, XLA "
        "made training slower in our measurements), and not with --distribute.",
    )
    add_precision_flag(parser)
    parser.add_argument(
        "--distribute",
        action="store_true",
        help="Train data-parallel on all GPUs with MirroredStrategy; --batch-size is "
        "the global batch, split evenly among them.",
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--output-dir", default="outputs")
    parser.add_argument(
        "--save-every",
        type=int,
        default=1,
        help=f"Save the learned embedding ({EMBEDDING_FILE}) every this many epochs "
        "(and always at the end).",
    )
    parser.add_argument(
        "--resume",
        metavar="EMBEDDING_FILE",
        help="Start from a saved embedding, and the step it reached, instead of the "
        "initializer word.",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="Build the KerasCV models with random weights and download nothing "
        "(image URLs not in the Keras cache become synthetic stand-ins): for smoke "
        "runs and tests. The generated images are noise.",
    )
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = STYLE_PROMPTS if args.learnable_property == "style" else SINGLE_PROMPTS
    if args.group_images is None:
        tutorial_images = args.images == SINGLE_IMAGE_URLS and args.learnable_property == "object"
        args.group_images = GROUP_IMAGE_URLS if tutorial_images else []
    check_args(args)
    args.placeholder_text = placeholder_text(args.placeholder_token, args.num_vectors)
    return args


def check_resolution(resolution):
    if resolution < 128 or resolution % 128:
        raise UserError(
            f"--resolution {resolution} is not a multiple of 128, which the UNet "
            "needs; use 512 (the tutorial's), 384, 256 or 128."
        )


def check_args(args):
    """Settings the models cannot take, reported before anything is built."""
    check_resolution(args.resolution)
    for flag, value in [
        ("--batch-size", args.batch_size),
        ("--epochs", args.epochs),
        ("--num-vectors", args.num_vectors),
        ("--max-train-steps", args.max_train_steps),
        ("--sample-steps", args.sample_steps),
    ]:
        if value is not None and value < 1:
            raise UserError(f"{flag} is {value}; it must be 1 or more.")
    for flag, value in [("--sample-every", args.sample_every), ("--save-every", args.save_every)]:
        if value < 0:
            raise UserError(f"{flag} is {value}; it must be 0 (never) or more.")
    if args.learning_rate <= 0:
        raise UserError(f"--learning-rate is {args.learning_rate}; it must be above 0.")
    for template in args.prompts:
        if "{}" not in template:
            raise UserError(
                f'The prompt template "{template}" has no {{}}; put {{}} where the '
                'token goes, as in "a photo of my {}".'
            )


def prepare_output_dir(args):
    """Creates the output folder; refuses to mix a new run into an old one."""
    output_dir = args.output_dir
    old_run_files = [
        name for name in (EMBEDDING_FILE, "loss.csv") if os.path.exists(os.path.join(output_dir, name))
    ]
    resuming_here = args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(
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
## Building StableDiffusion

`keras_cv.models.StableDiffusion` downloads its four parts (text encoder, VAE image
encoder, diffusion UNet, VAE decoder) the first time each is used. For smoke runs and
tests on a machine without the weights, `--random-weights` builds the very same KerasCV
classes with `download_weights=False` instead.
"""


def add_precision_flag(parser):
    parser.add_argument(
        "--precision",
        choices=["float32", "mixed_float16", "mixed_bfloat16"],
        default="float32",
        help="Keras dtype policy of the models. mixed_float16 (with loss scaling) is "
        "the usual choice on a GPU; on a CPU without bfloat16 hardware both mixed "
        "policies were slower in our measurements.",
    )


def use_xla(xla_flag, distribute=False):
    if xla_flag == "auto":
        # Keras itself leaves XLA off under tf.distribute; so do we, unless asked.
        return bool(tf.config.list_physical_devices("GPU")) and not distribute
    return xla_flag == "on"


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
            stable_diffusion._image_encoder = sd_models.ImageEncoder(
                download_weights=False
            )
            stable_diffusion._diffusion_model = sd_models.DiffusionModel(
                resolution, resolution, MAX_PROMPT_LENGTH, download_weights=False
            )
            stable_diffusion._decoder = sd_models.Decoder(
                resolution, resolution, download_weights=False
            )
            for model in (
                stable_diffusion._text_encoder,
                stable_diffusion._image_encoder,
                stable_diffusion._diffusion_model,
                stable_diffusion._decoder,
            ):
                model.compile(jit_compile=jit_compile)  # as keras-cv does
        # Touch each part so that its weights load (or download) now, not mid-run.
        for part in ("text_encoder", "image_encoder", "diffusion_model", "decoder"):
            getattr(stable_diffusion, part)
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


def keras_download_cache():
    """Where `keras.utils.get_file` keeps (and first looks for) its downloads."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "datasets")


def is_download_error(error):
    return "fetch failure" in str(error) or "URL" in str(error)


"""
## Visualization utilities

`plot_images` shows a row of generated images, as in the tutorial. Run as a script there
is no screen, so every figure is also written to a PNG file.
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

To train the new token's embedding we need pairs of an image of the concept and a
caption that describes it, with the new token where the concept goes.

The images are resized to the model's resolution, scaled to [-1, 1] (the range the
StableDiffusion image encoder expects), shuffled, and randomly cropped and flipped.
`--images` takes URLs (downloaded and cached by Keras), files or folders.
"""


def resolve_image_files(sources, download=True):
    """Local files for `sources` (URLs, files, folders).

    With `download=False` (random-weights smoke runs) nothing is fetched: a URL not
    already in the Keras cache is returned as is, for a synthetic stand-in.
    """
    files = []
    for source in sources:
        if re.match(r"^(https?|ftp)://", source):
            cached = os.path.join(keras_download_cache(), os.path.basename(source))
            if not download:
                files.append(cached if os.path.exists(cached) else source)
                continue
            try:
                files.append(keras.utils.get_file(origin=source))
            except Exception as error:
                raise UserError(
                    f"Could not download the image {source} ({error}); check the "
                    "URL and your connection, or pass local files with --images."
                ) from None
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


def load_images(files, resolution):
    resize = keras.layers.Resizing(
        height=resolution, width=resolution, crop_to_aspect_ratio=True
    )
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
    return np.array(images) / 127.5 - 1


def synthetic_image(name, resolution):
    """A smooth random-colour image, the same for the same name (smoke runs only)."""
    rng = np.random.default_rng(sum(name.encode()))
    corners = rng.uniform(0, 255, size=(2, 2, 3)).astype("float32")
    return ops.convert_to_numpy(
        keras.layers.Resizing(resolution, resolution, interpolation="bilinear")(corners)
    )


def assemble_image_dataset(sources, resolution, download=True):
    images = load_images(resolve_image_files(sources, download), resolution)
    image_dataset = tf.data.Dataset.from_tensor_slices(images.astype("float32"))
    # Shuffle, and add some random noise: crops and flips. (One image at a time: in
    # parallel, which image gets which random crop would change from run to run.)
    image_dataset = image_dataset.shuffle(50, reshuffle_each_iteration=True)
    for augmentation in augmentation_layers(resolution):
        image_dataset = image_dataset.map(augmentation)
    return image_dataset


def augmentation_layers(resolution):
    return [
        cv_layers.RandomCropAndResize(
            target_size=(resolution, resolution),
            crop_area_factor=(0.8, 1.0),
            aspect_ratio_factor=(1.0, 1.0),
        ),
        cv_layers.RandomFlip(mode="horizontal"),
    ]


"""
Next the text dataset: each prompt template gets the placeholder token in place of `{}`,
is tokenized, and padded with the end-of-text token to the CLIP text encoder's fixed
length of 77.
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


def assemble_text_dataset(prompts, tokenizer, placeholder_token):
    prompts = [prompt.format(placeholder_token) for prompt in prompts]
    token_ids = np.stack([encode_prompt(tokenizer, prompt) for prompt in prompts])
    text_dataset = tf.data.Dataset.from_tensor_slices(token_ids)
    text_dataset = text_dataset.shuffle(100, reshuffle_each_iteration=True)
    return text_dataset


"""
Then we zip the two into text-image pairs. The image dataset is short, so it repeats to
match the prompts; the prompts, which set the length of an epoch, repeat 5 times (the
tutorial's authors found this anecdotally improves results).
"""


def assemble_dataset(
    image_sources, prompts, tokenizer, placeholder_token, resolution, download=True
):
    image_dataset = assemble_image_dataset(image_sources, resolution, download)
    text_dataset = assemble_text_dataset(prompts, tokenizer, placeholder_token)
    image_dataset = image_dataset.repeat()
    text_dataset = text_dataset.repeat(5)
    return tf.data.Dataset.zip((image_dataset, text_dataset))


"""
### On the importance of prompt accuracy

The tutorial's authors first trained on pictures of single cat dolls and of groups of
them with the same generic prompts, and the results were mediocre. Captions that
describe the image accurately ("a photo of a group of {}") improved them
*significantly*. So the single images and the group images form two datasets, each with
its own prompts, concatenated into the final training set.
"""


def assemble_train_dataset(args, tokenizer):
    download = not args.random_weights
    files = resolve_image_files(args.images, download)
    captions = {path: read_caption(path) for path in files}
    uncaptioned = [path for path in files if captions[path] is None]
    captioned = [path for path in files if captions[path] is not None]
    datasets = []
    if uncaptioned:
        datasets.append(
            assemble_dataset(
                uncaptioned,
                args.prompts,
                tokenizer,
                args.placeholder_text,
                args.resolution,
                download,
            )
        )
    if captioned:  # not in the tutorial: see "Own captions" below
        datasets.append(
            assemble_captioned_dataset(
                captioned,
                [captions[path] for path in captioned],
                tokenizer,
                args.placeholder_text,
                args.resolution,
            )
        )
    train_ds = datasets[0]
    for dataset in datasets[1:]:
        train_ds = train_ds.concatenate(dataset)
    if args.group_images:
        group_ds = assemble_dataset(
            args.group_images,
            GROUP_PROMPTS,
            tokenizer,
            args.placeholder_text,
            args.resolution,
            download,
        )
        train_ds = train_ds.concatenate(group_ds)
    # Full batches only: a step then means the same with --distribute, where every
    # batch must split evenly over the devices, as without.
    examples = int(train_ds.cardinality())
    if args.batch_size > examples:
        raise UserError(
            f"--batch-size {args.batch_size} is more than the {examples} examples of an "
            f"epoch; use {examples} or less."
        )
    if args.batch_size > 1:
        # Not needed at the tutorial's batch of 1: mix the image sets before batching,
        # so that batches mix them and the examples left over each epoch are random.
        train_ds = train_ds.shuffle(examples, reshuffle_each_iteration=True)
    train_ds = train_ds.batch(args.batch_size, drop_remainder=True)
    train_ds = train_ds.shuffle(train_ds.cardinality(), reshuffle_each_iteration=True)
    return train_ds


"""
### Own captions

Not in the tutorial, but its lesson: accurate prompts matter. An image `x.jpg` with a
text file `x.txt` beside it trains with that caption, `{}` standing for the token
("a photo of {} asleep on a red sofa"), instead of the generic prompts. Each
captioned image appears 5 times an epoch, like each generic prompt.
"""


def read_caption(image_path):
    caption_path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(caption_path):
        return None
    with open(caption_path, encoding="utf-8") as f:
        caption = " ".join(f.read().split())
    if "{}" not in caption:
        raise UserError(
            f'The caption in {caption_path} has no {{}}; put {{}} where the concept is, '
            'as in "a photo of {} on a red sofa".'
        )
    return caption


def assemble_captioned_dataset(files, captions, tokenizer, placeholder_token, resolution):
    images = load_images(files, resolution).astype("float32")
    token_ids = np.stack(
        [encode_prompt(tokenizer, caption.replace("{}", placeholder_token)) for caption in captions]
    )
    dataset = tf.data.Dataset.from_tensor_slices((images, token_ids))
    dataset = dataset.shuffle(50, reshuffle_each_iteration=True)
    for augmentation in augmentation_layers(resolution):
        dataset = dataset.map(
            lambda image, ids, augmentation=augmentation: (augmentation(image), ids)
        )
    return dataset.repeat(5)


"""
## Adding a new token to the text encoder

The tokenizer learns the placeholder as a new token at the end of its vocabulary
(id 49408). The text encoder's token embedding then needs one more row: we build a new
KerasCV `TextEncoder` with the larger vocabulary, copy every weight of the old one, and
give the new row the embedding of the initializer word, `cat`.
"""


def get_embedding_layer(text_encoder):
    """The text encoder's CLIPEmbedding layer (token and position embeddings)."""
    for layer in text_encoder.layers:
        if hasattr(layer, "token_embedding"):
            return layer
    raise ValueError("This text encoder has no CLIP embedding layer.")


def check_new_token(tokenizer, token):
    if not token or any(c.isspace() for c in token):
        raise UserError(
            f'The placeholder token "{token}" is empty or has spaces; use one word '
            "such as <my-concept>."
        )
    if token != token.lower():
        # The tokenizer lowercases prompts, so a token with capitals would never match.
        raise UserError(
            f"The placeholder token {token} has capital letters; use lowercase, "
            f"such as {token.lower()}."
        )
    if token in tokenizer.encoder or len(tokenizer.encode(token)) == 3:
        raise UserError(
            f"The placeholder token {token} is already in the vocabulary; choose a "
            "new one, such as <my-concept>."
        )


def add_placeholder_token(tokenizer, placeholder_token, initializer_token, num_vectors=1):
    """Adds the placeholder to the tokenizer; returns (its ids, the initializer's id)."""
    initializer_ids = tokenizer.encode(initializer_token)[1:-1]
    if len(initializer_ids) != 1:
        pieces = [tokenizer.decode([i]).strip() for i in initializer_ids]
        raise UserError(
            f'The initializer word "{initializer_token}" is {len(initializer_ids)} '
            f"tokens ({', '.join(pieces)}), not one; pick a single-token word."
        )
    return add_new_tokens(tokenizer, placeholder_token, num_vectors), initializer_ids[0]


def token_rows(text_encoder, token_ids):
    """The embedding rows of `token_ids`, as a numpy array."""
    token_weights = get_embedding_layer(text_encoder).token_embedding.get_weights()[0]
    return token_weights[np.array(token_ids)]


"""
Not in the tutorial: `--num-vectors N` lets the concept be N consecutive new tokens,
`<my-funny-cat-token> <my-funny-cat-token-1> ...`, each with a vector of its own, as in
diffusers and AUTOMATIC1111. Prompts name the placeholder once; it is written out as
all N tokens before tokenizing. With N=1 (the default) this is the tutorial.
"""


def placeholder_names(token, num_vectors):
    extra = [
        f"{token[:-1]}-{i}>" if token.endswith(">") else f"{token}-{i}"
        for i in range(1, num_vectors)
    ]
    return [token] + extra


def placeholder_text(token, num_vectors):
    return " ".join(placeholder_names(token, num_vectors))


def add_new_tokens(tokenizer, token, num_vectors):
    """Adds the token's names to the tokenizer; returns their ids, in name order."""
    names = placeholder_names(token, num_vectors)
    for name in names:
        check_new_token(tokenizer, name)
    # The tokenizer finds added tokens with a regex that tries them in the order they
    # were added: the longer names go first, so that "<t>" never matches in "<t-1>".
    tokenizer.add_tokens(names[::-1])
    return [tokenizer.encoder[name] for name in names]


def rows_in_id_order(vectors, token_ids):
    """`vectors` (in name order) reordered to the order of their token ids, the
    order in which `extend_text_encoder` appends rows."""
    return np.asarray(vectors)[np.argsort(token_ids)]


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
            new_layer.position_embedding.set_weights(
                old_embedding.position_embedding.get_weights()
            )
        else:
            new_layer.set_weights(old_layer.get_weights())
    new_encoder.compile(jit_compile=jit_compile)
    return new_encoder


"""
## Freezing everything but the new embedding

The only part of the model textual inversion trains is the placeholder's embedding
vector. The UNet, the VAE and the text encoder are frozen.

Keras's `Adam` updates every row of a trainable variable, and its weight decay shrinks
rows whose gradient is zero too: training the text encoder's whole 49,409 x 768 token
matrix, as the tutorial did, slowly moves every other token. So the learned vector is a
small variable of its own in the trainer below, and only its row of the frozen matrix
is overwritten after each step.
"""


def freeze_models(stable_diffusion):
    stable_diffusion.text_encoder.trainable = False
    stable_diffusion.image_encoder.trainable = False
    stable_diffusion.diffusion_model.trainable = False
    stable_diffusion.decoder.trainable = False


"""
## Training the new embedding

A few utilities first:

- `sample_from_encoder_outputs` samples from the distribution the VAE image encoder
  predicts, instead of taking only its mean as many StableDiffusion applications do
  (with noise from `standard_normal(shape)`, drawn as described below).
- `get_timestep_embedding` makes the diffusion model's sinusoidal embedding of a batch
  of timesteps (at once, not one by one with `tf.map_fn`).
- `get_position_ids` gives the text encoder's position ids, `[[0, 1, ..., 76]]`.

The trainer is also written for several devices (`--distribute`); the lines about
replicas do nothing on one device and are explained in "Extras: training on several
devices" below.
"""


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


def placeholder_gradient(embedding_gradient, placeholder_token_ids):
    """The rows of the embedding matrix's gradient that belong to the placeholder.

    This is the tutorial's masked gradient. The gradient of an embedding lookup is a
    `tf.IndexedSlices`: a row of `values` for every token position of the batch, and
    its token id in `indices`. We keep the rows of the placeholder's ids, zero all
    others, and sum them per placeholder id.
    """
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
`train_step` trains the placeholder's embedding.

In each step the frozen VAE encodes the training images into latents (a sample of the
predicted distribution, scaled by the magic constant 0.18215 the model was trained with),
random noise is added at a random timestep, and the frozen diffusion model predicts that
noise, guided by the text encoder's encoding of the image's prompt. The loss is the mean
squared error between the true and the predicted noise. Its gradient reaches the token
embedding matrix through the text encoder; we keep only the placeholder's rows of it,
let the optimizer update the learned vector, and write that back into the matrix.
"""


class StableDiffusionFineTuner(keras.Model):
    def __init__(
        self,
        stable_diffusion,
        noise_scheduler,
        placeholder_token_ids,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stable_diffusion = stable_diffusion
        self.noise_scheduler = noise_scheduler
        self.placeholder_token_ids = ops.convert_to_tensor(
            placeholder_token_ids, dtype="int32"
        )
        # Leaving out the encoder's last layer (which keeps the mean only and scales
        # it) gives the mean and log-variance of the latent distribution.
        image_encoder = stable_diffusion.image_encoder
        self.training_image_encoder = keras.Model(
            image_encoder.inputs, image_encoder.layers[-2].output
        )
        self.token_embedding = get_embedding_layer(
            stable_diffusion.text_encoder
        ).token_embedding
        initial_vectors = ops.take(
            self.token_embedding.embeddings, self.placeholder_token_ids, axis=0
        )
        self.learned_embedding = self.add_weight(
            shape=tuple(initial_vectors.shape),
            initializer="zeros",
            name="learned_embedding",
        )
        self.learned_embedding.assign(initial_vectors)
        # Steps taken (batches seen). The optimizer's own count can lag behind it
        # under mixed_float16, whose loss scaling skips steps that overflow. (Under
        # --distribute every replica counts the same step: the first one's count is
        # kept.)
        self.step = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="step",
        )
        self.position_ids = get_position_ids()
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def write_learned_embedding(self):
        """Copies the learned vectors into their rows of the text encoder's matrix.

        With --distribute every device holds a copy of the matrix, and a write must go
        through the strategy (from the replicas, by a `merge_call`) so that the copies
        stay equal. On one device this is a plain scatter update.
        """

        def write_rows(matrix, vectors):
            matrix.scatter_nd_update(self.placeholder_token_ids[:, None], vectors)

        def write_on_every_device(strategy, vectors):
            strategy.extended.update(
                self.token_embedding.embeddings.value, write_rows, args=(vectors,), group=False
            )

        if tf.distribute.in_cross_replica_context():
            write_on_every_device(tf.distribute.get_strategy(), self.learned_embedding.value)
        else:
            tf.distribute.get_replica_context().merge_call(
                write_on_every_device, args=(self.learned_embedding.value,)
            )

    def random_for_batch(self, draw, shape):
        """Random values of `shape` for this batch, drawn by `draw(shape)`.

        With --distribute each replica gets a slice of the global batch. Every replica
        draws the same values for the whole global batch (the seed generator is the
        same on each) and keeps the rows of its own slice, so each example gets its
        own noise, exactly as on one device. On one device this is `draw(shape)`.
        """
        replica = tf.distribute.get_replica_context()
        batch_size = shape[0]
        global_shape = (batch_size * replica.num_replicas_in_sync, *shape[1:])
        start = replica.replica_id_in_sync_group * batch_size
        return draw(global_shape)[start : start + batch_size]

    def standard_normal(self, shape):
        return self.random_for_batch(
            lambda shape: keras.random.normal(shape, seed=self.seed_generator), shape
        )

    def random_timesteps(self, shape):
        return self.random_for_batch(
            lambda shape: keras.random.randint(
                shape,
                minval=0,
                maxval=self.noise_scheduler.train_timesteps,
                dtype="int32",
                seed=self.seed_generator,
            ),
            shape,
        )

    def compute_denoising_loss(self, images, token_ids):
        # Sample from the predicted distribution of the training images' latents, and
        # scale it the way StableDiffusion's latents were scaled in its training.
        latents = sample_from_encoder_outputs(
            self.training_image_encoder(images, training=False), self.standard_normal
        )
        latents = latents * 0.18215

        # Random noise, and a random timestep for each sample in the batch.
        noise = self.standard_normal(ops.shape(latents))
        batch_dim = ops.shape(latents)[0]
        timesteps = self.random_timesteps((batch_dim,))

        # Add noise to the latents according to each sample's timestep.
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

        # Encode the prompts: the diffusion model's guide (its "context").
        encoder_hidden_state = self.stable_diffusion.text_encoder(
            [token_ids, self.position_ids]
        )

        # Predict the noise, and compare it with the noise that was added.
        noise_pred = self.stable_diffusion.diffusion_model(
            [noisy_latents, get_timestep_embedding(timesteps), encoder_hidden_state]
        )
        # In float32 also under mixed precision.
        return ops.mean(ops.square(noise - ops.cast(noise_pred, "float32")))

    def train_step(self, data):
        images, token_ids, _ = keras.utils.unpack_x_y_sample_weight(data)
        embedding_matrix = self.token_embedding.embeddings.value
        with tf.GradientTape() as tape:
            tape.watch(embedding_matrix)
            loss = self.compute_denoising_loss(images, token_ids)
            # With --distribute the optimizer sums the replicas' gradients, so each
            # replica's loss counts 1/replicas: the sum is the global batch's mean.
            # Under mixed_float16 the optimizer also scales the loss up so that small
            # float16 gradients do not vanish (it unscales them before the update).
            # On one device in float32 this is the loss as it is.
            replicas = tf.distribute.get_replica_context().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / replicas)

        # The masked gradient: only the placeholder's rows of the matrix's gradient.
        embedding_gradient = tape.gradient(scaled_loss, embedding_matrix)
        gradient = placeholder_gradient(embedding_gradient, self.placeholder_token_ids)
        self.optimizer.apply_gradients([(gradient, self.learned_embedding)])
        self.write_learned_embedding()
        self.step.assign_add(1)

        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "step_loss": loss}


"""
To watch training, a callback draws a few images with the new token every
`--sample-every` epochs. We make one per prompt, each with the same fixed seed, so the
token's progress is easy to see. Another callback writes the loss of every step to
`loss.csv`, and a third ends short runs after `--max-train-steps` steps.
"""


class GenerateImages(keras.callbacks.Callback):
    def __init__(
        self,
        stable_diffusion,
        prompt,
        steps=50,
        frequency=10,
        seed=None,
        output_dir=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stable_diffusion = stable_diffusion
        self.prompt = prompt
        self.seed = seed
        self.frequency = frequency
        self.steps = steps
        self.output_dir = output_dir

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.frequency == 0:
            images = self.stable_diffusion.text_to_image(
                self.prompt, batch_size=3, num_steps=self.steps, seed=self.seed
            )
            name = f"epoch-{epoch + 1:03d}_{slugify(self.prompt)}.png"
            save_images(images, os.path.join(self.output_dir, "samples", name))
            plot_images(images, title=f"epoch {epoch + 1}: {self.prompt}")


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
            csv.writer(f).writerow(
                [step, self.epoch, float(logs["step_loss"]), round(seconds, 4)]
            )

    def on_train_end(self, logs=None):
        if len(self.step_seconds) > 1:
            # The first step also traces (and compiles) the train step: leave it out.
            print(
                f"Trained {len(self.step_seconds)} steps: "
                f"{1000 * np.median(self.step_seconds[1:]):.0f} ms/step (median; the "
                f"first step, which traces the model, took {self.step_seconds[0]:.1f} s)."
            )


class StopAfterSteps(keras.callbacks.Callback):
    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step.numpy()) >= self.max_steps:
            self.model.stop_training = True


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training when the loss or the learned vector stops being finite, and puts
    back the last good vector, so that it, not the broken one, is what gets saved."""

    def on_train_begin(self, logs=None):
        self.failed_step = None
        self.remember_good_state()

    def remember_good_state(self):
        self.good_vector = self.model.learned_embedding.numpy()
        self.good_step = int(self.model.step.numpy())

    def on_train_batch_end(self, batch, logs=None):
        vector = self.model.learned_embedding.numpy()
        if math.isfinite(float(logs["step_loss"])) and np.isfinite(vector).all():
            self.remember_good_state()
            return
        self.failed_step = int(self.model.step.numpy())
        with self.model.distribute_strategy.scope():
            self.model.learned_embedding.assign(self.good_vector)
            self.model.write_learned_embedding()
            self.model.step.assign(self.good_step)
        self.model.stop_training = True


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
Before training, a look at what StableDiffusion draws for the token: still a cat, the
word it was initialized from.

Then, as with any Keras model, `compile()` and `fit()`. The noise scheduler is the one
StableDiffusion was trained with; the learning rate follows a cosine decay from 1e-4
over the whole run; Adam has a small weight decay and the gradient norm is clipped.
"""


def build_trainer(
    stable_diffusion, placeholder_token_ids, learning_rate, seed=None, jit_compile=False
):
    noise_scheduler = NoiseScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        train_timesteps=1000,
    )
    trainer = StableDiffusionFineTuner(
        stable_diffusion, noise_scheduler, placeholder_token_ids, seed=seed, name="trainer"
    )
    optimizer = keras.optimizers.Adam(
        weight_decay=0.004, learning_rate=learning_rate, epsilon=1e-8, global_clipnorm=10
    )
    trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
    return trainer


def train(
    stable_diffusion, train_ds, placeholder_token_ids, args, initial_step=0, strategy=None
):
    sample_prompts = [p.format(args.placeholder_text) for p in SAMPLE_PROMPTS]
    if args.sample_every and not initial_step:
        before = stable_diffusion.text_to_image(
            sample_prompts[0], seed=args.seed, batch_size=3, num_steps=args.sample_steps
        )
        name = f"epoch-000_{slugify(sample_prompts[0])}.png"
        save_images(before, os.path.join(args.output_dir, "samples", name))
        plot_images(before, title=f"before training: {sample_prompts[0]}")

    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.learning_rate,
        decay_steps=int(train_ds.cardinality()) * args.epochs,
    )
    with (strategy or tf.distribute.get_strategy()).scope():
        trainer = build_trainer(
            stable_diffusion,
            placeholder_token_ids,
            learning_rate,
            seed=args.seed,
            jit_compile=use_xla(args.xla, args.distribute),
        )
    # A resumed run goes on where the saved one stopped, on the same schedule.
    steps_per_epoch = int(train_ds.cardinality())
    total_steps = steps_per_epoch * args.epochs
    if args.max_train_steps:
        total_steps = min(total_steps, args.max_train_steps)
    if initial_step >= total_steps:
        raise UserError(
            f"The embedding to resume already has {initial_step} steps, the whole "
            f"run ({total_steps}); raise --epochs or --max-train-steps to go on."
        )
    trainer.step.assign(initial_step)
    trainer.optimizer.iterations.assign(initial_step)

    callbacks = [
        GenerateImages(
            stable_diffusion,
            prompt=prompt,
            steps=args.sample_steps,
            frequency=args.sample_every,
            seed=args.seed,
            output_dir=args.output_dir,
        )
        for prompt in sample_prompts
        if args.sample_every
    ]
    if args.sample_every:
        # Not in the tutorial: one picture of all samples so far (see the end).
        samples_dir = os.path.join(args.output_dir, "samples")
        callbacks.append(ProgressMontage(samples_dir, sample_prompts, args.sample_every))
    callbacks += [
        LossLogger(os.path.join(args.output_dir, "loss.csv")),
        StopAfterSteps(total_steps),
        SaveEmbedding(
            os.path.join(args.output_dir, EMBEDDING_FILE),
            args.placeholder_token,
            every=args.save_every,
            metadata=embedding_metadata(args),
        ),
    ]

    non_finite_guard = StopOnNonFiniteLoss()
    callbacks.insert(0, non_finite_guard)

    # Ctrl-C or SIGTERM ends training after the current step; the embedding reached so
    # far is saved when training ends, as always.
    signals_received = []

    def stop_after_this_step(signal_number, frame):
        if signals_received:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        signals_received.append(signal.Signals(signal_number).name)
        print(f"\n{signals_received[0]}: stopping after this step to save the embedding.")
        trainer.stop_training = True

    previous_handlers = {
        sig: signal.signal(sig, stop_after_this_step) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        # The dataset shuffles itself; `shuffle=False` only tells Keras so.
        history = trainer.fit(
            train_ds,
            epochs=args.epochs,
            initial_epoch=initial_step // steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,
        )
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    plot_loss(os.path.join(args.output_dir, "loss.csv"), os.path.join(args.output_dir, "loss.png"))

    embedding_path = os.path.join(args.output_dir, EMBEDDING_FILE)
    report_nearest_words(
        stable_diffusion,
        placeholder_token_ids,
        os.path.join(args.output_dir, "learned_words.json"),
    )
    if non_finite_guard.failed_step:
        raise UserError(
            f"The loss became non-finite at step {non_finite_guard.failed_step}, so "
            f"training stopped; the last good embedding (step {non_finite_guard.good_step}) "
            f"is in {embedding_path}: lower --learning-rate and --resume from it."
        )
    if signals_received:
        raise Interrupted(
            f"Stopped by {signals_received[0]} at step "
            f"{int(trainer.step.numpy())}; the embedding is saved in "
            f"{embedding_path}: continue with --resume {embedding_path}."
        )
    return trainer, history


"""
## Taking the fine-tuned model for a spin

Now the really fun part: with the token's embedding learned, StableDiffusion draws it
like any other word. The tutorial's closing prompts:
"""


def generate_final_images(stable_diffusion, args):
    for prompt in FINAL_PROMPTS:
        prompt = prompt.format(*[args.placeholder_text] * prompt.count("{}"))
        images = stable_diffusion.text_to_image(
            prompt, batch_size=3, num_steps=args.sample_steps, seed=args.seed
        )
        save_images(images, os.path.join(args.output_dir, "final", f"{slugify(prompt)}.png"))
        plot_images(images, title=prompt)


"""
## Extras: keeping what was learned

The tutorial's result died with its Colab session. Here the learned embedding is saved
every `--save-every` epochs and at the end, as `learned_embeds.safetensors`: a single
tensor, `{placeholder_token: float32 [num_vectors, 768]}`. That is the layout diffusers'
`load_textual_inversion`, AUTOMATIC1111 and ComfyUI read for Stable Diffusion 1.x
models, which all share this CLIP ViT-L/14 text encoder. The file's metadata header
records how it was made. `--resume` goes on training from such a file, and the
`generate` command draws with one or more of them.
"""

EMBEDDING_FILE = "learned_embeds.safetensors"
EMBEDDING_WIDTH = 768  # CLIP ViT-L/14, the text encoder of Stable Diffusion 1.x
BASE_MODEL = "KerasCV StableDiffusion v1.4 (CLIP ViT-L/14 text encoder)"


class LearnedEmbedding(NamedTuple):
    token: str
    vectors: np.ndarray  # float32 [num_vectors, 768]
    metadata: dict


def embedding_metadata(args):
    return {
        "token": args.placeholder_token,
        "initializer_token": args.initializer_token,
        "epochs": args.epochs,
        "resolution": args.resolution,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "base_model": BASE_MODEL,
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


class SaveEmbedding(keras.callbacks.Callback):
    """Saves the learned embedding every `every` epochs and when training ends."""

    def __init__(self, path, token, every, metadata):
        super().__init__()
        self.path = path
        self.token = token
        self.every = every
        self.metadata = metadata
        self.epoch = 0

    def save(self):
        step = int(self.model.step.numpy())
        metadata = dict(self.metadata, step=step, epoch=self.epoch)
        save_embedding(self.path, self.token, self.model.learned_embedding.numpy(), metadata)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        if self.every and self.epoch % self.every == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


"""
### Generating with saved embeddings

`python textual_inversion.py generate --embedding FILE --prompt "an oil painting of {}"`
loads each embedding into a fresh StableDiffusion (its token added to the tokenizer,
its vectors to the text encoder, as for training) and writes the images. `{}` in a
prompt stands for the first embedding's token.
"""


def parse_generate_args(argv):
    parser = argparse.ArgumentParser(
        prog="textual_inversion.py generate",
        description="Draw images with learned embeddings, without training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--embedding", nargs="+", required=True, metavar="FILE")
    parser.add_argument("--prompt", nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=3)
    return parse_drawing_args(parser, argv)


def parse_drawing_args(parser, argv):
    """Adds the flags `generate` and `evaluate` share, parses and checks them."""
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--xla", choices=["auto", "on", "off"], default="auto")
    add_precision_flag(parser)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    check_resolution(args.resolution)
    for flag in ("batch_size", "num_images", "sample_steps"):
        value = getattr(args, flag, 1)
        if value < 1:
            raise UserError(f"--{flag.replace('_', '-')} is {value}; it must be 1 or more.")
    return args


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
    stable_diffusion = build_stable_diffusion(
        args.resolution, tokenizer, args.random_weights, jit_compile, args.precision
    )
    stable_diffusion._text_encoder = extend_text_encoder(
        stable_diffusion.text_encoder, new_rows, jit_compile
    )
    return stable_diffusion


def generate(args):
    tokenizer = build_tokenizer()
    embeddings = [load_embedding(path) for path in args.embedding]
    new_rows = add_embeddings(tokenizer, embeddings, args.embedding)
    prompts = prompts_with_tokens(args.prompt, tokenizer, embeddings)
    stable_diffusion = build_stable_diffusion_with_embeddings(args, tokenizer, new_rows)

    written = []
    for prompt in prompts:
        images = stable_diffusion.text_to_image(
            prompt, batch_size=args.batch_size, num_steps=args.sample_steps, seed=args.seed
        )
        for i, image in enumerate(images):
            path = os.path.join(
                args.output_dir, "generated", f"{slugify(prompt)}_seed{args.seed}_{i}.png"
            )
            os.makedirs(os.path.dirname(path), exist_ok=True)
            plt.imsave(path, image)
            written.append(path)
        plot_images(images, title=prompt)
    print(f"Wrote {len(written)} images to {os.path.join(args.output_dir, 'generated')}.")
    return written


"""
## Extras: seeing what was learned

Did it learn the concept, and can it still be edited? Three views.

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
**The paper's two scores.** `python textual_inversion.py evaluate --embedding FILE
--images PATHS...` generates `--num-images` images for each evaluation prompt and
measures them with CLIP ViT-B/32, as the textual-inversion paper (Gal et al., 2022) did:

- *image similarity*: the mean cosine similarity between the CLIP embeddings of the
  generated images and of the training images (does it look like the concept?);
- *text similarity* (editability): the mean cosine similarity between each generated
  image and its prompt with the placeholder left out (does it follow the rest of the
  prompt?).

CLIP comes from KerasHub, whose weights download like keras-cv's; with
`--random-weights` the same CLIP classes are built with random weights. Prompts are
tokenized with the Stable Diffusion tokenizer: both models use the same CLIP BPE.
"""

EVALUATION_PROMPTS = [
    "a photo of a {}",  # the concept alone
    "a photo of a {} on the beach",  # in a scene
    "an oil painting of a {}",  # in a style
]
CLIP_PRESET = "clip_vit_base_patch32"
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_evaluate_args(argv):
    parser = argparse.ArgumentParser(
        prog="textual_inversion.py evaluate",
        description="Score a learned embedding with CLIP, as the textual-inversion paper.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--embedding", nargs=1, required=True, metavar="FILE")
    parser.add_argument("--images", nargs="+", required=True, help="The training images.")
    parser.add_argument("--prompt", nargs="+", default=EVALUATION_PROMPTS)
    parser.add_argument("--num-images", type=int, default=8, help="Images per prompt.")
    return parse_drawing_args(parser, argv)


def build_clip(random_weights):
    """CLIP ViT-B/32 (KerasHub): the backbone and its image preprocessing."""
    try:
        import keras_hub
    except ImportError:
        raise UserError(
            "The evaluate command needs KerasHub for CLIP; install it with "
            "pip install keras-hub==0.32.0 (see requirements.txt)."
        ) from None

    if not random_weights:
        try:
            backbone = keras_hub.models.CLIPBackbone.from_preset(CLIP_PRESET)
            converter = keras_hub.layers.CLIPImageConverter.from_preset(CLIP_PRESET)
            return backbone, converter
        except OSError as error:
            raise UserError(
                f"Could not download the CLIP weights ({CLIP_PRESET}: {error}); connect "
                "to the internet, or use --random-weights for a smoke run."
            ) from None
    # The architecture of the preset, with random weights.
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=32, hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072,
        intermediate_activation="quick_gelu",
        image_shape=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=49408, embedding_dim=512, hidden_dim=512, num_layers=12,
        num_heads=8, intermediate_dim=2048, intermediate_activation="quick_gelu",
        max_sequence_length=MAX_PROMPT_LENGTH,
    )
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=512)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE),
        scale=[1 / 255 / std for std in CLIP_STD],
        offset=[-mean / std for mean, std in zip(CLIP_MEAN, CLIP_STD)],
        interpolation="bicubic",
    )
    return backbone, converter


def unit_vectors(x):
    x = np.asarray(x, dtype="float64")
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_image_embeddings(clip, images):
    """Unit CLIP embeddings of uint8 (or 0..255 float) RGB images of one size."""
    backbone, converter = clip
    pixels = converter(np.asarray(images, dtype="float32"))
    return unit_vectors(backbone.get_vision_embeddings(pixels))


def clip_text_embeddings(clip, tokenizer, texts):
    backbone, _ = clip
    token_ids = np.stack([encode_prompt(tokenizer, text) for text in texts])
    return unit_vectors(backbone.get_text_embeddings(token_ids))


def clip_scores(generated, training, prompt_embedding):
    """The paper's image and text similarity of one prompt's generated images."""
    return {
        "image_similarity": float(np.mean(generated @ training.T)),
        "text_similarity": float(np.mean(generated @ prompt_embedding)),
    }


def without_token(prompt, token, num_vectors=1):
    for name in placeholder_names(token, num_vectors):
        prompt = prompt.replace(name, " ")
    return " ".join(prompt.split())


def evaluate(args):
    tokenizer = build_tokenizer()
    embedding = load_embedding(args.embedding[0])
    new_rows = add_embeddings(tokenizer, [embedding], args.embedding)
    prompts = prompts_with_tokens(args.prompt, tokenizer, [embedding])
    # CLIP's preprocessing: a square center crop at 224 px, pixel values 0..255.
    training_images = (load_images(resolve_image_files(args.images), CLIP_IMAGE_SIZE) + 1) * 127.5
    os.makedirs(args.output_dir, exist_ok=True)

    stable_diffusion = build_stable_diffusion_with_embeddings(args, tokenizer, new_rows)
    generated = {}
    for prompt in prompts:
        images = stable_diffusion.text_to_image(
            prompt, batch_size=args.num_images, num_steps=args.sample_steps, seed=args.seed
        )
        save_images(images, os.path.join(args.output_dir, "eval", f"{slugify(prompt)}.png"))
        generated[prompt] = images

    clip = build_clip(args.random_weights)
    training = clip_image_embeddings(clip, training_images)
    per_prompt = []
    for prompt, images in generated.items():
        text_prompt = without_token(prompt, embedding.token, len(embedding.vectors))
        scores = clip_scores(
            clip_image_embeddings(clip, images),
            training,
            clip_text_embeddings(clip, tokenizer, [text_prompt])[0],
        )
        per_prompt.append(dict(prompt=prompt, text_prompt=text_prompt, **scores))

    placeholder_token_ids = [
        tokenizer.encoder[name]
        for name in placeholder_names(embedding.token, len(embedding.vectors))
    ]
    result = {
        "embedding": args.embedding[0],
        "token": embedding.token,
        "image_similarity": float(np.mean([p["image_similarity"] for p in per_prompt])),
        "text_similarity": float(np.mean([p["text_similarity"] for p in per_prompt])),
        "per_prompt": per_prompt,
        "clip_model": CLIP_PRESET + (" (random weights)" if args.random_weights else ""),
        "stable_diffusion": BASE_MODEL + (" (random weights)" if args.random_weights else ""),
        "num_images": args.num_images,
        "sample_steps": args.sample_steps,
        "seed": args.seed,
        "resolution": args.resolution,
        "nearest_words": report_nearest_words(stable_diffusion, placeholder_token_ids),
    }
    print(f"{'prompt':<50} {'image sim':>9} {'text sim':>9}")
    for p in per_prompt:
        print(f"{p['prompt'][:50]:<50} {p['image_similarity']:>9.3f} {p['text_similarity']:>9.3f}")
    print(f"{'mean':<50} {result['image_similarity']:>9.3f} {result['text_similarity']:>9.3f}")
    path = os.path.join(args.output_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"Wrote {path}.")
    return result


"""
## Extras: training on several devices

`--distribute` trains data-parallel with `tf.distribute.MirroredStrategy`: every GPU
holds a copy of the models, each step's batch (`--batch-size`, the global batch) is
split evenly among them, and the optimizer sums their gradients before it updates the
learned vector on all of them at once. The trainer above is already written for it:
each replica's loss counts `1 / replicas`, each example draws its own noise whatever
replica it lands on, and the learned vector is written into every copy of the
embedding matrix. So 2 devices with 1 image each take the same step as 1 device with
a batch of 2 (tested on two logical CPU devices). One difference remains: under a
strategy Keras reads a batch ahead to build the model, which moves the data pipeline's
random state (shuffles, crops, flips) on, so a distributed run does not repeat exactly
with the same `--seed`.

Without GPUs the strategy spreads over the CPU's logical devices: just one unless the
program splits the CPU first with `tf.config.set_logical_device_configuration`, as
the test does.
"""


def distribution_strategy(args):
    """The strategy the models are built and trained under: MirroredStrategy over the
    GPUs (or logical CPUs) with --distribute, else TensorFlow's default strategy, whose
    `scope()` changes nothing."""
    if not args.distribute:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if args.batch_size % len(devices):
        raise UserError(
            f"--batch-size {args.batch_size} does not split evenly over the "
            f"{len(devices)} devices of --distribute; use a multiple of {len(devices)}."
        )
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    print(
        f"Training on {strategy.num_replicas_in_sync} replicas "
        f"({', '.join(device.name for device in devices)}), "
        f"each with {args.batch_size // strategy.num_replicas_in_sync} of the {args.batch_size} "
        "images of a step."
    )
    return strategy


def sample_on_one_device(stable_diffusion):
    """KerasCV draws images with `predict_on_batch`, which under a MirroredStrategy
    would hand every replica the whole batch and return all their answers, one batch
    per replica. Drawing is not what we spread over devices: with this, the models
    predict as plain models do, with the first device's copy of the weights."""
    for model in (
        stable_diffusion.text_encoder,
        stable_diffusion.image_encoder,
        stable_diffusion.diffusion_model,
        stable_diffusion.decoder,
    ):
        # Keras's record of the strategy the model was built in (checked on Keras 3.15).
        model._distribute_strategy = None


"""
## Running it all

`main()` runs the tutorial's steps in order. The cheap ones come first, so that a bad
token or a missing image is reported before the models are built.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        return generate(parse_generate_args(argv[1:]))
    if argv[:1] == ["evaluate"]:
        return evaluate(parse_evaluate_args(argv[1:]))
    args = parse_args(argv)
    prepare_output_dir(args)
    # The same --seed gives the same run. KerasCV's augmentation layers draw from
    # TensorFlow's global generator, which `set_random_seed` leaves alone.
    keras.utils.set_random_seed(args.seed)
    tf.random.set_global_generator(tf.random.Generator.from_seed(args.seed))

    resumed = load_embedding(args.resume) if args.resume else None
    if resumed:
        if resumed.token != args.placeholder_token:
            print(f"Resuming the embedding of {resumed.token} from {args.resume}.")
        args.placeholder_token = resumed.token
        args.num_vectors = len(resumed.vectors)
        args.placeholder_text = placeholder_text(args.placeholder_token, args.num_vectors)
    initial_step = int(resumed.metadata.get("step", 0)) if resumed else 0

    tokenizer = build_tokenizer()
    placeholder_token_ids, initializer_token_id = add_placeholder_token(
        tokenizer, args.placeholder_token, args.initializer_token, args.num_vectors
    )
    train_ds = assemble_train_dataset(args, tokenizer)

    jit_compile = use_xla(args.xla, args.distribute)
    # With --distribute the models are built on every device (see the extras).
    strategy = distribution_strategy(args)
    with strategy.scope():
        stable_diffusion = build_stable_diffusion(
            args.resolution, tokenizer, args.random_weights, jit_compile, args.precision
        )
        if resumed:
            new_rows = rows_in_id_order(resumed.vectors, placeholder_token_ids)
        else:
            new_rows = token_rows(
                stable_diffusion.text_encoder, [initializer_token_id] * args.num_vectors
            )
        stable_diffusion._text_encoder = extend_text_encoder(
            stable_diffusion.text_encoder, new_rows, jit_compile
        )
    sample_on_one_device(stable_diffusion)
    freeze_models(stable_diffusion)
    train(stable_diffusion, train_ds, placeholder_token_ids, args, initial_step, strategy)
    generate_final_images(stable_diffusion, args)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
