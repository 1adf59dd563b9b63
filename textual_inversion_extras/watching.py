"""Watching training: a progress bar that counts the steps a run will take, the loss of
every step (`loss.csv`, `loss.png`), a montage of the sample images, and the words
nearest to the learned vectors."""

import csv
import json
import math
import os
import re
import time

import keras
import numpy as np
from matplotlib import pyplot as plt


def slugify(text, max_length=60):
    """A file name made of `text`: lowercase words joined by dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length]


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
        steps_done = min(batch + 1, self.steps_this_epoch)
        self.bar.update(steps_done, [("loss", float(logs["loss"]))])
        self.line_open = steps_done < self.steps_this_epoch  # the bar ends its own line

    def end_line(self):
        """Ends the bar's line if a step left it open, so that what is printed next (an
        error, a warning) starts on a line of its own."""
        if getattr(self, "line_open", False):
            print(flush=True)
            self.line_open = False


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


def nearest_words(tokenizer, matrix, token_ids, k=5):
    """For each of `token_ids`, the `k` rows of the token `matrix` nearest to its row."""
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


def report_nearest_words(tokenizer, matrix, token_ids, path=None):
    report = nearest_words(tokenizer, matrix, token_ids)
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
