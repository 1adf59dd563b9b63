"""Run control: how long a run is, and how it stops (Ctrl-C, SIGTERM, a non-finite loss)
without losing what it learned."""

import contextlib
import math
import signal

import keras
import numpy as np

from textual_inversion_extras.errors import UserError
from textual_inversion_extras.saving import restore_training_state, training_state

"""
**How long a run is.** A run has `--epochs` epochs of steps, or `--max-train-steps`
steps in all if that is fewer; a step is one batch. A resumed run goes on from the step
its embedding reached, and stops at the same total; the cosine decay runs over
`--epochs`, so a larger `--epochs` stretches the rest of it.
"""


def planned_steps(steps_per_epoch, epochs, max_train_steps=None, initial_step=0):
    total_steps = steps_per_epoch * epochs
    if max_train_steps:
        total_steps = min(total_steps, max_train_steps)
    if initial_step >= total_steps:
        raise UserError(
            f"The embedding to resume already has {initial_step} steps, the whole "
            f"run ({total_steps}); raise --epochs or --max-train-steps to go on."
        )
    return total_steps


def continue_from_step(trainer, step):
    trainer.step.assign(step)
    trainer.optimizer.iterations.assign(step)  # the learning rate's place in its schedule


class StopAfterSteps(keras.callbacks.Callback):
    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.step.numpy()) >= self.max_steps:
            self.model.stop_training = True


"""
**Interruptions.** Ctrl-C or SIGTERM ends training after the current step, and the
embedding reached so far is saved as at any end of training; a second Ctrl-C stops at
once. A loss (or vector) that stops being finite ends training too, and the last good
state, not the broken one, is put back and saved.
"""


@contextlib.contextmanager
def stop_training_on_signals(trainer):
    """Within it, SIGINT and SIGTERM stop `trainer` after its current step; yields
    the list of the signals received."""
    received = []

    def stop_after_this_step(signal_number, frame):
        if received:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        received.append(signal.Signals(signal_number).name)
        print(f"\n{received[0]}: stopping after this step to save the embedding.")
        trainer.stop_training = True

    previous_handlers = {
        sig: signal.signal(sig, stop_after_this_step) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


class StopAfterSignal(keras.callbacks.Callback):
    """Keras clears `stop_training` when a `fit` begins: a signal that came just before
    still stops training, after the next step."""

    def __init__(self, signals_received):
        super().__init__()
        self.signals_received = signals_received

    def on_train_batch_end(self, batch, logs=None):
        if self.signals_received:
            self.model.stop_training = True


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.failed_step = None
        self.remember_good_state()

    def remember_good_state(self):
        self.good_state = training_state(self.model)  # a few small arrays
        self.good_step = int(self.good_state["step"])

    def on_train_batch_end(self, batch, logs=None):
        vector = self.model.learned_embedding.numpy()
        if math.isfinite(float(logs["step_loss"])) and np.isfinite(vector).all():
            self.remember_good_state()
            return
        self.failed_step = int(self.model.step.numpy())
        restore_training_state(self.model, self.good_state)
        self.model.stop_training = True


"""
**Resuming within an epoch.** Keras's epochs all have one length, so a run resumed
within an epoch first finishes that epoch in a `fit` of its own, then goes on.
"""


def train_from_step(trainer, steps_from, epoch_steps, epochs, first_step, callbacks):
    """Trains from `first_step` to the end of the last epoch, or until a callback stops
    training; `steps_from(step)` is the dataset from that step on, already shuffled."""
    epoch, steps_into_epoch = divmod(first_step, epoch_steps)

    def fit(dataset, steps, last_epoch):
        # verbose=0: watching.StepProgressBar shows the progress.
        trainer.fit(
            dataset, epochs=last_epoch, steps_per_epoch=steps, initial_epoch=epoch,
            callbacks=callbacks, shuffle=False, verbose=0,
        )  # fmt: skip

    if steps_into_epoch:
        fit(steps_from(first_step), epoch_steps - steps_into_epoch, epoch + 1)
        epoch += 1
    if not trainer.stop_training and epoch < epochs:
        fit(steps_from(epoch * epoch_steps), epoch_steps, epochs)
