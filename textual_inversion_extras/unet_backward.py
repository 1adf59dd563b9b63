"""The UNet's backward: what textual inversion computes most, made cheaper.

Textual inversion needs the gradient of the loss with respect to the text context only,
back through the frozen UNet. Five things here change how a step is computed, never
what it computes (each is tested against KerasCV's own layers):

- fast input gradients for the Conv2D and Dense layers that see few pixels (CPU);
- attention in query chunks, which never holds a whole attention matrix;
- a gated GELU whose backward keeps one tensor, not every intermediate;
- group normalization with its statistics per channel first, in the VAE and the UNet;
- gradient checkpointing of the UNet's blocks (`--gradient-checkpointing`).

Each swaps the class of KerasCV's layers in place, keeping their weights, before the
train step is traced. One more swap changes what is computed, in float32 where float16
would overflow: SD 2.x's attention under a float16 policy (`use_float32_attention`).
"""

import math

import keras
import tensorflow as tf
from keras import ops

from textual_inversion_extras.hardware import BFLOAT16_CPU_FLAGS, cpu_flags
from textual_inversion_extras.keras_internals import all_sublayers, keras_cv_unet_classes

"""
**The UNet's backward.** Textual inversion needs the gradient of the loss with respect
to the text context only: back through every UNet layer that follows a cross-attention,
input gradients all the way, and no weight gradients (TensorFlow prunes those). Yet on
a CPU, in float32, most of the UNet's backward goes to `Conv2DBackpropInput` and to the
transposed `MatMul`s of the Dense layers' input gradients (`benchmarks/train_step.py`
breaks a step down; its `--no-fast-gradients` times the step without what follows).
TensorFlow's CPU kernels for these are slow when a layer sees few pixels or tokens,
the UNet's 4x4 and 2x2 levels at 128 px (and its 8x8 level at 512 px). The
same numbers come from a plain matmul with the kernel on the left and, for a
convolution, a sum of the kernel taps' shifted slices ("col2im").

`use_fast_input_gradients` gives the UNet's Conv2D and Dense layers that gradient where
they see at most `FAST_GRADIENT_ROWS` rows (batch x pixels, or batch x tokens); the
forward ops are TensorFlow's own. It applies on a CPU without XLA, in float32 and in
mixed_bfloat16, the cases measured; on a GPU cuDNN's kernels stay.
"""

FAST_GRADIENT_ROWS = 128


def kernel_first_matmul(kernel_2d, upstream_2d):
    """upstream_2d @ kernel_2d.T, computed as (kernel_2d @ upstream_2d.T).T."""
    return tf.transpose(tf.matmul(kernel_2d, upstream_2d, transpose_b=True))


def dilate(tensor, stride):
    """Puts stride - 1 zeros after every pixel of [batch, height, width, channels]."""
    if stride == 1:
        return tensor
    _, height, width, channels = tensor.shape
    spread = tf.pad(
        tensor[:, :, None, :, None],
        [[0, 0], [0, 0], [0, stride - 1], [0, 0], [0, stride - 1], [0, 0]],
    )
    return tf.reshape(spread, [-1, height * stride, width * stride, channels])


def conv_input_gradient(kernel, upstream, input_shape, stride):
    """The gradient of a "valid" convolution with respect to its input (col2im)."""
    kernel_height, kernel_width, in_channels, out_channels = kernel.shape
    _, height, width, _ = input_shape
    _, out_height, out_width, _ = upstream.shape
    columns = kernel_first_matmul(
        ops.reshape(kernel, (-1, out_channels)), ops.reshape(upstream, (-1, out_channels))
    )
    columns = ops.reshape(
        columns, (-1, out_height, out_width, kernel_height * kernel_width, in_channels)
    )
    taps = []
    for i in range(kernel_height):
        for j in range(kernel_width):
            tap = dilate(columns[:, :, :, i * kernel_width + j], stride)
            below, right = height - i - tap.shape[1], width - j - tap.shape[2]
            tap = tf.pad(tap, [[0, 0], [i, max(below, 0)], [j, max(right, 0)], [0, 0]])
            taps.append(tap[:, :height, :width])
    return tf.add_n(taps)


def static_rows(shape):
    return math.prod(shape[:-1]) if None not in shape[:-1] else None


def convolution_with_fast_input_gradient(stride):
    @tf.custom_gradient
    def convolve(x, kernel, bias):
        y = tf.nn.bias_add(tf.nn.conv2d(x, kernel, stride, "VALID"), bias)

        def gradient(upstream):
            strides = [1, stride, stride, 1]
            rows = static_rows(upstream.shape)
            if rows is not None and rows <= FAST_GRADIENT_ROWS:
                x_gradient = conv_input_gradient(kernel, upstream, x.shape, stride)
            else:
                x_gradient = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=kernel, out_backprop=upstream,
                    strides=strides, padding="VALID",
                )  # fmt: skip
            kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=upstream,
                strides=strides, padding="VALID",
            )  # fmt: skip
            return x_gradient, kernel_gradient, tf.reduce_sum(upstream, axis=[0, 1, 2])

        return y, gradient

    return convolve


CONVOLUTIONS = {stride: convolution_with_fast_input_gradient(stride) for stride in (1, 2)}


@tf.custom_gradient
def dense_with_fast_input_gradient(x, kernel, bias):
    in_features, out_features = kernel.shape
    x_2d = tf.reshape(x, (-1, in_features))
    y_2d = tf.nn.bias_add(tf.matmul(x_2d, kernel), bias)
    y = tf.reshape(y_2d, tf.concat([tf.shape(x)[:-1], [out_features]], axis=0))

    def gradient(upstream):
        upstream_2d = tf.reshape(upstream, (-1, out_features))
        rows = static_rows(x.shape)
        if rows is not None and rows <= FAST_GRADIENT_ROWS:
            x_gradient = kernel_first_matmul(kernel, upstream_2d)
        else:
            x_gradient = tf.matmul(upstream_2d, kernel, transpose_b=True)
        kernel_gradient = tf.matmul(x_2d, upstream_2d, transpose_a=True)
        bias_gradient = tf.reduce_sum(upstream_2d, axis=0)
        return tf.reshape(x_gradient, tf.shape(x)), kernel_gradient, bias_gradient

    return y, gradient


class FastGradientConv2D(keras.layers.Conv2D):
    def call(self, inputs):
        bias = self.bias if self.use_bias else ops.zeros((self.filters,), inputs.dtype)
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(bias)
        y = CONVOLUTIONS[self.strides[0]](inputs, kernel, bias)
        return self.activation(y)


class FastGradientDense(keras.layers.Dense):
    def call(self, inputs, training=None):
        bias = self.bias if self.use_bias else ops.zeros((self.units,), inputs.dtype)
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(bias)
        y = dense_with_fast_input_gradient(inputs, kernel, bias)
        return self.activation(y)


def use_fast_input_gradients(diffusion_model):
    """Gives the UNet's plain Conv2D and Dense layers the fast input gradient, in place
    (the same weights); before the train step is traced. Returns how many."""
    swapped = 0
    for layer in all_sublayers(diffusion_model):
        if getattr(layer, "quantization_mode", None) is not None:
            continue
        if type(layer) is keras.layers.Conv2D and layer.padding == "valid":
            plain = layer.groups == 1 and tuple(layer.dilation_rate) == (1, 1)
            plain = plain and layer.data_format == "channels_last"
            if plain and layer.strides[0] == layer.strides[1] and layer.strides[0] in CONVOLUTIONS:
                layer.__class__ = FastGradientConv2D
                swapped += 1
        elif type(layer) is keras.layers.Dense:
            layer.__class__ = FastGradientDense
            swapped += 1
    return swapped


def fast_gradients_apply(precision, jit_compile):
    """Where they were measured to pay: on a CPU without XLA, in float32, and in
    mixed_bfloat16 on a CPU with bfloat16 arithmetic (measured with avx512_bf16)."""
    if jit_compile or tf.config.list_physical_devices("GPU"):
        return False
    if precision == "mixed_bfloat16":
        return any(flag in cpu_flags() for flag in BFLOAT16_CPU_FLAGS)
    return precision == "float32"


"""
**Attention in query chunks.** KerasCV's attention computes softmax(QK^T / sqrt(d)) V
with the whole score matrix at once, and the backward keeps it: at 512 px each of the
UNet's five 64x64 self-attentions holds 8 heads x 4096 x 4096 scores, 512 MB in float32,
twice over (the scores and the softmax). `attention_in_query_chunks` computes the same
numbers a chunk of queries at a time (at most `ATTENTION_CHUNK_SCORES` scores per head:
half of the 64x64 matrix, or all queries at once against the text's 77 keys), under a
custom gradient. What the backward gets from the forward is the queries, keys, values
and output, and the first chunk's softmax weights; it recomputes the other chunks'
weights, so it never holds a whole attention matrix. (A recompute of the first chunk
would wait on nothing, and TensorFlow's graph optimizer merges such a recompute with
the forward's own computation: it would keep those weights anyway, so the code keeps
them openly.) The forward and the backward take the chunks one after another
(TensorFlow would otherwise run the independent chunks side by side, and hold all
their score matrices at once). It scales the queries by 1 / sqrt(d) before the product
where KerasCV scales the scores after it: the same numbers up to rounding, with two
multiplications of a [tokens x head size] matrix (forward and backward) instead of
three of a [tokens x tokens] one (forward, recomputed, backward).

The products whose result is a head's 40 columns (the output, and the gradients of the
queries, keys and values) are computed transposed, the thin matrix on the left:
value^T @ weights^T instead of weights @ value. oneDNN's bfloat16 kernels take less time
that way: on 2 cores of an AMD EPYC, `benchmarks/versus_diffusers.py` at 512 px went from
0.82-0.83x diffusers' time per step to 0.76-0.79x in three runs of four (0.82x in one).
"""

# Fewer, larger chunks take less time; half a 64x64 matrix bounds their memory.
ATTENTION_CHUNK_SCORES = 2048 * 4096


def queries_per_chunk(key_count, chunk_scores=ATTENTION_CHUNK_SCORES):
    return max(1, chunk_scores // key_count)


def attention_in_query_chunks(query, key, value, scale, chunk=None):
    """softmax(query @ key^T * scale) @ value for [batch, heads, tokens, head size], in
    chunks of `chunk` queries (by default, `queries_per_chunk` of the keys)."""
    chunk = chunk or queries_per_chunk(key.shape[2])

    def chunk_weights(query_chunk):
        return tf.nn.softmax(tf.matmul(query_chunk, key, transpose_b=True))

    chunk_starts = range(0, query.shape[2], chunk)

    def transposed(x):
        return tf.transpose(x, [0, 1, 3, 2])

    @tf.custom_gradient
    def attend(query, key, value):
        """softmax(query @ key^T) @ value, the queries already scaled."""
        value_t = transposed(value)
        outputs_t = []
        for s in chunk_starts:
            with tf.control_dependencies(outputs_t[-1:]):  # one chunk after another
                weights = chunk_weights(query[:, :, s : s + chunk])
                if s == 0:
                    first_weights = weights  # kept for the backward
                # (weights @ value)^T, computed as value^T @ weights^T: faster (see above).
                outputs_t.append(tf.matmul(value_t, weights, transpose_b=True))
        output = transposed(tf.concat(outputs_t, axis=3))

        def gradient(upstream):
            query_gradients_t = []
            key_t = transposed(key)
            key_gradient_t, value_gradient_t = tf.zeros_like(key_t), tf.zeros_like(value_t)
            value_and_ones = tf.concat([value, tf.ones_like(value[..., :1])], axis=-1)
            for s in chunk_starts:
                # One chunk after another: each starts once the one before is done.
                done_before = [key_gradient_t, value_gradient_t, *query_gradients_t[-1:]]
                with tf.control_dependencies(done_before):
                    query_chunk, upstream_chunk = (
                        query[:, :, s : s + chunk],
                        upstream[:, :, s : s + chunk],
                    )
                    # The first chunk's weights are the forward's; the others recomputed.
                    weights = first_weights if s == 0 else chunk_weights(query_chunk)
                    value_gradient_t += tf.matmul(upstream_chunk, weights, transpose_a=True)
                    # The softmax's backward: w * (dw - sum(dw * w)), with dw = upstream
                    # @ value^T, and sum(dw * w) = sum(upstream * output) row by row. The
                    # subtraction rides in the product: [upstream, -sums] @ [value, 1]^T.
                    row_sums = tf.reduce_sum(
                        upstream_chunk * output[:, :, s : s + chunk], axis=-1, keepdims=True
                    )
                    shifted_weights_gradient = tf.matmul(
                        tf.concat([upstream_chunk, -row_sums], axis=-1),
                        value_and_ones,
                        transpose_b=True,
                    )
                    scores_gradient = weights * shifted_weights_gradient
                    query_gradients_t.append(tf.matmul(key_t, scores_gradient, transpose_b=True))
                    key_gradient_t += tf.matmul(query_chunk, scores_gradient, transpose_a=True)
            query_gradient = transposed(tf.concat(query_gradients_t, axis=3))
            return query_gradient, transposed(key_gradient_t), transposed(value_gradient_t)

        return output, gradient

    return attend(query * scale, key, value)


CrossAttention, ResBlock, SpatialTransformer, GEGLU = keras_cv_unet_classes()


class ChunkedCrossAttention(CrossAttention):
    """KerasCV's CrossAttention (the same weights), computed in query chunks of at most
    `chunk_scores` scores per head; in float32 if `in_float32` (`use_float32_attention`)."""

    chunk_scores = ATTENTION_CHUNK_SCORES
    in_float32 = False

    def call(self, inputs, context=None):
        if context is None:
            context = inputs
        heads, head_size = self.num_heads, self.head_size

        def split_heads(x):
            x = ops.reshape(x, (-1, x.shape[1], heads, head_size))
            return ops.transpose(x, (0, 2, 1, 3))  # [batch, heads, tokens, head size]

        query = split_heads(self.to_q(inputs))
        key, value = split_heads(self.to_k(context)), split_heads(self.to_v(context))
        if self.in_float32:
            query, key, value = (ops.cast(x, "float32") for x in (query, key, value))
        chunk = queries_per_chunk(key.shape[2], self.chunk_scores)
        attended = attention_in_query_chunks(query, key, value, self.scale, chunk)
        attended = ops.cast(attended, self.compute_dtype)
        attended = ops.reshape(
            ops.transpose(attended, (0, 2, 1, 3)), (-1, inputs.shape[1], heads * head_size)
        )
        return self.out_proj(attended)


def use_attention_in_chunks(diffusion_model, chunk_scores=ATTENTION_CHUNK_SCORES):
    """Gives the UNet's attention layers `ChunkedCrossAttention`, in place. Returns how many."""
    layers = all_sublayers(diffusion_model)
    layers = [layer for layer in layers if isinstance(layer, CrossAttention)]
    for layer in layers:
        layer.__class__ = ChunkedCrossAttention
        layer.chunk_scores = chunk_scores
    return len(layers)


"""
**Attention in float32 under float16.** SD 2.x's attention scores outgrow float16, whose
largest number is 65,504: in float16 they become infinite and the loss NaN
(AUTOMATIC1111#5715). diffusers' SD 2.1 configs set `upcast_attention` for it. Under a
float16 policy, `build_models` gives SD 2.x's UNet `use_float32_attention`: its attention
layers compute the scores, the softmax and the product with the values in float32 (the
projections stay in float16), for training and drawing alike.
"""


def use_float32_attention_where_needed(diffusion_model, family, compute_dtype):
    """`use_float32_attention` for SD 2.x under float16 alone."""
    if family == "SD 2.x" and compute_dtype == "float16":
        use_float32_attention(diffusion_model)


def use_float32_attention(diffusion_model):
    """Gives the UNet's attention layers `ChunkedCrossAttention` in float32, in place.
    Returns how many."""
    count = use_attention_in_chunks(diffusion_model)
    for layer in all_sublayers(diffusion_model):
        if isinstance(layer, ChunkedCrossAttention):
            layer.in_float32 = True
    return count


"""
**The gated GELU, keeping one tensor.** Each transformer block's feed-forward is a GEGLU:
a Dense layer to twice the width, split into `x` and a `gate`, and `x * gelu(gate)` with
the tanh approximation of GELU. Left to autodiff, its backward keeps the intermediates
of that formula, each of the feed-forward's width (at 512 px, 4096 x 1280 in each 64x64
block). `gated_gelu` computes the same forward, in the same order of operations and the
same dtype, under a custom gradient that keeps only the Dense layer's output and
recomputes the rest in the backward, in the forward's dtype, as autodiff's would.
"""

# KerasCV's literals, sqrt(2 / pi) to ten digits and GELU's cubic term: the forward is
# KerasCV's bit for bit only with these.
GELU_TANH_SCALE, GELU_TANH_CUBIC = 0.7978845608, 0.044715


def gated_gelu(projected, width):
    """x * gelu(gate) for projected = [..., x | gate], each `width` wide (tanh GELU)."""

    @tf.custom_gradient
    def gated(projected):
        x, gate = projected[..., :width], projected[..., width:]
        tanh = tf.tanh(gate * GELU_TANH_SCALE * (1 + GELU_TANH_CUBIC * gate**2))
        output = x * 0.5 * gate * (1 + tanh)

        def gradient(upstream):
            x, gate = projected[..., :width], projected[..., width:]
            tanh = tf.tanh(gate * GELU_TANH_SCALE * (1 + GELU_TANH_CUBIC * gate**2))
            gelu = 0.5 * gate * (1 + tanh)
            # d gelu / d gate = 0.5 (1 + tanh) + 0.5 gate (1 - tanh^2) d(inner) / d gate
            inner_slope = GELU_TANH_SCALE * (1 + 3 * GELU_TANH_CUBIC * gate**2)
            gelu_slope = 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh**2) * inner_slope
            gradients = tf.concat([upstream * gelu, upstream * x * gelu_slope], axis=-1)
            return gradients

        return output, gradient

    return gated(projected)


class LeanGEGLU(GEGLU):
    """KerasCV's GEGLU (the same weights), whose backward keeps only its Dense's output."""

    def call(self, inputs):
        return gated_gelu(self.dense(inputs), self.output_dim)


def use_lean_geglu(diffusion_model):
    """Gives the UNet's GEGLU layers `LeanGEGLU`, in place. Returns how many."""
    layers = [layer for layer in all_sublayers(diffusion_model) if type(layer) is GEGLU]
    for layer in layers:
        layer.__class__ = LeanGEGLU
    return len(layers)


"""
**Group normalization, statistics per channel first.** Keras's `GroupNormalization`
reduces each group over a strided [pixels, group, channels of the group] view, which
TensorFlow's CPU kernels do slowly, and the VAE encoder runs it over 512 x 512 x 128
activations in every step at 512 px. For the backward it keeps float32 copies of its
input. `group_normalization` sums over the pixels per channel first, a reduction down
contiguous rows, and only then over each group's channels (float32 statistics, as
Keras's); its custom gradient keeps only its input and each group's mean and inverse
deviation. For a batch of one (the tutorial's) it takes both steps from TensorFlow's
fused batch-norm kernel instead (oneDNN's, on a CPU build with it): each channel's mean
and variance over the pixels (the kernel also writes a normalized copy, unused), and
then the normalization with each group's statistics.

`use_fast_group_normalization` swaps it into a model's `GroupNormalization` layers: the
VAE's, which the train step runs forward at full resolution, and the UNet's.
"""


def group_normalization(x, gamma, beta, groups, epsilon):
    """Keras's GroupNormalization over the last axis of x (float32 statistics)."""
    channels = x.shape[-1]
    group_size = channels // groups

    def group_means(channel_sums, count):
        """[batch, channels] sums -> [batch, 1, channels]: each channel its group's mean."""
        sums = tf.reduce_sum(tf.reshape(channel_sums, [-1, groups, group_size]), 2, keepdims=True)
        means = tf.broadcast_to(sums / count, [tf.shape(channel_sums)[0], groups, group_size])
        return tf.reshape(means, [-1, 1, channels])

    def normalize_batch_of_one(x, gamma32, beta32):
        """(y, mean, variance) from two fused batch norms over x as [1, 1, pixels, channels]."""
        pixels = tf.reshape(x, [1, 1, -1, channels])
        ones, zeros, no_statistics = tf.ones([channels]), tf.zeros([channels]), tf.zeros([0])
        per_channel = tf.raw_ops.FusedBatchNormV3(
            x=pixels, scale=ones, offset=zeros, mean=no_statistics,
            variance=no_statistics, epsilon=epsilon, is_training=True,
        )  # fmt: skip
        count = tf.cast(tf.shape(pixels)[2], "float32")
        channel_means = per_channel.batch_mean[None]
        # The kernel's variance is the sample variance (n - 1): back to the population's.
        channel_variances = per_channel.batch_variance[None] * (count - 1) / count
        # A group's variance: its channels' variances plus their means' spread.
        mean = group_means(channel_means, group_size)
        spread = tf.square(channel_means - tf.reshape(mean, [1, channels]))
        variance = group_means(channel_variances + spread, group_size)
        y = tf.raw_ops.FusedBatchNormV3(
            x=pixels, scale=gamma32, offset=beta32, mean=tf.reshape(mean, [channels]),
            variance=tf.reshape(variance, [channels]), epsilon=epsilon, is_training=False,
        ).y  # fmt: skip
        return tf.reshape(y, tf.shape(x)), mean, variance

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        shape = tf.shape(x)
        flat_shape = tf.stack([shape[0], tf.size(x) // (shape[0] * channels), channels])
        count = tf.cast(flat_shape[1] * group_size, "float32")
        gamma32, beta32 = tf.cast(gamma, "float32"), tf.cast(beta, "float32")
        if x.shape[0] == 1:
            y, mean, variance = normalize_batch_of_one(x, gamma32, beta32)
            inverse_std = tf.math.rsqrt(variance + epsilon)
        else:
            flat = tf.reshape(tf.cast(x, "float32"), flat_shape)
            mean = group_means(tf.reduce_sum(flat, axis=1), count)
            centered = flat - mean
            variance = group_means(tf.reduce_sum(tf.square(centered), axis=1), count)
            inverse_std = tf.math.rsqrt(variance + epsilon)
            y = tf.cast(tf.reshape(centered * (inverse_std * gamma32) + beta32, shape), x.dtype)

        def gradient(upstream):
            normalized = (tf.reshape(tf.cast(x, "float32"), flat_shape) - mean) * inverse_std
            upstream = tf.reshape(tf.cast(upstream, "float32"), flat_shape)
            gamma_gradient = tf.reduce_sum(upstream * normalized, axis=[0, 1])
            beta_gradient = tf.reduce_sum(upstream, axis=[0, 1])
            d_normalized = upstream * gamma32
            mean_d = group_means(tf.reduce_sum(d_normalized, axis=1), count)
            mean_d_n = group_means(tf.reduce_sum(d_normalized * normalized, axis=1), count)
            x_gradient = inverse_std * (d_normalized - mean_d - normalized * mean_d_n)
            return (
                tf.cast(tf.reshape(x_gradient, shape), x.dtype),
                tf.cast(gamma_gradient, gamma.dtype),
                tf.cast(beta_gradient, beta.dtype),
            )

        return y, gradient

    return normalize(x, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


class FastGroupNormalization(keras.layers.GroupNormalization):
    def call(self, inputs):
        outputs = group_normalization(inputs, self.gamma, self.beta, self.groups, self.epsilon)
        return ops.cast(outputs, self.compute_dtype)  # as Keras's layer returns


def use_fast_group_normalization(model):
    """Gives model's GroupNormalization layers (last axis, with scale and offset)
    `FastGroupNormalization`, in place. Returns how many."""
    layers = [
        layer for layer in all_sublayers(model)
        if type(layer) is keras.layers.GroupNormalization
        and layer.axis == -1 and layer.scale and layer.center
    ]  # fmt: skip
    for layer in layers:
        layer.__class__ = FastGroupNormalization
    return len(layers)


"""
**Gradient checkpointing.** `--gradient-checkpointing` keeps, of each of the UNet's
residual and transformer blocks, only its inputs for the backward, and computes the
block's forward again when its gradient is needed (`tf.recompute_grad`): a lower peak of
memory for about one more UNet forward per step. (Keras's own `remat` has a known bug
under mixed precision on the TensorFlow backend.)
"""


def checkpointed(block_class):
    """A subclass of a KerasCV block taking `[x, other]` whose call is recomputed in
    the backward."""

    class Checkpointed(block_class):
        def call(self, inputs):
            def block(x, other):
                return block_class.call(self, [x, other])

            return tf.recompute_grad(block)(*inputs)

    Checkpointed.__name__ = f"Checkpointed{block_class.__name__}"
    return Checkpointed


CHECKPOINTED = {
    ResBlock: checkpointed(ResBlock),
    SpatialTransformer: checkpointed(SpatialTransformer),
}


def use_gradient_checkpointing(diffusion_model):
    """Checkpoints the UNet's ResBlocks and SpatialTransformers, in place. Returns how many."""
    layers = [layer for layer in all_sublayers(diffusion_model) if type(layer) in CHECKPOINTED]
    for layer in layers:
        layer.__class__ = CHECKPOINTED[type(layer)]
    return len(layers)


def speed_up_unet_backward(diffusion_model, precision, jit_compile, gradient_checkpointing):
    """The swaps of the UNet. `--gradient-checkpointing` asks for a lower peak of memory:
    attention chunks half the size, too."""
    use_fast_group_normalization(diffusion_model)
    chunk_scores = ATTENTION_CHUNK_SCORES // (2 if gradient_checkpointing else 1)
    use_attention_in_chunks(diffusion_model, chunk_scores)
    use_lean_geglu(diffusion_model)
    if fast_gradients_apply(precision, jit_compile):
        use_fast_input_gradients(diffusion_model)
    if gradient_checkpointing:
        use_gradient_checkpointing(diffusion_model)


def speed_up_training(stable_diffusion, precision, jit_compile, gradient_checkpointing):
    """Every swap the script makes before training: the VAE's group norms (its encoder
    runs in every step, its decoder draws the samples) and the UNet's backward."""
    use_fast_group_normalization(stable_diffusion.image_encoder)
    use_fast_group_normalization(stable_diffusion.decoder)
    speed_up_unet_backward(
        stable_diffusion.diffusion_model, precision, jit_compile, gradient_checkpointing
    )
