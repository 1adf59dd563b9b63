"""The private Keras and KerasCV attributes the project relies on exist in the installed
versions (textual_inversion_extras/keras_internals.py names them all)."""

import keras
import keras_cv

from conftest import python_in_a_process_of_its_own
from textual_inversion_extras import keras_internals


def test_keras_lists_the_layers_nested_inside_a_model():
    inner = keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(2)])
    outer = keras.Sequential([keras.layers.Input((3,)), inner, keras.layers.Dense(1)])
    layers = keras_internals.all_sublayers(outer)
    assert inner in layers and inner.layers[0] in layers, (
        f"Keras {keras.__version__} no longer lists nested layers with _flatten_layers; "
        "textual_inversion_extras/keras_internals.py needs another way."
    )


def test_keras_cv_has_the_unet_layer_classes_the_backward_swaps():
    classes = keras_internals.keras_cv_unet_classes()
    assert [cls.__name__ for cls in classes] == [
        "CrossAttention",
        "ResBlock",
        "SpatialTransformer",
        "GEGLU",
    ], (
        f"keras-cv {keras_cv.__version__} moved its UNet layers; "
        "textual_inversion_extras/keras_internals.py needs their new place."
    )
    attention = classes[0](num_heads=2, head_size=4)
    for attribute in ("to_q", "to_k", "to_v", "out_proj", "num_heads", "head_size", "scale"):
        assert hasattr(attention, attribute), f"keras-cv's CrossAttention has no {attribute}"
    geglu = classes[3](output_dim=4)
    for attribute in ("dense", "output_dim"):
        assert hasattr(geglu, attribute), f"keras-cv's GEGLU has no {attribute}"


def test_keras_records_which_layer_feeds_which_in_a_functional_model():
    inputs = keras.layers.Input((3,))
    first = keras.layers.Dense(2, name="first")
    second = keras.layers.Dense(1, name="second")
    model = keras.Model(inputs, second(first(inputs)))
    assert keras_internals.output_layer(model) is second, (
        f"Keras {keras.__version__} keeps no _keras_history on a model's outputs; "
        "textual_inversion_extras/keras_internals.py needs another way."
    )
    assert keras_internals.input_layer(second, 0) is first, (
        f"Keras {keras.__version__} keeps no _inbound_nodes on its layers; "
        "textual_inversion_extras/keras_internals.py needs another way."
    )


def test_keras_cv_keeps_the_parts_of_stable_diffusion_where_set_part_puts_them():
    stable_diffusion = keras_cv.models.StableDiffusion(img_height=128, img_width=128)
    decoder = keras.Sequential([keras.layers.Input((16, 16, 4))])
    keras_internals.set_part(stable_diffusion, "decoder", decoder)
    assert stable_diffusion.decoder is decoder, (
        f"keras-cv {keras_cv.__version__} keeps StableDiffusion's parts elsewhere; "
        "textual_inversion_extras/keras_internals.py needs their new place."
    )


FORGETTING_THE_STRATEGY = """
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from textual_inversion_extras import keras_internals

with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    kept, forgetting = [keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(2)])
                        for _ in range(2)]
keras_internals.forget_distribution_strategy(forgetting)  # before its first prediction
batch = np.ones((4, 3), "float32")
answer = forgetting.predict_on_batch(batch)
print(len(kept.predict_on_batch(batch)), len(answer), float(np.abs(answer - forgetting(batch)).max()))
"""


def test_keras_lets_a_model_built_under_two_replicas_predict_one_batch_again():
    """In a process of its own, as the CPU is split in two before TensorFlow starts:
    under the strategy a model answers once per replica; one that forgot it, once."""
    before, after, difference = python_in_a_process_of_its_own(FORGETTING_THE_STRATEGY).split()
    assert (int(before), int(after), float(difference)) == (8, 4, 0.0), (
        f"Keras {keras.__version__} no longer keeps a model's strategy in _distribute_strategy; "
        "textual_inversion_extras/keras_internals.py needs another way."
    )
