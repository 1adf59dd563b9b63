"""
Title: Draw with learned embeddings
Description: Loads one or more embeddings that `textual_inversion.py` (or diffusers,
or AUTOMATIC1111) saved into a fresh StableDiffusion and draws prompts with them.

Each embedding's token is added to the tokenizer and its vectors to the text encoder,
as for training. `{}` in a prompt stands for the first embedding's token; other tokens
are written into the prompt as they are.

    python tools/generate.py --embedding outputs/learned_embeds.safetensors \\
        --prompt "an oil painting of {}" "gandalf the gray as a {}"

The images go to `OUTPUT_DIR/generated/<prompt>_seed<seed>_<n>.png`.
"""

import argparse
import os
import sys

import matplotlib.pyplot as plt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drawing  # noqa: E402  (tools/drawing.py, beside this script)
import textual_inversion as ti  # noqa: E402
from textual_inversion_extras import saving  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        description="Draw images with learned textual-inversion embeddings, without training."
    )
    parser.add_argument(
        "--embedding",
        nargs="+",
        required=True,
        metavar="FILE",
        help="Embedding files (.safetensors), one token each (required).",
    )
    parser.add_argument(
        "--prompt",
        nargs="+",
        required=True,
        help="Prompts; {} stands for the first embedding's token, as in \"an oil "
        'painting of {}" (required).',
    )
    ti.add_drawing_flags(parser, "--batch-size", 3)
    return parser


def parse_args(argv=None):
    return ti.check_drawing_args(build_parser().parse_args(argv))


def generate(args):
    tokenizer = ti.build_tokenizer()
    embeddings = [saving.load_embedding(path, args.base_model_family) for path in args.embedding]
    new_rows = drawing.add_embeddings(tokenizer, embeddings, args.embedding)
    prompts = drawing.prompts_with_tokens(args.prompt, tokenizer, embeddings)
    stable_diffusion = drawing.build_stable_diffusion_with_embeddings(args, tokenizer, new_rows)

    output_dir = os.path.join(args.output_dir, "generated")
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for prompt in prompts:
        images = stable_diffusion.text_to_image(
            prompt, batch_size=args.batch_size, num_steps=args.sample_steps, seed=args.seed
        )
        for i, image in enumerate(images):
            path = os.path.join(output_dir, f"{ti.slugify(prompt)}_seed{args.seed}_{i}.png")
            plt.imsave(path, image)
            written.append(path)
        ti.plot_images(images, title=prompt)
    print(f"Wrote {len(written)} images to {output_dir}.")
    return written


if __name__ == "__main__":
    ti.run_command(lambda: generate(parse_args()))
