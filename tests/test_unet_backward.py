"""The UNet's backward, computed more cheaply: fast input gradients, attention in query
chunks (two at 64x64, one against the text), lean gated GELUs, group norms, gradient
checkpointing. Each gives KerasCV's outputs and gradients."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import textual_inversion as ti
from conftest import RESOLUTION, python_in_a_process_of_its_own
from textual_inversion_extras import hardware, keras_internals, unet_backward
from textual_inversion_extras.keras_internals import all_sublayers


def gradients(function, *inputs):
    inputs = [tf.constant(value) for value in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        output = function(*inputs)
        loss = weighted_sum(output)
    return output, tape.gradient(loss, inputs)


def weighted_sum(output):
    """A fixed, uneven weighting of the outputs, so that every gradient is tested."""
    weights = tf.reshape(tf.range(tf.size(output), dtype="float32") % 7 - 3, output.shape)
    return tf.reduce_sum(output * weights)


def allocator_peak(function, *inputs):
    """The CPU allocator's peak above where it started, in bytes, while a traced
    `function` runs once (traced first, so that its constants are already allocated)."""
    function(*inputs)
    tf.config.experimental.reset_memory_stats("CPU:0")
    start = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.nest.map_structure(lambda tensor: tensor.numpy(), function(*inputs))
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - start


def in_a_fresh_process(measurement, *arguments):
    """`measurement(*arguments)`, a function of this file that returns a number of bytes,
    run in a new Python process. What the allocator counts as in use depends on what the
    process ran before: one chunked attention peaked at 0.6, 0.8 or 1.0 score matrices,
    after different measurements in the same process. A fresh process measures the code
    alone. TensorFlow counts a CPU's allocations only with its oneDNN allocator, which
    it takes by default only on CPUs with AVX-512 or AMX; on an AVX2-only CPU,
    `TF_ENABLE_ONEDNN_OPTS=1` asks for it, so that every CPU measures the same way."""
    call = f"tests.{measurement.__name__}(*{arguments!r})"
    script = f"import {__name__} as tests; print({call})"
    printed = python_in_a_process_of_its_own(script, {"TF_ENABLE_ONEDNN_OPTS": "1"})
    return int(printed.split()[-1])


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
    output, ours = gradients(unet_backward.CONVOLUTIONS[stride], x, kernel, bias)
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
    output, ours = gradients(unet_backward.dense_with_fast_input_gradient, x, kernel, bias)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)
    for gradient, expected_gradient in zip(ours, expected_gradients):
        assert_close(gradient, expected_gradient)


def test_in_bfloat16_the_fast_input_gradients_are_tensorflows_to_bfloat16s_precision():
    """The UNet's 4x4 level at 128 px under mixed_bfloat16: a 3x3 convolution and a
    dense layer, their input gradients within bfloat16's rounding of TensorFlow's."""
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(1, 6, 6, 32)), "bfloat16")
    kernel = tf.constant(rng.normal(size=(3, 3, 32, 16)) / 17, "bfloat16")
    bias, dense_bias = tf.zeros((16,), "bfloat16"), tf.zeros((24,), "bfloat16")
    tokens = tf.constant(rng.normal(size=(1, 77, 32)), "bfloat16")
    dense_kernel = tf.constant(rng.normal(size=(32, 24)) / 6, "bfloat16")

    def convolve(x):
        return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "VALID"), bias)

    cases = [
        (convolve, lambda x: unet_backward.CONVOLUTIONS[1](x, kernel, bias), x),
        (
            lambda x: tf.tensordot(x, dense_kernel, axes=1),
            lambda x: unet_backward.dense_with_fast_input_gradient(x, dense_kernel, dense_bias),
            tokens,
        ),
    ]
    for reference, fast, inputs in cases:
        _, (expected,) = gradients(lambda x: tf.cast(reference(x), "float32"), inputs)
        _, (ours,) = gradients(lambda x: tf.cast(fast(x), "float32"), inputs)
        assert ours.dtype == tf.bfloat16
        expected, ours = np.float32(expected), np.float32(ours)
        # Both are bfloat16 results, 8 significant bits: at the largest value a unit in
        # the last place (ulp) is 2^-7 of its power of two. A CPU with bfloat16 dot
        # products (AVX-512 BF16, AMX) sums in float32 and rounds once: we measured at
        # most 0.6% of the largest value apart. An AVX2-only CPU converts and rounds on
        # other paths: 2 ulps (1.1%, one value of 1,152, on an AMD EPYC). 4 ulps holds
        # on both; a wrong gradient (a kernel not flipped, a channel crossed) is off by
        # about the largest value itself.
        largest = np.abs(expected).max()
        ulp = 2.0 ** (np.floor(np.log2(largest)) - 7)
        np.testing.assert_allclose(ours, expected, atol=4 * ulp, rtol=0)
        assert np.linalg.norm(ours - expected) < 1e-2 * np.linalg.norm(expected)


@contextlib.contextmanager
def swapped_layers(model, use):
    """Within it, `use(model)` has swapped the classes of model's layers; yields how many."""
    original_classes = {id(layer): layer.__class__ for layer in all_sublayers(model)}
    try:
        yield use(model)
    finally:
        for layer in all_sublayers(model):
            layer.__class__ = original_classes[id(layer)]


def unet_prediction_and_context_gradient(unet):
    rng = np.random.default_rng(2)
    latents = tf.constant(rng.normal(size=(1, RESOLUTION // 8, RESOLUTION // 8, 4)), "float32")
    timestep_embedding = ti.get_timestep_embedding(tf.constant([500]))
    context = rng.normal(size=(1, ti.MAX_PROMPT_LENGTH, 768)).astype("float32")

    def predict(context):
        return unet([latents, timestep_embedding, context])

    prediction, (gradient,) = gradients(predict, context)
    return prediction, gradient


@pytest.fixture(scope="module")
def keras_cv_unet(loaded_stable_diffusion):
    """KerasCV's UNet at 128 px, and its prediction and context gradient."""
    unet = loaded_stable_diffusion.diffusion_model
    return unet, unet_prediction_and_context_gradient(unet)


@pytest.mark.parametrize(
    "shape, spread, mean",
    [
        ((2, 6, 5, 64), 3.0, 5.0),  # pixels, 32 groups of 2 channels, a mean far from 0
        ((2, 40, 96), 1e-3, 0.0),  # tokens, groups of 3, a variance below epsilon
        # A batch of one, which takes oneDNN's fused kernels.
        ((1, 6, 5, 64), 3.0, 5.0),
        ((1, 40, 96), 1e-3, 0.0),
        ((1, 3, 1, 32), 1.0, 0.0),  # three pixels, one channel a group
        ((1, 1, 1, 256), 1.0, 0.0),  # one pixel: each channel's variance is 0
    ],
)
def test_group_normalization_has_keras_output_and_gradients(shape, spread, mean):
    rng = np.random.default_rng(4)
    layer = keras.layers.GroupNormalization(epsilon=1e-5)
    layer.build(shape)
    layer.set_weights([rng.normal(size=shape[-1]) + 1, rng.normal(size=shape[-1])])
    x = (spread * rng.normal(size=shape) + mean).astype("float32")

    def reference(x, gamma, beta):
        return layer(x)

    def ours(x, gamma, beta):
        return unet_backward.group_normalization(x, gamma, beta, layer.groups, layer.epsilon)

    weights = [w.astype("float32") for w in layer.get_weights()]
    expected, expected_gradients = gradients(reference, x, *weights)
    output, our_gradients = gradients(ours, x, *weights)
    assert_close(output, expected)
    # Keras's layer reads its own variables, not the inputs: its input gradient only.
    assert_close(our_gradients[0], expected_gradients[0])
    layer_weight_gradients = weight_gradients(layer, x)
    for gradient, expected_gradient in zip(our_gradients[1:], layer_weight_gradients):
        assert_close(gradient, expected_gradient)


def test_group_normalization_in_bfloat16_returns_bfloat16_and_its_gradients_dtypes():
    """Under mixed_bfloat16 the frozen layers hold bfloat16 weights and see bfloat16."""
    x = tf.constant(np.random.default_rng(5).normal(size=(1, 4, 4, 64)), "bfloat16")
    gamma, beta = tf.ones((64,), "bfloat16"), tf.zeros((64,), "float32")
    _, gradients_of_inputs = gradients(
        lambda x, gamma, beta: tf.cast(
            unet_backward.group_normalization(x, gamma, beta, 32, 1e-5), "float32"
        ),
        x, gamma, beta,
    )  # fmt: skip
    # As Keras's layer: the output in the layer's compute dtype, whatever the input's.
    layer = unet_backward.FastGroupNormalization(dtype="bfloat16")
    assert layer(tf.cast(x, "float32")).dtype == "bfloat16"
    assert [g.dtype for g in gradients_of_inputs] == [tf.bfloat16, tf.bfloat16, tf.float32]


def weight_gradients(layer, x):
    with tf.GradientTape() as tape:
        loss = weighted_sum(layer(tf.constant(x)))
    return tape.gradient(loss, [layer.gamma, layer.beta])


# Every Conv2D and Dense layer of the UNet; its 16 transformer blocks' self- and
# cross-attention; its 22 ResBlocks and 16 SpatialTransformers.
SWAPS = {
    "fast input gradients": (unet_backward.use_fast_input_gradients, lambda n: n > 250),
    "attention in chunks": (unet_backward.use_attention_in_chunks, lambda n: n == 32),
    "lean gated GELU": (unet_backward.use_lean_geglu, lambda n: n == 16),
    "gradient checkpointing": (unet_backward.use_gradient_checkpointing, lambda n: n == 22 + 16),
    # Two in each ResBlock, one in each SpatialTransformer, and the last.
    "group normalization": (
        unet_backward.use_fast_group_normalization, lambda n: n == 2 * 22 + 16 + 1
    ),
}


@pytest.mark.parametrize("swap", SWAPS)
def test_with_each_swap_the_unet_gives_keras_cvs_prediction_and_context_gradient(
    swap, keras_cv_unet
):
    use, expected_count = SWAPS[swap]
    unet, (expected, expected_gradient) = keras_cv_unet
    with swapped_layers(unet, use) as swapped:
        prediction, gradient = unet_prediction_and_context_gradient(unet)
    assert expected_count(swapped), swapped
    assert_close(prediction, expected)
    assert_close(gradient, expected_gradient)


# --- Attention in query chunks ------------------------------------------------------------


def test_attention_in_chunks_of_a_64x64_image_gives_keras_cvs_output_and_gradients():
    """One self-attention of the UNet's 64x64 level at 512 px (4096 tokens, 8 heads of
    40), in 2 chunks of 2048 queries, and one cross-attention to the text, in one."""
    attention_class, *_ = keras_internals.keras_cv_unet_classes()
    rng = np.random.default_rng(3)
    pixels = rng.normal(size=(1, 64 * 64, 320)).astype("float32")
    text = rng.normal(size=(1, ti.MAX_PROMPT_LENGTH, 768)).astype("float32")
    for context in (None, text):
        layer = attention_class(num_heads=8, head_size=40)
        inputs = (pixels,) if context is None else (pixels, context)

        def attend(pixels, context=None):
            return layer(pixels, context=context)

        expected, expected_gradients = gradients(attend, *inputs)
        layer.__class__ = unet_backward.ChunkedCrossAttention
        try:
            output, ours = gradients(attend, *inputs)
        finally:
            layer.__class__ = attention_class
        assert_close(output, expected)
        for gradient, expected_gradient in zip(ours, expected_gradients):
            assert_close(gradient, expected_gradient)


def test_attention_in_chunks_is_the_softmax_attention_for_chunks_that_split_the_queries_unevenly():
    rng = np.random.default_rng(4)
    query, key, value = (rng.normal(size=(2, 3, n, 4)).astype("float32") for n in (10, 7, 7))

    def reference(query, key, value):
        weights = tf.nn.softmax(tf.matmul(query, key, transpose_b=True) * 0.5)
        return tf.matmul(weights, value)

    def in_chunks_of_3(query, key, value):
        return unet_backward.attention_in_query_chunks(query, key, value, 0.5, chunk=3)

    expected, expected_gradients = gradients(reference, query, key, value)
    output, ours = gradients(in_chunks_of_3, query, key, value)
    assert_close(output, expected)
    for gradient, expected_gradient in zip(ours, expected_gradients):
        assert_close(gradient, expected_gradient)


def test_the_backward_recomputes_the_softmax_of_every_chunk_but_the_first():
    """In 3 chunks, the traced forward and backward hold 5 softmaxes: the forward's 3,
    and the backward's recomputes of the second and third chunks' weights."""
    query, key, value = (tf.ones((1, 2, n, 4)) for n in (9, 5, 5))

    @tf.function
    def forward_and_backward(query, key, value):
        with tf.GradientTape() as tape:
            tape.watch([query, key, value])
            output = unet_backward.attention_in_query_chunks(query, key, value, 0.5, chunk=3)
        return tape.gradient(output, [query, key, value])

    graph = forward_and_backward.get_concrete_function(query, key, value).graph
    softmaxes = [op for op in graph.get_operations() if op.type == "Softmax"]
    assert len(softmaxes) == 3 + 2


def test_a_64x64_self_attention_takes_two_chunks_and_a_cross_attention_to_the_text_one():
    assert unet_backward.queries_per_chunk(64 * 64) == 64 * 64 // 2
    assert unet_backward.queries_per_chunk(ti.MAX_PROMPT_LENGTH) >= 64 * 64


def test_with_gradient_checkpointing_the_attention_chunks_are_half_the_size(keras_cv_unet):
    unet, _ = keras_cv_unet

    def speed_up_with_checkpointing(unet):
        unet_backward.speed_up_unet_backward(unet, "float32", False, gradient_checkpointing=True)
        chunked = unet_backward.ChunkedCrossAttention
        return {layer.chunk_scores for layer in all_sublayers(unet) if type(layer) is chunked}

    with swapped_layers(unet, speed_up_with_checkpointing) as chunk_scores:
        assert chunk_scores == {unet_backward.ATTENTION_CHUNK_SCORES // 2}


def peak_of_a_64x64_self_attention(chunk):
    """The allocator's peak, in bytes, in a 64x64 self-attention's forward and backward
    (4096 queries, 8 heads of 40) in chunks of `chunk` queries (None: the default)."""
    rng = np.random.default_rng(5)
    query, key, value, upstream = (
        tf.constant(rng.normal(size=(1, 8, 4096, 40)).astype("float32")) for _ in range(4)
    )

    @tf.function
    def forward_and_backward(query, key, value):
        with tf.GradientTape() as tape:
            tape.watch([query, key, value])
            output = unet_backward.attention_in_query_chunks(
                query, key, value, 40**-0.5, chunk=chunk
            )
        return tape.gradient(output, [query, key, value], output_gradients=upstream)

    return allocator_peak(forward_and_backward, query, key, value)


def test_attention_in_its_chunks_peaks_below_three_fifths_of_attention_in_one_chunk():
    """In its chunks of 2048 queries, one after another, the allocator's peak stays below
    3/5 of the peak with the whole 4096 x 4096 score matrix in one chunk (we measured
    572 MB and 1,101 MB)."""
    in_chunks = in_a_fresh_process(peak_of_a_64x64_self_attention, None)
    in_one_chunk = in_a_fresh_process(peak_of_a_64x64_self_attention, 4096)
    assert in_chunks < 3 / 5 * in_one_chunk


# --- The gated GELU -----------------------------------------------------------------------


def keras_cv_geglu_and_lean_copy(width, dtype):
    geglu_class = keras_internals.keras_cv_unet_classes()[3]
    with hardware.global_dtype_policy(dtype):  # as the script builds the UNet
        layer, lean = geglu_class(width), unet_backward.LeanGEGLU(width)
        for geglu in (layer, lean):
            geglu(np.zeros((1, 1, 3 * width), "float32"))  # builds its Dense
    rng = np.random.default_rng(6)
    # Gates from -6 to 6: GELU's flat tail, its bend, and its straight side.
    kernel = rng.normal(size=(3 * width, 2 * width)) * 2 / np.sqrt(3 * width)
    weights = [kernel, rng.normal(size=2 * width)]
    layer.set_weights(weights)
    lean.set_weights(weights)
    return layer, lean


def test_the_lean_gated_gelu_gives_keras_cvs_output_and_input_gradient():
    layer, lean = keras_cv_geglu_and_lean_copy(48, "float32")
    inputs = np.random.default_rng(7).normal(size=(2, 30, 3 * 48)).astype("float32")
    expected, (expected_gradient,) = gradients(layer, inputs)
    output, (gradient,) = gradients(lean, inputs)
    np.testing.assert_array_equal(output, expected)  # the same operations, in order
    assert_close(gradient, expected_gradient)


def test_the_lean_gated_gelu_in_bfloat16_gives_keras_cvs_output_bit_for_bit():
    """Under mixed_bfloat16 every operation rounds to bfloat16: the forward does KerasCV's
    operations in KerasCV's order, so it rounds alike."""
    layer, lean = keras_cv_geglu_and_lean_copy(48, "mixed_bfloat16")
    inputs = np.random.default_rng(8).normal(size=(2, 30, 3 * 48)).astype("float32")
    expected, ours = layer(inputs), lean(inputs)
    assert ours.dtype == expected.dtype == tf.bfloat16
    np.testing.assert_array_equal(np.float32(ours), np.float32(expected))


def test_the_lean_gated_gelu_in_bfloat16_has_a_gradient_as_close_to_float32s_as_keras_cvs():
    """Its backward computes in bfloat16, as autodiff does for KerasCV's layer: each lands
    about 0.55% (in norm) from the float32 gradient, neither much further than the other."""
    float32_layer, _ = keras_cv_geglu_and_lean_copy(48, "float32")
    layer, lean = keras_cv_geglu_and_lean_copy(48, "mixed_bfloat16")
    inputs = np.random.default_rng(8).normal(size=(2, 30, 3 * 48)).astype("float32")
    _, (float32_gradient,) = gradients(float32_layer, inputs)

    def distance_from_float32(geglu):
        _, (gradient,) = gradients(lambda x: tf.cast(geglu(x), "float32"), inputs)
        return np.linalg.norm(gradient - float32_gradient) / np.linalg.norm(float32_gradient)

    assert distance_from_float32(lean) < 1.25 * distance_from_float32(layer) < 1e-2


def peak_of_four_64x64_feed_forwards(lean):
    """The allocator's peak, in bytes, in four feed-forwards of a 64x64 block at 512 px,
    chained, forward and backward in bfloat16: KerasCV's gated GELUs or (lean) ours."""
    with hardware.global_dtype_policy("mixed_bfloat16"):
        layers = [keras_internals.keras_cv_unet_classes()[3](1280) for _ in range(4)]
    if lean:
        for layer in layers:
            layer.__class__ = unet_backward.LeanGEGLU
    inputs = tf.constant(np.random.default_rng(9).normal(size=(1, 4096, 1280)), "float32")

    @tf.function
    def forward_and_backward(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = inputs
            for layer in layers:
                outputs = layer(outputs)
        return tape.gradient(outputs, inputs)

    return allocator_peak(forward_and_backward, inputs)


def test_the_lean_gated_gelu_lowers_the_peak_of_four_64x64_feed_forwards_by_a_quarter():
    """We measured 193 MB at the peak for ours, 329 MB for KerasCV's (0.59) on an AMD
    EPYC with AVX-512 BF16; 258 MB and 366 MB (0.71) on an AVX2-only one, whose
    bfloat16 kernels hold float32 copies of what they compute. Without the lean GELU
    the two are the same code: a ratio of 1."""
    keras_cv_peak = in_a_fresh_process(peak_of_four_64x64_feed_forwards, False)
    assert in_a_fresh_process(peak_of_four_64x64_feed_forwards, True) < 3 / 4 * keras_cv_peak