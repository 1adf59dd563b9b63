"""Saving: the learned embedding (the file other tools load), the training state beside
it, and the output folder a run writes into. Every file is written whole or not at all."""

import hashlib
import json
import os
import re
from typing import NamedTuple

import keras
import numpy as np
import safetensors
import safetensors.numpy
from keras import ops

from textual_inversion_extras import checkpoints
from textual_inversion_extras.errors import UserError

"""
## Extras: keeping what was learned

The tutorial's result died with its Colab session. Here the learned embedding is saved
every `--save-every` epochs and at the end, as `learned_embeds.safetensors`: a single
tensor, `{placeholder_token: float32 [num_vectors, 768]}` (1024 wide for SD 2.x). That is
the layout diffusers' `load_textual_inversion`, AUTOMATIC1111 and ComfyUI read for
Stable Diffusion 1.x models, which all share this CLIP ViT-L/14 text encoder, and for
SD 2.x ones (OpenCLIP ViT-H/14). The file's metadata header
records how it was made. `--resume` goes on training from such a file.
"""

EMBEDDING_FILE = "learned_embeds.safetensors"
# The text encoders' width: CLIP ViT-L/14 (Stable Diffusion 1.x), OpenCLIP ViT-H/14 (2.x).
EMBEDDING_WIDTHS = {"SD 1.x": 768, "SD 2.x": 1024}


class LearnedEmbedding(NamedTuple):
    token: str
    vectors: np.ndarray  # float32 [num_vectors, 768] (SD 1.x; 1024 for SD 2.x)
    metadata: dict


def save_embedding(path, token, vectors, metadata):
    """Writes the embedding beside `path`, then renames it: never a half-written file."""
    metadata = {key: str(value) for key, value in metadata.items()}
    # "pt" is what PyTorch loaders (diffusers, transformers) look for; the tensor
    # itself is plain float32, as every safetensors file is.
    metadata["format"] = "pt"
    partial_path = path + ".partial"
    try:
        safetensors.numpy.save_file(
            {token: np.asarray(vectors, dtype="float32")}, partial_path, metadata=metadata
        )
        os.replace(partial_path, path)
    finally:
        if os.path.exists(partial_path):
            os.remove(partial_path)


def load_embedding(path, family="SD 1.x"):
    """The embedding in `path`, for a model of `family`, whose width its vectors must have."""
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
    width = EMBEDDING_WIDTHS[family]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise UserError(
            f"The embedding in {path} has shape {list(vectors.shape)}, but the token "
            f"vectors of {family} models are {width} wide (SD 1.x: 768, SD 2.x: 1024), "
            "so it was trained for another model; pass the --base-model it was trained on."
        )
    return LearnedEmbedding(token, vectors, metadata)


"""
**The training state.** The vector alone does not let a run go on as if it had never
stopped: Adam's moments, the random state that draws the noise and the timesteps, and
the run's place in its data matter too. So `training_state.safetensors` goes beside
the embedding: the learned vectors, the step, the trainer's seed-generator state, and
every variable of the optimizer (its iteration count, its moments and, under
mixed_float16, its loss scale). The data needs no saving, as every batch is a function
of the seed and the step. The embedding stays the single tensor other tools load.

Both files are saved every `--save-every-steps` steps, every `--save-every` epochs, and
whenever training stops, each written to a `.partial` file first and then renamed over
the old one. A run killed at any moment (kill -9, an out-of-memory kill, a Colab
session that disconnects) leaves the files of its last save whole; a save that fails
(a full disk) leaves them as they were. The state is renamed first, and holds the
vectors too: on resume it is what counts.

A state fits only the run that saved it: `run_fingerprint` records what must not
change (the training images and prompts, the batch, the precision, the number of
vectors, the seed, ...). The learning rate and the number of epochs (the length of its
cosine decay) may change, to train longer or slower: the run then goes on, and says it
has left the saved run's schedule.
"""

SCHEDULE_SETTINGS = ("--learning-rate", "--epochs")

TRAINING_STATE_FILE = "training_state.safetensors"
SAVE_EVERY_STEPS = 10

"""
**Snapshots.** Textual inversion overfits, and the loss says little about when: the
step to keep is found afterwards, by looking and scoring (`tools/evaluate.py --run`).
So each epoch's save and the last one are also kept under their step's name,
`snapshots/step-NNNNNN.safetensors` (a few kilobytes each, the embedding's format), with
their training state in `snapshots/states/`; `--resume` goes on from any of them.
"""

SNAPSHOTS_DIR = "snapshots"


def snapshot_paths(output_dir, step):
    """The snapshot of `step`: its embedding file and its training state."""
    name = f"step-{step:06d}.safetensors"
    folder = os.path.join(output_dir, SNAPSHOTS_DIR)
    return os.path.join(folder, name), os.path.join(folder, "states", name)


def state_path_for(embedding_path):
    """Where the training state saved with an embedding file is."""
    folder, name = os.path.split(embedding_path)
    if name == EMBEDDING_FILE:
        return os.path.join(folder, TRAINING_STATE_FILE)
    return os.path.join(folder, "states", name)


"""
**The trigger word's file.** AUTOMATIC1111 and ComfyUI name an embedding by its file,
not by the token inside it: `learned_embeds.safetensors` would be triggered by
"learned_embeds", and two runs' files would collide. So each save also writes the
embedding as `<word>.safetensors`, the token made a file name that Windows, macOS and
Linux all accept (`my-funny-cat-token.safetensors`).
"""

WINDOWS_RESERVED_NAMES = {"con", "prn", "aux", "nul"} | {
    f"{device}{number}" for device in ("com", "lpt") for number in range(10)
}


def trigger_word(token):
    """`token` as a file name: no characters Windows forbids (<>:"/\\|?*, control
    characters), no trailing dots or spaces, no name Windows reserves."""
    word = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "", token).strip(" .")
    word = word or "embedding"
    taken = (EMBEDDING_FILE, TRAINING_STATE_FILE)  # a run's own files
    if word.lower() in WINDOWS_RESERVED_NAMES or word + ".safetensors" in taken:
        word += "-embedding"
    return word


def trigger_word_file(token):
    return trigger_word(token) + ".safetensors"


def build_optimizer(trainer):
    """Keras builds an optimizer's variables at its first step; a state saved or
    restored before it needs them now."""
    if not trainer.optimizer.built:
        with trainer.distribute_strategy.scope():
            trainer.optimizer.build([trainer.learned_embedding])


def training_state(trainer):
    """The trainer's whole state, as NumPy arrays by name."""
    build_optimizer(trainer)
    state = {
        "learned_embedding": ops.convert_to_numpy(trainer.learned_embedding),
        "step": ops.convert_to_numpy(trainer.step),
        "seed_generator_state": ops.convert_to_numpy(trainer.seed_generator.state),
    }
    for index, variable in enumerate(trainer.optimizer.variables):
        state[f"optimizer/{index:03d}/{variable.path}"] = ops.convert_to_numpy(variable)
    return state


def restore_training_state(trainer, state):
    optimizer_keys = sorted(key for key in state if key.startswith("optimizer/"))
    build_optimizer(trainer)
    with trainer.distribute_strategy.scope():
        variables = trainer.optimizer.variables
        shapes = [tuple(variable.shape) for variable in variables]
        if shapes != [tuple(state[key].shape) for key in optimizer_keys]:
            raise UserError(
                "The training state does not fit this run's optimizer; resume with the "
                "settings of the run that saved it."
            )
        for variable, key in zip(variables, optimizer_keys):
            variable.assign(state[key])
        trainer.learned_embedding.assign(state["learned_embedding"])
        trainer.write_learned_embedding()
        trainer.step.assign(state["step"])
        trainer.seed_generator.state.assign(state["seed_generator_state"])


def write_training_files(embedding_path, state_path, token, state, metadata, fingerprint):
    """Writes the training state, then the embedding, each all or nothing."""
    try:
        safetensors.numpy.save_file(
            state, state_path + ".partial", metadata={"run": json.dumps(fingerprint)}
        )
        save_embedding(embedding_path + ".partial", token, state["learned_embedding"], metadata)
        os.replace(state_path + ".partial", state_path)
        os.replace(embedding_path + ".partial", embedding_path)
    finally:
        for path in (state_path + ".partial", embedding_path + ".partial"):
            if os.path.exists(path):
                os.remove(path)


def save_training(output_dir, token, trainer, metadata, fingerprint, snapshot=False):
    """Saves the embedding and the training state; with `snapshot`, first also a copy of
    both under the step's name (`snapshot_paths`). The copy under the trigger word's name
    comes next, and the files a resume reads last, so that a save that fails leaves
    those as they were."""
    state = training_state(trainer)
    if snapshot:
        embedding_path, state_path = snapshot_paths(output_dir, int(state["step"]))
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
        write_training_files(embedding_path, state_path, token, state, metadata, fingerprint)
    trigger_path = os.path.join(output_dir, trigger_word_file(token))
    save_embedding(trigger_path, token, state["learned_embedding"], metadata)
    embedding_path = os.path.join(output_dir, EMBEDDING_FILE)
    state_path = os.path.join(output_dir, TRAINING_STATE_FILE)
    write_training_files(embedding_path, state_path, token, state, metadata, fingerprint)


def load_training_state(path, fingerprint):
    """The state saved at `path`, or None if there is none; a state of another run is
    refused."""
    if not os.path.isfile(path):
        return None
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            saved = json.loads((f.metadata() or {})["run"])
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:
        raise UserError(
            f"The training state {path} cannot be read ({error}); delete it to resume "
            "from the embedding alone."
        ) from None
    changed = []
    for key, value in fingerprint.items():
        if key in SCHEDULE_SETTINGS:
            if key in saved and saved[key] != value:
                changed.append(f"{key} {value} (the saved run's: {saved[key]})")
        elif saved.get(key) != value:
            what = (
                f"other {key}"
                if key in ("token", "images and prompts")
                else f"{key} {saved.get(key)}"
            )
            raise UserError(
                f"The training state {path} was saved by a run with {what}, not this "
                f"one's; resume with that run's settings, or delete {path} to resume "
                "from the embedding alone."
            )
    if changed:
        print(
            f"Resuming with {' and '.join(changed)}: the learning rate follows the new "
            "schedule from here on, so the run parts from the one that was saved."
        )
    return state


def resume_state(embedding_path, resumed, fingerprint):
    """The training state saved with the embedding to resume, if there is one; says
    which way the run resumes. A state newer than its embedding is a save stopped
    between its two renames: the state, renamed first, holds the vectors too."""
    state_path = state_path_for(embedding_path)
    state = load_training_state(state_path, fingerprint)
    embedding_step = int(resumed.metadata.get("step", 0))
    state_step = int(state["step"]) if state else None
    if state and state_step > embedding_step:
        print(
            f"The training state {state_path} is of step {state_step}, newer than the "
            f"embedding {embedding_path} (step {embedding_step}): its save was stopped "
            "before it renamed the embedding, so the run resumes from the state."
        )
    elif state and (
        state_step != embedding_step
        or not np.array_equal(state["learned_embedding"], resumed.vectors)
    ):
        print(
            f"The training state {state_path} is of step {state_step}, the embedding "
            f"{embedding_path} of step {embedding_step}: resuming the embedding alone."
        )
        state = None
    if state:
        print(
            f"Resuming step {state_step} with its training state ({state_path}): "
            "the run goes on as if it had not stopped."
        )
    else:
        print(
            f"No training state saved with {embedding_path}: resuming its vectors and "
            f"step ({resumed.metadata.get('step', 0)}); Adam's moments and the random "
            "state of the noise start afresh."
        )
    return state


class SaveEmbedding(keras.callbacks.Callback):
    """Saves the learned embedding and the training state every `every_epochs` epochs,
    every `every_steps` steps, and when training ends; the epochs' saves and the last
    also as snapshots, unless `snapshots` is False."""

    def __init__(
        self, output_dir, token, metadata, fingerprint, every_epochs, every_steps, snapshots=True
    ):
        super().__init__()
        self.output_dir, self.token = output_dir, token
        self.metadata, self.fingerprint = metadata, fingerprint
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.snapshots = snapshots
        self.saved_step = self.snapshot_step = None

    def save(self, snapshot=False):
        step = int(self.model.step.numpy())
        snapshot = snapshot and self.snapshots and step != self.snapshot_step
        if step == self.saved_step and not snapshot:
            return
        metadata = dict(self.metadata, step=step)
        try:
            save_training(
                self.output_dir, self.token, self.model, metadata, self.fingerprint, snapshot
            )
        except (OSError, safetensors.SafetensorError) as error:
            kept = f"step {self.saved_step}" if self.saved_step else "the last save"
            embedding_path = os.path.join(self.output_dir, EMBEDDING_FILE)
            raise UserError(
                f"Saving step {step} into {self.output_dir} failed ({error}); the files of "
                f"{kept} are kept there: make room and continue with --resume "
                f"{embedding_path}."
            ) from None
        self.saved_step = step
        if snapshot:
            self.snapshot_step = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and int(self.model.step.numpy()) % self.every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.save(snapshot=True)

    def on_train_begin(self, logs=None):
        self.save()  # the starting point: a write that fails later can always be resumed

    def on_train_end(self, logs=None):
        self.save(snapshot=True)


"""
A full disk can strike at any write, not only at a save: the loss log, a sample image,
a plot, the final images. `write_failure` is the one sentence for those: what failed,
what is kept (the last save, which such a failure leaves whole), and what to do.
"""


def write_failure(error, output_dir, saved_step, total_steps):
    """The UserError for an OSError while writing outside a save, after `saved_step`."""
    what = error.filename or f"a file in {output_dir}"
    reason = error.strerror or str(error)
    embedding_path = os.path.join(output_dir, EMBEDDING_FILE)
    if saved_step is None:
        return UserError(
            f"Writing {what} failed ({reason}) before training began, so nothing was "
            "learned yet: make room and run the same command again."
        )
    if saved_step >= total_steps:
        return UserError(
            f"Writing {what} failed ({reason}) after training ended; the embedding of its "
            f"last step ({saved_step}) is saved in {embedding_path}: make room and draw "
            f"with it using tools/generate.py --embedding {embedding_path}."
        )
    return UserError(
        f"Writing {what} failed ({reason}); the embedding and training state of step "
        f"{saved_step} are kept in {output_dir}: make room and continue with --resume "
        f"{embedding_path}."
    )


"""
A run never mixes into another: if the output folder already holds one, the script
refuses to start, unless it is resuming the embedding of that very folder.
"""


def prepare_output_dir(output_dir, resume=None):
    old_run_files = [
        name
        for name in (EMBEDDING_FILE, "loss.csv")
        if os.path.exists(os.path.join(output_dir, name))
    ]
    # The run of this folder goes on from its embedding or from one of its snapshots.
    resume_folder = resume and os.path.abspath(os.path.dirname(resume))
    resuming_here = resume and resume_folder in (
        os.path.abspath(output_dir),
        os.path.abspath(os.path.join(output_dir, SNAPSHOTS_DIR)),
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
**What a file records.** The embedding's metadata says how it was made; a state's
fingerprint, what a run that resumes it must not change (the training images and
prompts, the batch, the precision, the number of vectors, the seed, ...).
"""


def embedding_metadata(args, placeholder_token):
    return {
        "token": placeholder_token,
        "initializer_token": args.initializer_token,
        "epochs": args.epochs,
        "resolution": args.resolution,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "base_model": checkpoints.base_model_name(args.base_model),
        "prediction_type": args.prediction_type,
        "random_weights": args.random_weights,
    }


def run_fingerprint(args, sets, precision, placeholder_token, num_vectors):
    data = hashlib.sha256()
    for pairs in sets:
        data.update(str((pairs.images.shape, pairs.token_ids.shape)).encode())
        data.update(np.ascontiguousarray(pairs.images).tobytes())
        data.update(np.ascontiguousarray(pairs.token_ids).tobytes())
    return {
        "token": placeholder_token,
        "images and prompts": data.hexdigest()[:16],
        "--batch-size": args.batch_size,
        "--precision": precision,
        "--num-vectors": num_vectors,
        "--seed": args.seed,
        "--cache-latents": args.cache_latents,
        "--base-model": checkpoints.base_model_name(args.base_model),
        "--prediction-type": args.prediction_type,
        "--random-weights": args.random_weights,
        "--learning-rate": args.learning_rate,
        "--epochs": args.epochs,
    }
