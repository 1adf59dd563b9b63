"""The script from its command line, in subprocesses, as a user runs it.

Three runs start together, in a module fixture: a run with --distribute on two logical
CPU devices, the same run on one device, and the same run once more, killed with
SIGKILL after its third step (it sends the signal to itself, so that the step is always
the same), resumed and stopped with Ctrl-C, and resumed again to the end. Most of a run's time is building and tracing the models, which keeps one core
busy, so side by side they take little longer than the longest alone. The two tools,
`generate` and `evaluate`, then run side by side too.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import textual_inversion as ti
from conftest import RESOLUTION, ROOT, run_script, save_random_embedding

PLACEHOLDER = "<my-funny-cat-token>"
SCRIPT = os.path.join(ROOT, "textual_inversion.py")
GENERATE = os.path.join(ROOT, "tools", "generate.py")
EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")

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

# 2 images and 1 prompt make 5 examples, 2 steps an epoch with a batch of 2.
STEPS = 4
# Every loss of a resumed run equals the unstopped run's bit for bit, and so did the
# vectors of these runs; in-process we once saw 84 of 1,536 components differ by an
# ulp (3.7e-9). A state that missed anything (Adam's moments, the step, the random
# state, the data's place) moves the vector by about the learning rate, 1e-2.
RESUME_TOLERANCE = 1e-7
STOPPED_AFTER = 3  # steps: SIGKILL after the third, then SIGINT after the third again

# The script's main(), with a signal sent to itself right after a step is logged: the
# step the signal comes after is then the same in every run, however busy the machine.
SIGNAL_AFTER_STEP = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import textual_inversion as ti
signal_name, after_step = sys.argv.pop(1), int(sys.argv.pop(1))
log_step = ti.LossLogger.on_train_batch_end

def log_step_then_signal(self, batch, logs=None):
    log_step(self, batch, logs)
    if int(self.model.step.numpy()) == after_step:
        os.kill(os.getpid(), getattr(signal, signal_name))

ti.LossLogger.on_train_batch_end = log_step_then_signal
ti.run_command(ti.main)
"""


class Run:
    """A run of the script in the background; its output goes to files, not pipes, so
    that a chatty run never waits for the test to read it."""

    def __init__(self, command, logs):
        self.stdout_path, self.stderr_path = f"{logs}.stdout", f"{logs}.stderr"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, *map(str, command)], stdout=stdout, stderr=stderr, text=True
            )

    def finish(self, timeout=1500):
        self.process.wait(timeout=timeout)
        with open(self.stdout_path) as stdout, open(self.stderr_path) as stderr:
            self.stdout, self.stderr = stdout.read(), stderr.read()
        return self.process.returncode


def training_flags(image_folder, output_dir):
    return [
        "--random-weights",
        "--resolution", RESOLUTION,
        "--images", image_folder,
        "--prompts", "a photo of {}",
        "--batch-size", 2,
        "--max-train-steps", STEPS,
        "--learning-rate", 0.01,  # steps big enough to tell a wrong one
        "--sample-every", 0,
        "--sample-steps", 1,
        "--seed", 7,
        "--output-dir", output_dir,
    ]  # fmt: skip


def read_loss_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [row for row in rows if None not in row.values()]  # not a row being written


def step_losses(output_dir):
    return [float(row["loss"]) for row in read_loss_rows(os.path.join(output_dir, "loss.csv"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("command-line")
    runs = {
        "distributed": Run(
            [
                "-c",
                TWO_DEVICES,
                *training_flags(image_folder, root / "two-devices"),
                "--distribute",
            ],
            root / "two-devices",
        ),
        "single": Run(
            [SCRIPT, *training_flags(image_folder, root / "one-device")], root / "one-device"
        ),
        "killed": Run(
            ["-c", SIGNAL_AFTER_STEP, "SIGKILL", STOPPED_AFTER,
             *training_flags(image_folder, root / "run"), "--save-every-steps", 2],
            root / "killed",
        ),  # fmt: skip
    }
    yield root, runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


# --- kill -9, Ctrl-C, --resume -------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_and_resumed(runs, image_folder):
    """The run killed with SIGKILL after its third step (its state saved after the
    second); resumed, and stopped by SIGINT after the third step again; resumed again,
    within its second epoch, with samples, to its last step."""
    root, runs = runs
    output_dir = root / "run"
    flags = [*training_flags(image_folder, output_dir), "--save-every-steps", 2]
    resume = ["--resume", output_dir / ti.EMBEDDING_FILE]

    killed = runs["killed"]
    killed.finish()
    logged_when_killed = len(step_losses(output_dir))
    saved_when_killed = ti.load_embedding(str(output_dir / ti.EMBEDDING_FILE))

    interrupted = Run(
        ["-c", SIGNAL_AFTER_STEP, "SIGINT", STOPPED_AFTER, *flags, *resume], root / "interrupted"
    )
    interrupted.finish()
    saved_when_interrupted = ti.load_embedding(str(output_dir / ti.EMBEDDING_FILE))

    finished = run_script(*flags, *resume, "--sample-every", 1, timeout=1500)
    return dict(
        output_dir=output_dir, killed=killed, logged_when_killed=logged_when_killed,
        saved_when_killed=saved_when_killed, interrupted=interrupted,
        saved_when_interrupted=saved_when_interrupted, finished=finished,
    )  # fmt: skip


def test_a_killed_run_leaves_whole_files_of_its_last_save(stopped_and_resumed):
    assert stopped_and_resumed["killed"].process.returncode == -signal.SIGKILL
    assert stopped_and_resumed["logged_when_killed"] == STOPPED_AFTER
    assert stopped_and_resumed["saved_when_killed"].metadata["step"] == "2"
    assert not [
        name for name in os.listdir(stopped_and_resumed["output_dir"]) if ".partial" in name
    ]


def test_ctrl_c_saves_the_embedding_and_exits_130_with_the_resume_command(stopped_and_resumed):
    interrupted = stopped_and_resumed["interrupted"]
    assert interrupted.process.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr
    assert "Stopped by SIGINT" in interrupted.stderr and "--resume" in interrupted.stderr
    assert "Resuming step 2 with its training state" in interrupted.stdout
    assert stopped_and_resumed["saved_when_interrupted"].metadata["step"] == str(STOPPED_AFTER)


def test_a_killed_and_stopped_run_ends_where_the_unstopped_run_does(runs, stopped_and_resumed):
    root, runs = runs
    finished = stopped_and_resumed["finished"]
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert runs["single"].finish() == 0, runs["single"].stderr[-3000:]
    assert "Resuming step 3 with its training state" in finished.stdout
    # The progress bar counts the 1 step left of the second epoch, not the epoch's 2.
    assert "1/1" in finished.stdout and "2/2" not in finished.stdout

    output_dir, unstopped_dir = stopped_and_resumed["output_dir"], root / "one-device"
    rows = read_loss_rows(output_dir / "loss.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))  # each once
    assert step_losses(output_dir) == step_losses(unstopped_dir)
    resumed = ti.load_embedding(str(output_dir / ti.EMBEDDING_FILE))
    unstopped = ti.load_embedding(str(unstopped_dir / ti.EMBEDDING_FILE))
    assert resumed.metadata["step"] == unstopped.metadata["step"] == str(STEPS)
    np.testing.assert_allclose(resumed.vectors, unstopped.vectors, rtol=0, atol=RESUME_TOLERANCE)


def test_a_finished_run_writes_its_samples_montage_loss_plot_words_and_final_images(
    stopped_and_resumed,
):
    output_dir = stopped_and_resumed["output_dir"]
    assert stopped_and_resumed["finished"].returncode == 0
    assert os.path.getsize(output_dir / "loss.png") > 0
    assert os.path.exists(output_dir / "learned_words.json")

    # Samples of the one epoch that ended in the last part of the run, its second.
    slugs = [ti.slugify(p.format(PLACEHOLDER)) for p in ti.SAMPLE_PROMPTS]
    expected = [f"epoch-002_{slug}.png" for slug in slugs]
    assert sorted(os.listdir(output_dir / "samples")) == sorted(expected + ["progress.png"])
    assert len(os.listdir(output_dir / "final")) == len(ti.FINAL_PROMPTS)

    import matplotlib.pyplot as plt

    sample = plt.imread(output_dir / "samples" / expected[0])
    assert sample.shape[:2] == (RESOLUTION, 3 * RESOLUTION)


# --- --distribute ------------------------------------------------------------------------


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, image_folder):
    flags = training_flags(image_folder, tmp_path / "run")
    flags[flags.index("--batch-size") + 1] = 3
    run = Run(["-c", TWO_DEVICES, *flags, "--distribute"], tmp_path / "log")
    assert run.finish() == 2, run.stderr[-2000:]
    assert "error: --batch-size 3 does not split evenly over the 2 devices" in run.stderr
    assert "Traceback" not in run.stderr


def test_two_replicas_of_batch_one_learn_what_one_device_of_batch_two_does(runs):
    root, runs = runs
    distributed_dir, single_dir = root / "two-devices", root / "one-device"
    distributed, single = runs["distributed"], runs["single"]
    assert distributed.finish() == 0, distributed.stderr[-3000:]
    assert "Training on 2 replicas" in distributed.stdout
    assert single.finish() == 0, single.stderr[-3000:]

    # The distributed run completed: all its steps, its embedding, and its final
    # images, drawn on one device (3 images side by side, not 3 per replica).
    assert len(step_losses(distributed_dir)) == STEPS
    final_images = sorted(os.listdir(distributed_dir / "final"))
    assert final_images == sorted(os.listdir(single_dir / "final"))
    import matplotlib.pyplot as plt

    assert plt.imread(distributed_dir / "final" / final_images[0]).shape[:2] == (
        RESOLUTION, 3 * RESOLUTION,
    )  # fmt: skip

    # The same examples with the same noise: the same loss at each step...
    np.testing.assert_allclose(
        step_losses(distributed_dir), step_losses(single_dir), rtol=LOSS_TOLERANCE
    )
    # ...and the same learned vector,
    learned = ti.load_embedding(str(distributed_dir / ti.EMBEDDING_FILE))
    reference = ti.load_embedding(str(single_dir / ti.EMBEDDING_FILE))
    assert learned.metadata["step"] == reference.metadata["step"] == str(STEPS)
    np.testing.assert_allclose(learned.vectors, reference.vectors, atol=VECTOR_TOLERANCE, rtol=0)
    # which did move away from cat's row, where it started (cosine 1 before training).
    with open(distributed_dir / "learned_words.json") as f:
        assert json.load(f)[0]["nearest"][0]["cosine"] < 0.999


# --- generate and evaluate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def drawing_runs(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("drawing")
    generate_embedding = save_random_embedding(
        root / "generate.safetensors", "<my-test-token>", seed=2
    )
    evaluate_embedding = save_random_embedding(
        root / "evaluate.safetensors", "<my-eval-token>", seed=3
    )
    common = ["--sample-steps", 2, "--random-weights", "--resolution", RESOLUTION]
    runs = {
        "generate": Run(
            [GENERATE, "--embedding", generate_embedding,
             "--prompt", "an oil painting of {}", "--batch-size", 2,
             *common, "--output-dir", root / "gen"],
            root / "generate",
        ),
        "evaluate": Run(
            [EVALUATE, "--embedding", evaluate_embedding, "--images", image_folder,
             "--num-images", 2, *common, "--output-dir", root / "eval"],
            root / "evaluate",
        ),
    }  # fmt: skip
    yield root, runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def test_the_generate_tool_writes_images(drawing_runs):
    root, runs = drawing_runs
    run = runs["generate"]
    assert run.finish() == 0, run.stderr[-3000:]
    written = sorted(os.listdir(root / "gen" / "generated"))
    assert len(written) == 2
    assert all(name.startswith("an-oil-painting-of-my-test-token") for name in written)

    import matplotlib.pyplot as plt

    image = plt.imread(root / "gen" / "generated" / written[0])
    assert image.shape[:2] == (RESOLUTION, RESOLUTION)


def test_the_evaluate_tool_writes_both_scores(drawing_runs):
    root, runs = drawing_runs
    run = runs["evaluate"]
    assert run.finish() == 0, run.stderr[-3000:]
    report = json.loads((root / "eval" / "eval.json").read_text())
    assert len(report["per_prompt"]) == 3  # the tool's evaluation prompts
    for key in ("image_similarity", "text_similarity"):
        assert math.isfinite(report[key]) and -1.0 <= report[key] <= 1.0
        assert all(-1.0 <= p[key] <= 1.0 for p in report["per_prompt"])
    assert report["num_images"] == 2 and report["sample_steps"] == 2
    assert "random weights" in report["clip_model"]
    assert report["nearest_words"][0]["token"] == "<my-eval-token>"
    assert "<my-eval-token>" not in report["per_prompt"][0]["text_prompt"]
