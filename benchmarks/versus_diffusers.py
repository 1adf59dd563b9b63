"""
Title: Benchmark: our training step against diffusers' textual-inversion step
Description: The same random SD 1.x weights, the same image and prompt, batch 1, each
side in a process of its own, the way its users run it; ms/step and peak memory.

diffusers' `examples/textual_inversion/textual_inversion.py` is the script a user would
otherwise pick. Its step is rebuilt here from that script, on the same models: the UNet
and the VAE in the weight dtype, the text encoder in float32 with its token embedding
trainable, AdamW on the embedding matrix, the rows of the other tokens restored after
each update. diffusers' tokenizer needs files from the Hub, so both sides take the
prompt's token ids from KerasCV's tokenizer (the same CLIP vocabulary).

Ours is `python textual_inversion.py --base-model FOLDER ...`, run through its `main()`
with the final images left out (the benchmark measures training).

What it prints, per resolution:

- **ms/step**: the median wall time of `--steps` steps after `--warmup` steps (the
  first of ours also traces the train step);
- **peak memory, loading and training apart**: the loading peak is the highest memory
  while the models are built and loaded, up to the first step; then the peak is reset
  (`/proc/self/clear_refs`) and the training peak is the highest over the steps
  (tracing included). Each is given as anonymous memory (RssAnon, what the process
  allocated: sampled every 10 ms) and as resident memory (VmHWM, the kernel's
  high-water mark, which also counts mapped files);
- the ratios, ours over diffusers, and a one-line summary at the end;
- where our memory goes: the weights by dtype, and what TensorFlow's allocator has
  handed out in tensors once loaded and at the training peak (the rest of the anonymous
  peak is the interpreter's and the free space the allocator keeps);
- the distance to this CPU's floor: a step's FLOPs, by PyTorch's counter on diffusers'
  step (`count_flops`), over each side's ms/step, against the rate of a 4096 x 4096
  matrix product in the compute dtype under each side's framework; the FLOPs over that
  rate is the floor of a step. Both are measured after the peaks.

Each side runs in its default precision on this hardware: ours with `--precision auto`;
diffusers with `--mixed_precision` none (float32), or bf16 where ours chose bfloat16,
so that both compute in the same dtype. diffusers loads as its example does, with
accelerate installed (its low-memory loading), the frozen models cast afterwards. Run it from the repository root:

    python benchmarks/versus_diffusers.py                      # 128 and 512 px
    python benchmarks/versus_diffusers.py --resolutions 128 --steps 3
    python benchmarks/versus_diffusers.py --gradient-checkpointing   # both sides

The random weights are written once into `--weights` (a diffusers folder: `unet/`,
`vae/`, `text_encoder/`), which ours reads with `--base-model`. It needs the test
requirements (torch, diffusers, transformers) and the CLIP vocabulary in the Keras cache.
"""

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of {}"
PLACEHOLDER = "<my-funny-cat-token>"
SEED = 1337

# The SD 1.x architecture, in diffusers' and transformers' configuration.
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
CLIP_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Times our training step against diffusers' textual-inversion step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=[128, 512], help="Image sizes to time."
    )
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per side.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument(
        "--weights",
        default=os.path.join(tempfile.gettempdir(), "sd1x-random-diffusers"),
        help="Folder of the random SD 1.x weights; written if it does not exist.",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Both sides checkpoint the UNet (ours: --gradient-checkpointing; diffusers: "
        "enable_gradient_checkpointing).",
    )
    parser.add_argument(
        "--worker",
        choices=["ours", "diffusers"],
        help="Internal: run one side in this process and print its figures as JSON.",
    )
    parser.add_argument("--resolution", type=int, default=128, help="Internal: the worker's.")
    parser.add_argument("--precision", default="float32", help="Internal: the worker's.")
    parser.add_argument(
        "--token-ids",
        help="Internal: the prompt's ids, the placeholder's and cat's, as JSON, for the "
        "diffusers worker (which so never imports TensorFlow).",
    )
    return parser.parse_args(argv)


"""
## The shared weights and batch
"""


def write_random_weights(folder):
    """Random SD 1.x weights as a diffusers folder, from diffusers' own initializers."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    print(f"Writing random SD 1.x weights into {folder} ...", flush=True)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(os.path.join(folder, "unet"))
    AutoencoderKL(**VAE_CONFIG).save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)).save_pretrained(
        os.path.join(folder, "text_encoder")
    )


def write_image(folder, resolution):
    """One smooth test image, the batch of both sides."""
    import matplotlib.pyplot as plt

    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    path = os.path.join(folder, "concept.png")
    plt.imsave(path, image)
    return path


def token_ids():
    """The prompt's ids, the placeholder a new token after the vocabulary, and cat's id,
    as JSON. The parent computes them, so that the diffusers worker's memory holds no
    TensorFlow."""
    sys.path.insert(0, ROOT)
    import textual_inversion as ti

    tokenizer = ti.build_tokenizer()
    placeholder_id, cat_id = ti.add_placeholder_token(tokenizer, PLACEHOLDER, "cat")
    ids = ti.encode_prompt(tokenizer, PROMPT.format(PLACEHOLDER))
    return json.dumps([[int(i) for i in ids], int(placeholder_id), int(cat_id)])


class MemoryWatch:
    """This process's peak memory since the last `reset()`: anonymous memory (RssAnon,
    sampled every 10 ms by a thread) and resident memory (VmHWM, kept by the kernel)."""

    def __init__(self):
        self.anonymous_peak = 0
        self.resets = 0  # a sample read before a reset is dropped, not counted after it
        self.lock = threading.Lock()
        threading.Thread(target=self.sample, daemon=True).start()

    @staticmethod
    def status_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def sample(self):
        while True:
            resets, anonymous = self.resets, self.status_kb("RssAnon")
            with self.lock:
                if resets == self.resets:
                    self.anonymous_peak = max(self.anonymous_peak, anonymous)
            time.sleep(0.01)

    def peaks_gb(self):
        """(anonymous, resident) peaks since the last reset, in GB (2**30 bytes)."""
        anonymous = max(self.anonymous_peak, self.status_kb("RssAnon"))
        return anonymous / 2**20, self.status_kb("VmHWM") / 2**20

    def reset(self):
        with self.lock:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.resets += 1
            self.anonymous_peak = self.status_kb("RssAnon")


"""
## Our side: the script as its users run it
"""


def run_ours(args, image_folder, loaded):
    """`loaded()` is called once the models are built and loaded, before the first step."""
    sys.path.insert(0, ROOT)
    import textual_inversion as ti

    import keras
    import tensorflow as tf

    ti.generate_final_images = lambda *arguments, **options: None  # training only
    fit = ti.StableDiffusionFineTuner.fit
    where = {"weights": {}}

    def fit_once_loaded(trainer, *arguments, **options):
        loaded()
        for model in ti.sd_parts(trainer.stable_diffusion):
            for weight in model.weights:
                size = int(np.prod(weight.shape)) * tf.as_dtype(weight.dtype).size / 2**30
                where["weights"][weight.dtype] = where["weights"].get(weight.dtype, 0) + size
        gc.collect()  # not counting garbage: the text encoder before it was extended
        where["live_once_loaded"] = tensorflow_live_gb()["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        history = fit(trainer, *arguments, **options)
        where["live_peak_training"] = tensorflow_live_gb()["peak"]
        return history

    ti.StableDiffusionFineTuner.fit = fit_once_loaded
    output_dir = tempfile.mkdtemp(prefix="ours-")
    argv = [
        "--base-model", args.weights, "--images", image_folder, "--prompts", PROMPT,
        "--resolution", str(args.resolution), "--max-train-steps", str(args.warmup + args.steps),
        "--sample-every", "0", "--seed", str(SEED), "--output-dir", output_dir,
    ]  # fmt: skip
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    ti.run_command(lambda: ti.main(argv))
    with open(os.path.join(output_dir, "loss.csv")) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    precision = ti.hardware.resolve_precision("auto")
    compute_dtype = keras.mixed_precision.Policy(precision).compute_dtype

    def after_the_peaks():
        return {"matmul_gflops": matmul_gflops_tensorflow(compute_dtype)}

    return seconds[args.warmup :], precision, where, after_the_peaks


def matmul_gflops_tensorflow(dtype, size=4096, repeats=5):
    """TensorFlow's best rate, in GFLOP/s, of a size x size matrix product in `dtype`:
    about the most its matmul and convolution kernels reach on this CPU."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size)), dtype)
    product = tf.function(lambda a: tf.matmul(a, a))
    return 2 * size**3 / best_seconds(lambda: product(a).numpy(), repeats) / 1e9


def best_seconds(run, repeats):
    """The shortest of `repeats` timed calls of `run()`, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def tensorflow_live_gb():
    """What TensorFlow's CPU allocator has handed out in tensors, now and at its peak,
    in GB. It counts only with oneDNN's allocator, which TensorFlow takes on CPUs with
    AVX-512 or AMX (or with TF_ENABLE_ONEDNN_OPTS=1); elsewhere both are 0."""
    import tensorflow as tf

    info = tf.config.experimental.get_memory_info("CPU:0")
    return {key: info[key] / 2**30 for key in ("current", "peak")}


"""
## diffusers' side: the step of examples/textual_inversion
"""


def run_diffusers(args, image_path, loaded):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    weight_dtype = torch.bfloat16 if args.precision == "mixed_bfloat16" else torch.float32
    ids, placeholder_id, cat_id = json.loads(args.token_ids)
    ids = np.array(ids)
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.weights, "text_encoder"))
    vae = AutoencoderKL.from_pretrained(os.path.join(args.weights, "vae"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.weights, "unet"))
    text_encoder.resize_token_embeddings(placeholder_id + 1)
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[placeholder_id] = embeddings[cat_id]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    # transformers 5 dropped the `text_model` wrapper that diffusers' script names.
    text_model = getattr(text_encoder, "text_model", text_encoder)
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.train()
        text_encoder.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(), lr=1e-4, weight_decay=1e-2, eps=1e-8
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    vae.to(dtype=weight_dtype)
    unet.to(dtype=weight_dtype)
    text_encoder.train()
    original_embeddings = embeddings.data.clone()
    keep = torch.ones(len(original_embeddings), dtype=torch.bool)
    keep[placeholder_id] = False

    import matplotlib.pyplot as plt

    image = plt.imread(image_path)[..., :3] * 2.0 - 1.0
    pixel_values = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    input_ids = torch.from_numpy(ids[None].astype("int64"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=weight_dtype != torch.float32)

    def step():
        with autocast:
            latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample().detach()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (1,)).long()
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(input_ids)[0].to(dtype=weight_dtype)
            prediction = unet(noisy_latents, timesteps, hidden).sample
            loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            embeddings.data[keep] = original_embeddings[keep]

    loaded()
    seconds = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    def after_the_peaks():  # counting slows a step and holds each attention matrix
        return {
            "step_flops": count_flops(step, [unet, vae, text_encoder]),
            "matmul_gflops": matmul_gflops_torch(weight_dtype),
        }

    return seconds[args.warmup :], args.precision, {}, after_the_peaks


def count_flops(step, models):
    """The FLOPs of one call of `step()`, by PyTorch's FLOP counter: the matmuls and
    convolutions of the forward and of the backward (input gradients only, where the
    weights are frozen). Attention is computed by plain batched matmuls here, the same
    arithmetic: the counter counts nothing for the CPU kernel of
    `scaled_dot_product_attention`."""
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    for model in models:
        if hasattr(model, "set_attn_implementation"):  # transformers' text encoder
            model.set_attn_implementation("eager")
        for layer in model.modules():  # diffusers' UNet and VAE
            if isinstance(layer, Attention):
                layer.set_processor(AttnProcessor())
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_gflops_torch(dtype, size=4096, repeats=5):
    """PyTorch's best rate, in GFLOP/s, of a size x size matrix product in `dtype`."""
    import torch

    a = torch.randn(size, size).to(dtype)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, a), repeats) / 1e9


"""
## Side by side
"""


def worker(args):
    folder = tempfile.mkdtemp(prefix="image-")
    image_path = write_image(folder, args.resolution)
    watch, loading = MemoryWatch(), {}

    def loaded():
        loading["anonymous"], loading["resident"] = watch.peaks_gb()
        watch.reset()

    if args.worker == "ours":
        seconds, precision, where, after_the_peaks = run_ours(args, folder, loaded)
    else:
        seconds, precision, where, after_the_peaks = run_diffusers(args, image_path, loaded)
    training_anonymous, training_resident = watch.peaks_gb()
    where.update(after_the_peaks())  # the FLOPs and the matmul rate, outside the peaks
    figures = {
        "ms_per_step": 1000 * statistics.median(seconds),
        "loading_anonymous_gb": loading["anonymous"],
        "loading_resident_gb": loading["resident"],
        "training_anonymous_gb": training_anonymous,
        "training_resident_gb": training_resident,
        "precision": precision,
        "where": where,
    }
    print("RESULT " + json.dumps(figures), flush=True)


def run_side(args, side, resolution, precision):
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", side, "--resolution",
        str(resolution), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--weights", args.weights, "--precision", precision,
    ]  # fmt: skip
    if side == "diffusers":
        command += ["--token-ids", token_ids()]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    print(f"{side}, {resolution} px ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        sys.exit(f"The {side} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def cpu_name():
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    flags = open("/proc/cpuinfo").read()
    extra = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{os.cpu_count()} x {names[0] if names else 'CPU'} ({', '.join(extra) or 'no bf16'})"


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    if not os.path.isdir(os.path.join(args.weights, "unet")):
        write_random_weights(args.weights)
    sys.path.insert(0, ROOT)
    import textual_inversion as ti

    precision = ti.hardware.resolve_precision("auto")
    rows = []
    for resolution in args.resolutions:
        ours = run_side(args, "ours", resolution, precision)
        theirs = run_side(args, "diffusers", resolution, precision)
        rows.append((resolution, ours, theirs))

    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"\n{cpu_name()}, batch 1, {precision}{checkpointing}, median of {args.steps} steps")
    print("GB: anonymous memory (RssAnon) / resident (VmHWM); ratio: ours / diffusers, anonymous")
    print(
        "| | ours ms/step | diffusers | ratio | ours loading GB | diffusers | ratio "
        "| ours training GB | diffusers | ratio |\n" + "| --- " * 10 + "|"
    )

    def memory(side, phase):
        return f"{side[phase + '_anonymous_gb']:.2f} / {side[phase + '_resident_gb']:.2f}"

    for resolution, ours, theirs in rows:
        ratio = {key: ours[key] / theirs[key] for key in ours if key not in ("precision", "where")}
        print(
            f"| {resolution} px | {ours['ms_per_step']:,.0f} | {theirs['ms_per_step']:,.0f} "
            f"| {ratio['ms_per_step']:.2f}x | {memory(ours, 'loading')} "
            f"| {memory(theirs, 'loading')} | {ratio['loading_anonymous_gb']:.2f}x "
            f"| {memory(ours, 'training')} | {memory(theirs, 'training')} "
            f"| {ratio['training_anonymous_gb']:.2f}x |"
        )
    summary = "; ".join(
        f"{resolution} px {ours['ms_per_step'] / theirs['ms_per_step']:.2f}x the time, "
        f"{ours['training_anonymous_gb'] / theirs['training_anonymous_gb']:.2f}x the training "
        f"memory, {ours['loading_anonymous_gb'] / theirs['loading_anonymous_gb']:.2f}x the loading"
        for resolution, ours, theirs in rows
    )
    print(f"Ours against diffusers ({precision}{checkpointing}): {summary}.")
    # Where our memory goes: what the weights take, what TensorFlow's allocator has handed
    # out in tensors (the weights and more) once loaded and at the step's peak; the rest
    # of the anonymous peak is the interpreter's and the allocator's free space.
    for resolution, ours, _ in rows:
        where = ours["where"]
        weights = " + ".join(f"{gb:.2f} {dtype}" for dtype, gb in where["weights"].items())
        print(
            f"Ours, {resolution} px: weights {weights} GB; TensorFlow's tensors "
            f"{where['live_once_loaded']:.2f} GB once loaded, {where['live_peak_training']:.2f} "
            f"GB at the training peak, in an anonymous peak of {ours['training_anonymous_gb']:.2f}"
            " GB (0 where TensorFlow does not count: see tensorflow_live_gb)."
        )
    # How far a step is from this CPU's floor: diffusers' FLOPs (PyTorch's count of its
    # step; ours computes the same model, though its products need not be the same ones,
    # e.g. what is recomputed) against each side's matmul rate.
    for resolution, ours, theirs in rows:
        flops = theirs["where"]["step_flops"]
        rates = []
        for side in (ours, theirs):
            achieved = flops / side["ms_per_step"] / 1e6  # GFLOP/s
            floor_ms = flops / side["where"]["matmul_gflops"] / 1e6
            rates.append((achieved, side["where"]["matmul_gflops"], floor_ms))
        (ours_rate, tf_rate, tf_floor), (their_rate, torch_rate, torch_floor) = rates
        print(
            f"{resolution} px: a step is {flops / 1e9:,.0f} GFLOP (PyTorch's count of diffusers' "
            f"step). Ours: {ours_rate:.0f} GFLOP/s, {ours_rate / tf_rate:.2f} of TensorFlow's "
            f"4096 x 4096 matmul here ({tf_rate:.0f} GFLOP/s, a floor of {tf_floor:,.0f} ms a "
            f"step, {tf_floor / theirs['ms_per_step']:.2f}x diffusers' step); diffusers: "
            f"{their_rate:.0f} GFLOP/s, {their_rate / torch_rate:.2f} of PyTorch's "
            f"({torch_rate:.0f} GFLOP/s, a floor of {torch_floor:,.0f} ms)."
        )


if __name__ == "__main__":
    main()
