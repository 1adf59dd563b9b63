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
    python tools/evaluate.py --run outputs --images my_photos/   # every snapshot

**Choosing the step.** `--run OUTPUT_DIR` scores every snapshot a training run kept
(`snapshots/step-NNNNNN.safetensors`), each with the same prompts, seeds and number of
images, building the models once. It writes `scores.csv` (step, image similarity, text
similarity) and `scores.png` (both scores against the step, and the paper's trade-off of
one against the other) into the run's folder, and names a step by a simple rule: each
score is scaled to [0, 1] over the run's snapshots (a score that does not change counts
0), and the step with the highest sum of the two wins, the earliest on a tie. It is the
point of the trade-off nearest to the best of both; the table is the main output, and
the pictures (`OUTPUT_DIR/scores/step-NNNNNN/`, and the run's `samples/progress.png`)
may well say otherwise.

CLIP comes from KerasHub, whose weights download like keras-cv's; with
`--random-weights` the same CLIP classes are built with random weights, and the scores
mean nothing. Prompts are tokenized with the Stable Diffusion tokenizer: both models
use the same CLIP BPE. (keras-cv 0.9 has a CLIP of its own, but its text encoder
applies the causal mask as +1 instead of -inf, so its text embeddings would not match
OpenAI's CLIP.) Results print as a table and go to `OUTPUT_DIR/eval.json`.
"""

import argparse
import csv
import glob
import json
import os
import re
import sys
from typing import NamedTuple

import keras
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
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--embedding",
        metavar="FILE",
        help="The embedding file (.safetensors) to score (default: none; this or --run "
        "is required).",
    )
    what.add_argument(
        "--run",
        metavar="OUTPUT_DIR",
        help="A training run's folder: score each of its snapshots "
        "(snapshots/step-NNNNNN.safetensors), the models built once; write scores.csv and "
        "scores.png into it (each snapshot's images into OUTPUT_DIR/scores/), and "
        "recommend the step with the highest sum of the two scores, each scaled to "
        "[0, 1] over the snapshots (min-max; a constant score counts 0), the earliest on "
        "a tie. The table is the main output: look at the images, you may disagree "
        "(default: none; --output-dir is not used).",
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


class Scorer(NamedTuple):
    """What scoring an embedding needs, built once: Stable Diffusion with the
    embedding's token, CLIP, and the CLIP embeddings of the training images."""

    stable_diffusion: object
    tokenizer: object
    clip: tuple
    training: np.ndarray
    prompts: list
    placeholder_token_ids: list


def build_scorer(args, embedding, path):
    keras.utils.set_random_seed(args.seed)  # with --random-weights, the same weights
    tokenizer = ti.build_tokenizer()
    new_rows = drawing.add_embeddings(tokenizer, [embedding], [path])
    prompts = drawing.prompts_with_tokens(args.prompt, tokenizer, [embedding])
    # CLIP's preprocessing: a square center crop at 224 px, pixel values 0..255.
    training_files = ti.resolve_image_files(args.images)
    training_images = ti.load_images(training_files, CLIP_IMAGE_SIZE, warn_if_small=False)
    training_images = (training_images + 1) * 127.5
    stable_diffusion = drawing.build_stable_diffusion_with_embeddings(args, tokenizer, new_rows)
    clip = build_clip(args.random_weights)
    placeholder_token_ids = [
        tokenizer.encoder[name]
        for name in ti.placeholder_names(embedding.token, len(embedding.vectors))
    ]
    training = clip_image_embeddings(clip, training_images)
    return Scorer(stable_diffusion, tokenizer, clip, training, prompts, placeholder_token_ids)


def score(scorer, embedding, args, images_dir):
    """The paper's two scores of the embedding the scorer's model holds, per prompt;
    each prompt's images are written into `images_dir`."""
    per_prompt = []
    for prompt in scorer.prompts:
        images = scorer.stable_diffusion.text_to_image(
            prompt, batch_size=args.num_images, num_steps=args.sample_steps, seed=args.seed
        )
        ti.save_images(images, os.path.join(images_dir, f"{ti.slugify(prompt)}.png"))
        text_prompt = without_token(prompt, embedding.token, len(embedding.vectors))
        scores = clip_scores(
            clip_image_embeddings(scorer.clip, images),
            scorer.training,
            clip_text_embeddings(scorer.clip, scorer.tokenizer, [text_prompt])[0],
        )
        per_prompt.append(dict(prompt=prompt, text_prompt=text_prompt, **scores))
    means = {
        key: float(np.mean([p[key] for p in per_prompt]))
        for key in ("image_similarity", "text_similarity")
    }
    return means, per_prompt


def evaluate(args):
    if args.run:
        return evaluate_run(args)
    embedding = saving.load_embedding(args.embedding, args.base_model_family)
    scorer = build_scorer(args, embedding, args.embedding)
    os.makedirs(args.output_dir, exist_ok=True)
    means, per_prompt = score(scorer, embedding, args, os.path.join(args.output_dir, "eval"))
    random_note = " (random weights)" if args.random_weights else ""
    result = {
        "embedding": args.embedding,
        "token": embedding.token,
        **means,
        "per_prompt": per_prompt,
        "clip_model": CLIP_PRESET + random_note,
        "stable_diffusion": checkpoints.base_model_name(args.base_model) + random_note,
        "num_images": args.num_images,
        "sample_steps": args.sample_steps,
        "seed": args.seed,
        "resolution": args.resolution,
        "nearest_words": watching.report_nearest_words(
            scorer.tokenizer,
            ti.token_matrix(scorer.stable_diffusion.text_encoder),
            scorer.placeholder_token_ids,
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


"""
## Every snapshot of a run

The models are built once, with the first snapshot's vectors; each further snapshot's
vectors are written into the same rows of the token matrix, so that its images are
those a fresh model loaded with that file alone would draw.
"""


def run_snapshots(run_dir, family="SD 1.x"):
    """The run's snapshots, in step order: [(step, path, embedding)]."""
    paths = glob.glob(os.path.join(run_dir, saving.SNAPSHOTS_DIR, "step-*.safetensors"))
    snapshots = []
    for path in paths:
        match = re.fullmatch(r"step-(\d+)\.safetensors", os.path.basename(path))
        if match:
            snapshots.append((int(match.group(1)), path, saving.load_embedding(path, family)))
    if not snapshots:
        raise ti.UserError(
            f"{run_dir} has no snapshots ({saving.SNAPSHOTS_DIR}/step-NNNNNN.safetensors); "
            "pass the --output-dir of a run that kept them (without --no-snapshots), or "
            "score one file with --embedding."
        )
    snapshots.sort(key=lambda snapshot: snapshot[0])
    first = snapshots[0][2]
    for _, path, embedding in snapshots:
        if embedding.token != first.token or embedding.vectors.shape != first.vectors.shape:
            raise ti.UserError(
                f"{path} holds {embedding.token} ({len(embedding.vectors)} vectors), but "
                f"{snapshots[0][1]} holds {first.token} ({len(first.vectors)}); a run's "
                "snapshots are of one token: score the others with --embedding."
            )
    return snapshots


def write_vectors(stable_diffusion, placeholder_token_ids, vectors):
    """Puts `vectors` into the placeholder's rows of the model's token matrix."""
    layer = ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding
    matrix = layer.get_weights()[0]
    matrix[np.array(placeholder_token_ids)] = ti.rows_in_id_order(vectors, placeholder_token_ids)
    layer.set_weights([matrix])


def scaled(values):
    """`values` scaled to [0, 1]; all 0 if they do not change."""
    low, high = min(values), max(values)
    return [0.0 if high == low else (value - low) / (high - low) for value in values]


def recommended_step(rows):
    """The step of `rows` ({step, image_similarity, text_similarity}) with the highest
    sum of the two scores, each scaled to [0, 1] over the rows; the earliest on a tie."""
    image = scaled([row["image_similarity"] for row in rows])
    text = scaled([row["text_similarity"] for row in rows])
    best = max(range(len(rows)), key=lambda i: (image[i] + text[i], -rows[i]["step"]))
    return rows[best]["step"]


def plot_scores(rows, best_step, path):
    """Both scores against the step, and the paper's trade-off: one against the other."""
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    image = [row["image_similarity"] for row in rows]
    text = [row["text_similarity"] for row in rows]
    figure, (over_steps, trade_off) = plt.subplots(1, 2, figsize=(10, 4))
    over_steps.plot(steps, image, "o-", color="tab:blue", label="image similarity")
    over_steps.set_xlabel("step")
    over_steps.set_ylabel("image similarity", color="tab:blue")
    text_axis = over_steps.twinx()
    text_axis.plot(steps, text, "s-", color="tab:orange", label="text similarity")
    text_axis.set_ylabel("text similarity", color="tab:orange")
    over_steps.axvline(best_step, color="gray", linestyle=":", label=f"step {best_step}")
    over_steps.set_title("the scores of each snapshot")
    trade_off.plot(image, text, "-", color="lightgray")
    trade_off.scatter(image, text, c=steps, cmap="viridis")
    for step, x, y in zip(steps, image, text):
        trade_off.annotate(str(step), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    best = steps.index(best_step)
    trade_off.scatter([image[best]], [text[best]], marker="*", s=200, color="red",
                      label=f"recommended: step {best_step}")  # fmt: skip
    trade_off.set_xlabel("image similarity (looks like the photos)")
    trade_off.set_ylabel("text similarity (follows the prompt)")
    trade_off.set_title("the trade-off (Gal et al., 2022)")
    trade_off.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate_run(args):
    snapshots = run_snapshots(args.run, args.base_model_family)
    _, first_path, first = snapshots[0]
    scorer = build_scorer(args, first, first_path)
    rows = []
    images_root = os.path.join(args.run, "scores")
    progress = keras.utils.Progbar(len(snapshots), unit_name="snapshot")
    for done, (step, path, embedding) in enumerate(snapshots, start=1):
        write_vectors(scorer.stable_diffusion, scorer.placeholder_token_ids, embedding.vectors)
        images_dir = os.path.join(images_root, f"step-{step:06d}")
        means, _ = score(scorer, embedding, args, images_dir)
        rows.append(dict(step=step, **means))
        progress.update(done)

    best_step = recommended_step(rows)
    csv_path = os.path.join(args.run, "scores.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "image_similarity", "text_similarity"])
        writer.writeheader()
        writer.writerows(rows)
    plot_path = os.path.join(args.run, "scores.png")
    plot_scores(rows, best_step, plot_path)
    print(f"{'step':>8} {'image sim':>9} {'text sim':>9}")
    for row in rows:
        mark = "  <- recommended" if row["step"] == best_step else ""
        scores = f"{row['image_similarity']:>9.3f} {row['text_similarity']:>9.3f}"
        print(f"{row['step']:>8} {scores}{mark}")
    best_path = saving.snapshot_paths(args.run, best_step)[0]
    print(
        f"Recommended: step {best_step} ({best_path}), the highest sum of the two scores "
        "each scaled to [0, 1] over the snapshots (a constant one counts 0), the earliest "
        "on a tie; the table is the main output, and the images may well say otherwise."
    )
    print(f"Wrote {csv_path}, {plot_path} and the images in {images_root}.")
    return rows, best_step


if __name__ == "__main__":
    ti.run_command(lambda: evaluate(parse_args()))
