"""The script from its command line, in subprocesses, as a user runs it, with small
stand-ins for the VAE and the UNet (tests/stand_ins.py): these tests check the wiring,
not the arithmetic. The command line on the full-size checkpoints, and
`tools/generate.py` on the SD 2.x one, run in the background (conftest.py).

Three runs start together, in a module fixture: a run with --distribute on two logical
CPU devices, the same run on one device, and the same run once more, killed with
SIGKILL after its fourth step (it sends the signal to itself, so that the step is always
the same) and resumed to the end. Ctrl-C is tested in-process (test_exact_resume.py).
"""

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import textual_inversion as ti
from textual_inversion_extras import saving
from conftest import RESOLUTION, ROOT, save_random_embedding

PLACEHOLDER = "<my-funny-cat-token>"
SCRIPT = os.path.join(ROOT, "textual_inversion.py")
EVALUATE = os.path.join(ROOT, "tools", "evaluate.py")
STAND_INS = os.path.join(ROOT, "tests", "stand_ins.py")

# The runs train in float32 (`--precision float32`), on every CPU. The killed and
# resumed run is compared with the unstopped one bit for bit, whatever the precision;
# the two-replica run with the one-device run within rounding, and that rounding must
# not depend on the CPU. Under `--precision auto` a CPU with bfloat16 arithmetic trains
# in mixed_bfloat16, whose kernels round a batch of 1 and a batch of 2 apart by up to
# bfloat16's 2^-8 (measured: 7e-4 on an AMD EPYC with AVX-512 BF16; 6.3e-5 at the first
# step on an Intel Xeon with AMX), which says nothing about the distribution. In float32
# oneDNN takes no bfloat16 or AMX kernel, and the runs part only by the order of float32
# sums, which Adam's normalised update passes on for components with small gradients.
# Measured in float32 on an AMD EPYC with AVX-512 BF16: 1.1e-7 (first loss), 1.6e-7
# (losses), 5.5e-7 (vectors); the bounds leave a factor of 100 or more for other CPUs'
# sum orders. A replica that used the wrong noise, or missed the other's gradient, is
# off by about the learning rate (1e-2) in many components from the first update on.
FIRST_LOSS_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-4
VECTOR_TOLERANCE = 1e-4

# 2 images and 1 prompt make 5 examples, 2 steps an epoch with a batch of 2.
STEPS = 6
# Every loss of a resumed run equals the unstopped run's bit for bit, and so did the
# vectors of these runs; in-process we once saw 84 of 1,536 components differ by an
# ulp (3.7e-9). A state that missed anything (Adam's moments, the step, the random
# state, the data's place) moves the vector by about the learning rate, 1e-2.
RESUME_TOLERANCE = 1e-7
SAVE_EVERY_STEPS = 3
KILLED_AFTER = 4  # steps: killed within the second epoch, one step after its last save


class Run:
    """A run of the script in the background, with the stand-in models; its output
    goes to files, not pipes, so that a chatty run never waits for the test to read it.
    `options` are tests/stand_ins.py's own (--two-devices, --signal, --after-step)."""

    def __init__(self, script, flags, logs, options=()):
        self.stdout_path, self.stderr_path = f"{logs}.stdout", f"{logs}.stderr"
        command = [sys.executable, STAND_INS, *options, script, *flags]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [str(part) for part in command], stdout=stdout, stderr=stderr, text=True
            )

    def finish(self, timeout=900):
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
        "--precision", "float32",  # the same rounding on every CPU (above)
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
def runs(tmp_path_factory, image_folder, checkpoint_command_line_run):
    # The oracle's run of the full-size checkpoint starts now too, beside these.
    root = tmp_path_factory.mktemp("command-line")
    killed_flags = [
        *training_flags(image_folder, root / "run"),
        "--save-every-steps",
        SAVE_EVERY_STEPS,
    ]
    runs = {
        "distributed": Run(
            SCRIPT, [*training_flags(image_folder, root / "two-devices"), "--distribute"],
            root / "two-devices", options=["--two-devices"],
        ),
        "single": Run(
            SCRIPT, training_flags(image_folder, root / "one-device"), root / "one-device"
        ),
        "killed": Run(
            SCRIPT, killed_flags, root / "killed",
            options=["--signal", "SIGKILL", "--after-step", KILLED_AFTER],
        ),
    }  # fmt: skip
    yield root, runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


# --- kill -9 and --resume ------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_and_resumed(runs, image_folder):
    """The run killed with SIGKILL after its fourth step (its state saved after the
    third), then resumed, within its second epoch, with samples, to its last step."""
    root, runs = runs
    output_dir = root / "run"
    flags = [*training_flags(image_folder, output_dir), "--save-every-steps", SAVE_EVERY_STEPS]
    resume = ["--resume", output_dir / saving.EMBEDDING_FILE]

    killed = runs["killed"]
    killed.finish()
    logged_when_killed = len(step_losses(output_dir))
    saved_when_killed = saving.load_embedding(str(output_dir / saving.EMBEDDING_FILE))

    finished = Run(SCRIPT, [*flags, *resume, "--sample-every", 1], root / "finished")
    finished.finish()
    return dict(
        output_dir=output_dir, killed=killed, logged_when_killed=logged_when_killed,
        saved_when_killed=saved_when_killed, finished=finished,
    )  # fmt: skip


def test_a_killed_run_leaves_whole_files_of_its_last_save(killed_and_resumed):
    assert killed_and_resumed["killed"].process.returncode == -signal.SIGKILL
    assert killed_and_resumed["logged_when_killed"] == KILLED_AFTER
    assert killed_and_resumed["saved_when_killed"].metadata["step"] == str(SAVE_EVERY_STEPS)
    assert not [name for name in os.listdir(killed_and_resumed["output_dir"]) if ".partial" in name]


def test_a_killed_run_resumed_ends_where_the_unstopped_run_does(runs, killed_and_resumed):
    root, runs = runs
    finished = killed_and_resumed["finished"]
    assert finished.process.returncode == 0, finished.stderr[-3000:]
    assert runs["single"].finish() == 0, runs["single"].stderr[-3000:]
    assert f"Resuming step {SAVE_EVERY_STEPS} with its training state" in finished.stdout
    # The progress bar counts the 1 step left of the second epoch, then the third's 2.
    assert "1/1" in finished.stdout and "2/2" in finished.stdout

    output_dir, unstopped_dir = killed_and_resumed["output_dir"], root / "one-device"
    rows = read_loss_rows(output_dir / "loss.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))  # each once
    assert step_losses(output_dir) == step_losses(unstopped_dir)
    resumed = saving.load_embedding(str(output_dir / saving.EMBEDDING_FILE))
    unstopped = saving.load_embedding(str(unstopped_dir / saving.EMBEDDING_FILE))
    assert resumed.metadata["step"] == unstopped.metadata["step"] == str(STEPS)
    np.testing.assert_allclose(resumed.vectors, unstopped.vectors, rtol=0, atol=RESUME_TOLERANCE)


def test_a_finished_run_writes_its_samples_montage_loss_plot_words_and_final_images(
    killed_and_resumed,
):
    output_dir = killed_and_resumed["output_dir"]
    assert killed_and_resumed["finished"].process.returncode == 0
    assert os.path.getsize(output_dir / "loss.png") > 0
    assert os.path.exists(output_dir / "learned_words.json")

    # Samples of the two epochs that ended in the resumed part of the run.
    slugs = [ti.slugify(p.format(PLACEHOLDER)) for p in ti.SAMPLE_PROMPTS]
    expected = [f"epoch-{epoch:03d}_{slug}.png" for epoch in (2, 3) for slug in slugs]
    assert sorted(os.listdir(output_dir / "samples")) == sorted(expected + ["progress.png"])
    assert len(os.listdir(output_dir / "final")) == len(ti.FINAL_PROMPTS)

    import matplotlib.pyplot as plt

    sample = plt.imread(output_dir / "samples" / expected[0])
    assert sample.shape[:2] == (RESOLUTION, 3 * RESOLUTION)
    montage = plt.imread(output_dir / "samples" / "progress.png")
    assert montage.shape[1] == 2 * RESOLUTION  # a column per sampling epoch


def test_a_run_resumed_from_a_snapshot_goes_on_as_the_unstopped_run_did(runs, image_folder):
    """The unstopped run keeps a snapshot at each epoch's end (steps 2, 4 and 6); the
    snapshot of step 2, resumed into a new folder, trains steps 3 to 6 as it did."""
    root, runs = runs
    assert runs["single"].finish() == 0, runs["single"].stderr[-3000:]
    unstopped_dir = root / "one-device"
    snapshots = sorted(os.listdir(unstopped_dir / "snapshots"))
    assert snapshots == ["states", "step-000002.safetensors", "step-000004.safetensors",
                         "step-000006.safetensors"]  # fmt: skip
    snapshot = unstopped_dir / "snapshots" / "step-000002.safetensors"
    output_dir = root / "from-a-snapshot"
    resumed = Run(
        SCRIPT, [*training_flags(image_folder, output_dir), "--resume", snapshot], output_dir
    )
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert "Resuming step 2 with its training state" in resumed.stdout
    assert step_losses(output_dir) == step_losses(unstopped_dir)[2:]
    learned = saving.load_embedding(str(output_dir / saving.EMBEDDING_FILE))
    unstopped = saving.load_embedding(str(unstopped_dir / "snapshots" / "step-000006.safetensors"))
    np.testing.assert_allclose(learned.vectors, unstopped.vectors, rtol=0, atol=RESUME_TOLERANCE)


# --- --distribute ------------------------------------------------------------------------


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, image_folder):
    flags = training_flags(image_folder, tmp_path / "run")
    flags[flags.index("--batch-size") + 1] = 3
    run = Run(SCRIPT, [*flags, "--distribute"], tmp_path / "log", options=["--two-devices"])
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
    distributed_losses, single_losses = step_losses(distributed_dir), step_losses(single_dir)
    np.testing.assert_allclose(distributed_losses[0], single_losses[0], rtol=FIRST_LOSS_TOLERANCE)
    np.testing.assert_allclose(distributed_losses, single_losses, rtol=LOSS_TOLERANCE)
    # ...and the same learned vector,
    learned = saving.load_embedding(str(distributed_dir / saving.EMBEDDING_FILE))
    reference = saving.load_embedding(str(single_dir / saving.EMBEDDING_FILE))
    assert learned.metadata["step"] == reference.metadata["step"] == str(STEPS)
    np.testing.assert_allclose(learned.vectors, reference.vectors, atol=VECTOR_TOLERANCE, rtol=0)
    # which did move away from cat's row, where it started (cosine 1 before training).
    with open(distributed_dir / "learned_words.json") as f:
        assert json.load(f)[0]["nearest"][0]["cosine"] < 0.999


# --- evaluate (generate runs on the SD 2.x file) -----------------------------------------------


def test_the_evaluate_tool_writes_the_images_it_scores_and_their_mean_scores(
    tmp_path, image_folder
):
    embedding = save_random_embedding(tmp_path / "evaluate.safetensors", "<my-eval-token>", 3)
    run = Run(
        EVALUATE,
        ["--embedding", embedding, "--images", image_folder, "--num-images", 2,
         "--sample-steps", 2, "--random-weights", "--resolution", RESOLUTION,
         "--output-dir", tmp_path / "eval"],
        tmp_path / "evaluate",
    )  # fmt: skip
    assert run.finish() == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    per_prompt = report["per_prompt"]
    assert len(per_prompt) == 3  # the tool's evaluation prompts
    # Each prompt's images were drawn and written, 2 side by side.
    import matplotlib.pyplot as plt

    for entry in per_prompt:
        image = plt.imread(tmp_path / "eval" / "eval" / f"{ti.slugify(entry['prompt'])}.png")
        assert image.shape[:2] == (RESOLUTION, 2 * RESOLUTION)
    # The scores are the means over the prompts of each prompt's own scores, and each
    # prompt's text score is its own: the prompts' texts, without the token, differ.
    for key in ("image_similarity", "text_similarity"):
        assert report[key] == pytest.approx(np.mean([p[key] for p in per_prompt]), rel=1e-12)
    assert len({p["text_similarity"] for p in per_prompt}) == 3
    assert all("<my-eval-token>" not in p["text_prompt"] for p in per_prompt)
    assert report["num_images"] == 2 and report["sample_steps"] == 2
    assert "random weights" in report["clip_model"]
    assert report["nearest_words"][0]["token"] == "<my-eval-token>"
