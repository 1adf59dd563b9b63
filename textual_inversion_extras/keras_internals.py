"""Every private attribute of Keras and KerasCV that the project relies on, in one place.

Each was checked on Keras 3.15 and KerasCV 0.9 (and Keras 3.10 for the older Colab
stack); `tests/test_keras_internals.py` fails with a clear message if an installed
version lacks one of them.
"""


def all_sublayers(model):
    """Every layer inside `model`, nested ones included (Keras's `_flatten_layers`)."""
    return list(model._flatten_layers(include_self=False))


def keras_cv_unet_classes():
    """KerasCV's UNet layer classes, which keras_cv does not export:
    (CrossAttention, ResBlock, SpatialTransformer, GEGLU)."""
    from keras_cv.src.models.stable_diffusion import diffusion_model

    return (
        diffusion_model.CrossAttention,
        diffusion_model.ResBlock,
        diffusion_model.SpatialTransformer,
        diffusion_model.GEGLU,
    )


def output_layer(model):
    """The layer that makes a functional model's (first) output."""
    return model.outputs[0]._keras_history.operation


def input_layer(layer, index):
    """The layer that made input number `index` of `layer`'s first call in a
    functional model."""
    return layer._inbound_nodes[0].input_tensors[index]._keras_history.operation


def forget_distribution_strategy(model):
    """Makes `model` predict as a plain model, outside the `tf.distribute` strategy it
    was built in (Keras's record of that strategy, `_distribute_strategy`)."""
    model._distribute_strategy = None


def set_part(stable_diffusion, part, model):
    """Puts `model` in the place of one of KerasCV StableDiffusion's parts, which it
    keeps in private attributes (`_tokenizer`, `_text_encoder`, `_image_encoder`,
    `_diffusion_model`, `_decoder`) and builds on first use when they are None."""
    setattr(stable_diffusion, f"_{part}", model)
