"""--gradient-accumulation-steps: micro-batches, one after the other, make one update."""

import functools

import numpy as np
import pytest

import textual_inversion as ti

# Measured: the losses agree exactly, the vectors within 4e-7: the same examples with
# the same noise, their gradients summed in another order. A micro-batch that drew
# the wrong noise, or an update from one micro-batch alone, moves the vector by about
# the learning rate (1e-2).
TOLERANCE = 1e-4


def one_update(concept, images, token_ids, trainer_class):
    stable_diffusion = concept["stable_diffusion"]
    layer = ti.get_embedding_layer(stable_diffusion.text_encoder).token_embedding
    matrix_before = layer.get_weights()[0]
    try:
        trainer = ti.build_trainer(
            stable_diffusion, [concept["placeholder_token_id"]], learning_rate=1e-2, seed=3,
            trainer_class=trainer_class,
        )  # fmt: skip
        logs = trainer.train_on_batch(images, token_ids, return_dict=True)
        return (
            float(logs["step_loss"]),
            trainer.learned_embedding.numpy(),
            int(trainer.step.numpy()),
        )
    finally:
        layer.set_weights([matrix_before])  # the shared models as they were


def test_two_accumulated_micro_batches_of_one_take_the_update_of_one_batch_of_two(concept):
    images = concept["images"][:2].astype("float32")
    token_ids = np.stack(
        [
            ti.encode_prompt(concept["tokenizer"], "a photo of a <my-funny-cat-token>"),
            ti.encode_prompt(concept["tokenizer"], "a rendering of a <my-funny-cat-token>"),
        ]
    )
    initial = ti.token_rows(
        concept["stable_diffusion"].text_encoder, [concept["placeholder_token_id"]]
    )
    batch_loss, batch_vector, batch_steps = one_update(
        concept, images, token_ids, ti.StableDiffusionFineTuner
    )
    accumulating = functools.partial(ti.AccumulatingFineTuner, accumulation_steps=2)
    loss, vector, steps = one_update(concept, images, token_ids, accumulating)

    assert steps == batch_steps == 1  # one update, one step
    np.testing.assert_allclose(loss, batch_loss, rtol=TOLERANCE)
    np.testing.assert_allclose(vector, batch_vector, atol=TOLERANCE, rtol=0)
    # The update is real: the vector moved by about the learning rate.
    assert np.abs(vector - initial).max() > 5e-3


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--batch-size", "3", "--gradient-accumulation-steps", "2"], "equal micro-batches"),
        (
            ["--gradient-accumulation-steps", "2", "--batch-size", "2", "--distribute"],
            "--distribute",
        ),
        (["--gradient-accumulation-steps", "0"], "1 or more"),
    ],
)
def test_accumulation_that_cannot_split_the_batch_is_refused(flags, match):
    with pytest.raises(ti.UserError, match=match):
        ti.parse_args(flags)
