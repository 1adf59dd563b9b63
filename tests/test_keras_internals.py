"""The private Keras and KerasCV attributes the project relies on exist in the installed
versions (textual_inversion_extras/keras_internals.py names them all)."""

import keras
import keras_cv

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
    ], (
        f"keras-cv {keras_cv.__version__} moved its UNet layers; "
        "textual_inversion_extras/keras_internals.py needs their new place."
    )
    attention = classes[0](num_heads=2, head_size=4)
    for attribute in ("to_q", "to_k", "to_v", "out_proj", "num_heads", "head_size", "scale"):
        assert hasattr(attention, attribute), f"keras-cv's CrossAttention has no {attribute}"
