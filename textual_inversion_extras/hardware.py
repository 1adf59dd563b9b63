"""The hardware's settings: the precision, XLA, the devices to train on, and the
allocator's."""

import contextlib
import ctypes
import ctypes.util

import keras
import tensorflow as tf

from textual_inversion_extras.errors import UserError
from textual_inversion_extras.keras_internals import forget_distribution_strategy

"""
## Extras: speed

`--precision` sets the dtype policy of the models. Under a mixed policy the frozen VAE
and UNet hold their weights in the compute dtype itself, as diffusers does (half the
memory, and no cast of their billion weights at every step); the text encoder keeps
float32 weights, and the learned vector, Adam's moments and the loss stay in float32
(tested). `auto`, the default, picks by what the hardware computes fast:

- `mixed_bfloat16` on a GPU of compute capability 8.0 or more (A100, L4, RTX 30xx and
  later compute bfloat16 as fast as float16, and bfloat16 needs no loss scaling), and
  on a CPU with bfloat16 arithmetic (`avx512_bf16` or `amx_bf16`);
- `mixed_float16`, with Keras's loss scaling (which `scaled_loss` in the trainer
  applies), on older GPUs with float16 tensor cores (compute capability 7.x: V100, and
  the T4 of Colab's free tier);
- `float32` elsewhere: a CPU without bfloat16 arithmetic emulates both mixed policies,
  converting to float32 and back around every product, so they gain nothing there.

The GPU choices follow TensorFlow's mixed-precision guide; they are unmeasured here.
`mixed_bfloat16` gives diffusers' float32 loss within 1% (tested against it).

`--xla` compiles the models with XLA. `auto` turns it on with a GPU only: on a CPU it
gains nothing the project has measured, and Keras itself leaves it off under
`tf.distribute`. `benchmarks/train_step.py` times a step.
"""

PRECISIONS = ["auto", "float32", "mixed_float16", "mixed_bfloat16"]
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags():
    """The CPU's feature flags, as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_facts():
    """(name, compute capability) of the first GPU, or None without one."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", gpus[0].name), details.get("compute_capability")


def choose_precision(gpu, cpu_flags):
    """(policy, reason) for `--precision auto`; `gpu` is `gpu_facts()`."""
    if gpu:
        name, capability = gpu
        if capability and capability >= (8, 0):
            return (
                "mixed_bfloat16",
                f"{name} (compute capability {capability[0]}.{capability[1]}) computes bfloat16 natively",
            )
        if capability and capability >= (7, 0):
            return (
                "mixed_float16",
                f"{name} (compute capability {capability[0]}.{capability[1]}) has float16 tensor cores, not bfloat16",
            )
        return "float32", f"{name} has no float16 tensor cores"
    found = [flag for flag in BFLOAT16_CPU_FLAGS if flag in cpu_flags]
    if found:
        return "mixed_bfloat16", f"this CPU has bfloat16 arithmetic ({', '.join(found)})"
    return "float32", "no GPU, and this CPU has no bfloat16 arithmetic (no avx512_bf16 or amx_bf16)"


def resolve_precision(precision_flag):
    """The dtype policy for `--precision`: as given, or chosen for the hardware. (For
    SD 2.x under float16, `build_models` computes the attention in float32.)"""
    if precision_flag != "auto":
        return precision_flag
    precision, reason = choose_precision(gpu_facts(), cpu_flags())
    print(f"--precision auto: {precision}, as {reason}.")
    return precision


def use_xla(xla_flag, distribute=False):
    if xla_flag == "auto":
        return bool(tf.config.list_physical_devices("GPU")) and not distribute
    return xla_flag == "on"


def distribution_strategy(distribute, batch_size):
    """MirroredStrategy over the GPUs (or logical CPUs) with --distribute, else
    TensorFlow's default strategy, whose `scope()` changes nothing."""
    if not distribute:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if batch_size % len(devices):
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over the "
            f"{len(devices)} devices of --distribute; use a multiple of {len(devices)}."
        )
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    print(
        f"Training on {strategy.num_replicas_in_sync} replicas "
        f"({', '.join(device.name for device in devices)}), "
        f"each with {batch_size // strategy.num_replicas_in_sync} of the {batch_size} "
        "images of a step."
    )
    return strategy


def sample_on_one_device(models):
    """KerasCV draws images with `predict_on_batch`, which under a MirroredStrategy
    would hand every replica the whole batch and return all their answers, one batch
    per replica. Drawing is not what we spread over devices: with this, the models
    predict as plain models do, with the first device's copy of the weights."""
    for model in models:
        forget_distribution_strategy(model)


@contextlib.contextmanager
def global_dtype_policy(policy):
    """Within it, the layers Keras builds take the dtype policy `policy`."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


"""
**Freed memory kept for reuse (a CPU, Linux).** Every step allocates and frees blocks of
tens of megabytes. glibc's malloc takes large blocks straight from the kernel and gives
them back when they are freed, so the kernel maps and zeroes their pages again at the
next allocation, page by page, on the cores that train. `keep_freed_memory` has malloc
serve every block from its heap and never shrink the heap, so that a freed block is
reused as it is. `python benchmarks/versus_diffusers.py` measures the step with it.
"""

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's malloc.h
LARGEST_INT = 2**31 - 1


def keep_freed_memory():
    """On a CPU, makes glibc's malloc keep freed memory for reuse. Returns whether it
    did: not with a GPU, nor where the C library is not glibc (as on macOS)."""
    if gpu_facts():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, LARGEST_INT) == 1
