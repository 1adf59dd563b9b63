"""--distribute: data-parallel training under MirroredStrategy, on two logical CPU
devices (the CPU split in two before TensorFlow starts, in a subprocess)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np

from conftest import RESOLUTION, ROOT

import textual_inversion as ti

# Splits the CPU into two logical devices, then runs the script as `python
# textual_inversion.py ...` would.
TWO_DEVICES = f"""
import runpy, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv[0] = {os.path.join(ROOT, "textual_inversion.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Measured: the losses agree within 2e-5 (relative), the vectors within 1.4e-5. A batch
# of 1 and a batch of 2 run the convolutions in different orders, and Adam's normalised
# update passes such rounding on for components with small gradients. A replica that
# used the wrong noise, or missed the other's gradient, would be off by about the
# learning rate (1e-2) in many components.
LOSS_TOLERANCE = 1e-4
VECTOR_TOLERANCE = 1e-4


def start(command):
    return subprocess.Popen(
        [sys.executable, *map(str, command)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process, timeout=1500):
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def one_plain_colour_image(folder):
    """Keras reads a batch ahead to build a model under a strategy, which moves the
    data pipeline's random state (shuffles, crops, flips) on. Crops and flips of one
    plain-coloured image are all the same picture, so both runs see the same data."""
    import matplotlib.pyplot as plt

    os.makedirs(folder)
    plt.imsave(os.path.join(folder, "plain.png"), np.full((160, 160, 3), [0.8, 0.4, 0.2]))
    return folder


def training_flags(image_folder, output_dir):
    return [
        "--random-weights",
        "--resolution", RESOLUTION,
        "--images", image_folder,
        "--prompts", "a photo of {}",
        "--batch-size", 2,
        "--max-train-steps", 2,
        "--learning-rate", 0.01,  # steps big enough to tell a wrong one
        "--sample-every", 0,
        "--sample-steps", 1,
        "--seed", 7,
        "--output-dir", output_dir,
    ]  # fmt: skip


def step_losses(output_dir):
    with open(os.path.join(output_dir, "loss.csv")) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, image_folder):
    flags = training_flags(image_folder, tmp_path / "run")
    flags[flags.index("--batch-size") + 1] = 3
    result = finish(start(["-c", TWO_DEVICES, *flags, "--distribute"]))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --batch-size 3 does not split evenly over the 2 devices" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_replicas_of_batch_one_learn_what_one_device_of_batch_two_does(tmp_path):
    images = one_plain_colour_image(tmp_path / "images")
    distributed_dir, single_dir = tmp_path / "two-devices", tmp_path / "one-device"
    # Both runs at once: most of their time is tracing, which keeps one core busy.
    distributed = start(["-c", TWO_DEVICES, *training_flags(images, distributed_dir), "--distribute"])
    single = start([os.path.join(ROOT, "textual_inversion.py"), *training_flags(images, single_dir)])
    distributed, single = finish(distributed), finish(single)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert "Training on 2 replicas" in distributed.stdout
    assert single.returncode == 0, single.stderr[-3000:]

    # The distributed run completed: both steps, its embedding, and its final images
    # (drawn on one device: 3 per prompt, not 3 per replica).
    assert len(step_losses(distributed_dir)) == 2
    final_images = os.listdir(distributed_dir / "final")
    assert len(final_images) == len(os.listdir(single_dir / "final")) > 0

    # The same examples with the same noise: the same loss at each step...
    np.testing.assert_allclose(step_losses(distributed_dir), step_losses(single_dir), rtol=LOSS_TOLERANCE)

    # ...and the same learned vector,
    learned = ti.load_embedding(str(distributed_dir / ti.EMBEDDING_FILE))
    reference = ti.load_embedding(str(single_dir / ti.EMBEDDING_FILE))
    assert learned.metadata["step"] == reference.metadata["step"] == "2"
    np.testing.assert_allclose(learned.vectors, reference.vectors, atol=VECTOR_TOLERANCE, rtol=0)
    # which did move away from cat's row, where it started (cosine 1 before training).
    with open(distributed_dir / "learned_words.json") as f:
        assert json.load(f)[0]["nearest"][0]["cosine"] < 0.999
