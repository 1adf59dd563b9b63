"""Saving: the learned embedding (the file other tools load), the training state beside
it, and the output folder a run writes into. Every file is written whole or not at all."""

import hashlib
import json
import os
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
tensor, `{placeholder_token: float32 [num_vectors, 768]}`. That is the layout diffusers'
`load_textual_inversion`, AUTOMATIC1111 and ComfyUI read for Stable Diffusion 1.x
models, which all share this CLIP ViT-L/14 text encoder. The file's metadata header
records how it was made. `--resume` goes on training from such a file.
"""

EMBEDDING_FILE = "learned_embeds.safetensors"
EMBEDDING_WIDTH = 768  # CLIP ViT-L/14, the text encoder of Stable Diffusion 1.x


class LearnedEmbedding(NamedTuple):
    token: str
    vectors: np.ndarray  # float32 [num_vectors, 768]
    metadata: dict


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
vectors, the seed, ...).
"""

TRAINING_STATE_FILE = "training_state.safetensors"
SAVE_EVERY_STEPS = 10


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


def save_training(output_dir, token, trainer, metadata, fingerprint):
    """Writes the training state, then the embedding, each all or nothing."""
    state_path = os.path.join(output_dir, TRAINING_STATE_FILE)
    embedding_path = os.path.join(output_dir, EMBEDDING_FILE)
    state = training_state(trainer)
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
    for key, value in fingerprint.items():
        if saved.get(key) != value:
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
    return state


def resume_state(embedding_path, resumed, fingerprint):
    """The training state saved beside the embedding to resume, if there is one; says
    which way the run resumes."""
    state_path = os.path.join(os.path.dirname(embedding_path), TRAINING_STATE_FILE)
    state = load_training_state(state_path, fingerprint)
    embedding_step = int(resumed.metadata.get("step", 0))
    if state and (
        int(state["step"]) != embedding_step
        or not np.array_equal(state["learned_embedding"], resumed.vectors)
    ):
        print(
            f"The training state {state_path} is of step {int(state['step'])}, the embedding "
            f"{embedding_path} of step {embedding_step}: resuming the embedding alone."
        )
        state = None
    if state:
        print(
            f"Resuming step {int(state['step'])} with its training state ({state_path}): "
            "the run goes on as if it had not stopped."
        )
    else:
        print(
            f"No {TRAINING_STATE_FILE} beside {embedding_path}: resuming its vectors and "
            f"step ({resumed.metadata.get('step', 0)}); Adam's moments and the random "
            "state of the noise start afresh."
        )
    return state


class SaveEmbedding(keras.callbacks.Callback):
    """Saves the learned embedding and the training state every `every_epochs` epochs,
    every `every_steps` steps, and when training ends."""

    def __init__(self, output_dir, token, metadata, fingerprint, every_epochs, every_steps):
        super().__init__()
        self.output_dir, self.token = output_dir, token
        self.metadata, self.fingerprint = metadata, fingerprint
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.saved_step = None

    def save(self):
        step = int(self.model.step.numpy())
        if step == self.saved_step:
            return
        metadata = dict(self.metadata, step=step)
        try:
            save_training(self.output_dir, self.token, self.model, metadata, self.fingerprint)
        except (OSError, safetensors.SafetensorError) as error:
            kept = f"step {self.saved_step}" if self.saved_step else "the last save"
            embedding_path = os.path.join(self.output_dir, EMBEDDING_FILE)
            raise UserError(
                f"Saving step {step} into {self.output_dir} failed ({error}); the files of "
                f"{kept} are kept there: make room and continue with --resume "
                f"{embedding_path}."
            ) from None
        self.saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and int(self.model.step.numpy()) % self.every_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.save()

    def on_train_end(self, logs=None):
        self.save()


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
    resuming_here = resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(
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
        "--random-weights": args.random_weights,
    }
