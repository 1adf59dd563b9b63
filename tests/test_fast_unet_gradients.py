"""The UNet's fast input gradients: TensorFlow's forward, the same gradients, cheaper."""

import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from conftest import RESOLUTION


def gradients(function, *inputs):
    inputs = [tf.constant(value) for value in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        output = function(*inputs)
        # A fixed, uneven weighting of the outputs, so that every gradient is tested.
        weights = tf.reshape(tf.range(tf.size(output), dtype="float32") % 7 - 3, output.shape)
        loss = tf.reduce_sum(output * weights)
    return output, tape.gradient(loss, inputs)


def assert_close(ours, reference):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize(
    "size, kernel_size, stride, in_channels, out_channels",
    [
        (5, 3, 1, 4, 6),  # rows 9: the matmul and col2im path
        (7, 3, 2, 3, 5),  # stride 2 on an odd size: the zero-interleaved taps
        (4, 1, 1, 8, 2),  # a 1x1 convolution
        (20, 3, 1, 2, 3),  # rows 324, over FAST_GRADIENT_ROWS: TensorFlow's own kernel
    ],
)
def test_a_convolution_has_tensorflows_output_and_gradients(
    size, kernel_size, stride, in_channels, out_channels
):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, size, size, in_channels)).astype("float32")
    kernel = rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)).astype(
        "float32"
    )
    bias = rng.normal(size=(out_channels,)).astype("float32")

    def reference(x, kernel, bias):
        return tf.nn.bias_add(tf.nn.conv2d(x, kernel, stride, "VALID"), bias)

    expected, expected_gradients = gradients(reference, x, kernel, bias)
    output, ours = gradients(ti.CONVOLUTIONS[stride], x, kernel, bias)
    np.testing.assert_array_equal(output, expected)
    for gradient, expected_gradient in zip(ours, expected_gradients):
        assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("shape", [(6, 16), (2, 7, 16), (1, 200, 16)])
def test_a_dense_layer_has_tensorflows_output_and_gradients(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(16, 24)).astype("float32")
    bias = rng.normal(size=(24,)).astype("float32")

    def reference(x, kernel, bias):
        return tf.tensordot(x, kernel, axes=1) + bias

    expected, expected_gradients = gradients(reference, x, kernel, bias)
    output, ours = gradients(ti.dense_with_fast_input_gradient, x, kernel, bias)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)
    for gradient, expected_gradient in zip(ours, expected_gradients):
        assert_close(gradient, expected_gradient)


def test_the_unet_gives_keras_cvs_noise_prediction_and_context_gradient(concept):
    unet = concept["stable_diffusion"].diffusion_model
    rng = np.random.default_rng(2)
    latents = tf.constant(rng.normal(size=(1, RESOLUTION // 8, RESOLUTION // 8, 4)), "float32")
    timestep_embedding = ti.get_timestep_embedding(tf.constant([500]))
    context = rng.normal(size=(1, ti.MAX_PROMPT_LENGTH, 768)).astype("float32")

    def predict(context):
        return unet([latents, timestep_embedding, context])

    expected, (expected_gradient,) = gradients(predict, context)
    original_classes = {id(layer): layer.__class__ for layer in unet._flatten_layers()}
    try:
        swapped = ti.use_fast_input_gradients(unet)
        prediction, (gradient,) = gradients(predict, context)
    finally:
        for layer in unet._flatten_layers():
            layer.__class__ = original_classes[id(layer)]
    assert swapped > 250  # every Conv2D and Dense of the UNet
    assert_close(prediction, expected)
    assert_close(gradient, expected_gradient)
