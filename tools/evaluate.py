"""
Title: Score a learned embedding with CLIP
Description: The textual-inversion paper's two scores (Gal et al., 2022), measured with
CLIP ViT-B/32 from KerasHub.

The script draws `--num-images` images for each evaluation prompt with the embedding,
then measures:

- *image similarity*: the mean cosine similarity between the CLIP embeddings of the
  generated images and of the training images (does it look like the concept?);
- *text similarity* (editability): the mean cosine similarity between each generated
  image and its prompt with the placeholder left out (does it follow the rest of the
  prompt?).

The two pull against each other: longer training usually raises the first and lowers
the second. The paper's Figure 10 places textual inversion around 0.7 image and 0.25
text similarity.

    python tools/evaluate.py --embedding outputs/learned_embeds.safetensors \\
        --images my_photos/ --num-images 8

CLIP comes from KerasHub, whose weights download like keras-cv's; with
`--random-weights` the same CLIP classes are built with random weights, and the scores
mean nothing. Prompts are tokenized with the Stable Diffusion tokenizer: both models
use the same CLIP BPE. (keras-cv 0.9 has a CLIP of its own, but its text encoder
applies the causal mask as +1 instead of -inf, so its text embeddings would not match
OpenAI's CLIP.) Results print as a table and go to `OUTPUT_DIR/eval.json`.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drawing  # noqa: E402  (tools/drawing.py, beside this script)
import textual_inversion as ti  # noqa: E402
from textual_inversion_extras import checkpoints, saving, watching  # noqa: E402

EVALUATION_PROMPTS = [
    "a photo of a {}",  # the concept alone
    "a photo of a {} on the beach",  # in a scene
    "an oil painting of a {}",  # in a style
]
CLIP_PRESET = "clip_vit_base_patch32"
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Score a learned embedding with CLIP, as the textual-inversion paper did."
    )
    parser.add_argument(
        "--embedding",
        required=True,
        metavar="FILE",
        help="The embedding file (.safetensors) to score (required).",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="The training images: URLs, files or folders (required).",
    )
    parser.add_argument(
        "--prompt",
        nargs="+",
        default=EVALUATION_PROMPTS,
        help="Evaluation prompts, {} standing for the token (default: "
        + "; ".join(EVALUATION_PROMPTS)
        + ").",
    )
    ti.add_drawing_flags(parser, "--num-images", 8)
    return parser


def parse_args(argv=None):
    return ti.check_drawing_args(build_parser().parse_args(argv))


def build_clip(random_weights):
    """CLIP ViT-B/32 (KerasHub): the backbone and its image preprocessing."""
    try:
        import keras_hub
    except ImportError:
        raise ti.UserError(
            "Scoring needs KerasHub for CLIP; install it with "
            "pip install keras-hub==0.32.0 (see requirements.txt)."
        ) from None

    if not random_weights:
        try:
            backbone = keras_hub.models.CLIPBackbone.from_preset(CLIP_PRESET)
            converter = keras_hub.layers.CLIPImageConverter.from_preset(CLIP_PRESET)
            return backbone, converter
        except OSError as error:
            raise ti.UserError(
                f"Could not download the CLIP weights ({CLIP_PRESET}: {error}); connect "
                "to the internet, or use --random-weights for a smoke run."
            ) from None
    # The architecture of the preset, with random weights.
    # fmt: off
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=32, hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072,
        intermediate_activation="quick_gelu", image_shape=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=49408, embedding_dim=512, hidden_dim=512, num_layers=12, num_heads=8,
        intermediate_dim=2048, intermediate_activation="quick_gelu",
        max_sequence_length=ti.MAX_PROMPT_LENGTH,
    )
    # fmt: on
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


def clip_pixels(clip, images):
    """CLIP's preprocessing of uint8 (or 0..255 float) RGB images of one size:
    resized to 224 px, each channel normalized by CLIP's mean and std."""
    _, converter = clip
    return converter(np.asarray(images, dtype="float32"))


def clip_image_embeddings(clip, images):
    backbone, _ = clip
    return unit_vectors(backbone.get_vision_embeddings(clip_pixels(clip, images)))


def clip_text_embeddings(clip, tokenizer, texts):
    backbone, _ = clip
    token_ids = np.stack([ti.encode_prompt(tokenizer, text) for text in texts])
    return unit_vectors(backbone.get_text_embeddings(token_ids))


def clip_scores(generated, training, prompt_embedding):
    """The paper's image and text similarity of one prompt's generated images."""
    return {
        "image_similarity": float(np.mean(generated @ training.T)),
        "text_similarity": float(np.mean(generated @ prompt_embedding)),
    }


def without_token(prompt, token, num_vectors=1):
    for name in ti.placeholder_names(token, num_vectors):
        prompt = prompt.replace(name, " ")
    return " ".join(prompt.split())


def evaluate(args):
    tokenizer = ti.build_tokenizer()
    embedding = saving.load_embedding(args.embedding)
    new_rows = drawing.add_embeddings(tokenizer, [embedding], [args.embedding])
    prompts = drawing.prompts_with_tokens(args.prompt, tokenizer, [embedding])
    # CLIP's preprocessing: a square center crop at 224 px, pixel values 0..255.
    training_files = ti.resolve_image_files(args.images)
    training_images = (ti.load_images(training_files, CLIP_IMAGE_SIZE) + 1) * 127.5
    os.makedirs(args.output_dir, exist_ok=True)

    stable_diffusion = drawing.build_stable_diffusion_with_embeddings(args, tokenizer, new_rows)
    generated = {}
    for prompt in prompts:
        images = stable_diffusion.text_to_image(
            prompt, batch_size=args.num_images, num_steps=args.sample_steps, seed=args.seed
        )
        ti.save_images(images, os.path.join(args.output_dir, "eval", f"{ti.slugify(prompt)}.png"))
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
        for name in ti.placeholder_names(embedding.token, len(embedding.vectors))
    ]
    random_note = " (random weights)" if args.random_weights else ""
    result = {
        "embedding": args.embedding,
        "token": embedding.token,
        "image_similarity": float(np.mean([p["image_similarity"] for p in per_prompt])),
        "text_similarity": float(np.mean([p["text_similarity"] for p in per_prompt])),
        "per_prompt": per_prompt,
        "clip_model": CLIP_PRESET + random_note,
        "stable_diffusion": checkpoints.base_model_name(args.base_model) + random_note,
        "num_images": args.num_images,
        "sample_steps": args.sample_steps,
        "seed": args.seed,
        "resolution": args.resolution,
        "nearest_words": watching.report_nearest_words(
            tokenizer, ti.token_matrix(stable_diffusion.text_encoder), placeholder_token_ids
        ),
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


if __name__ == "__main__":
    ti.run_command(lambda: evaluate(parse_args()))
