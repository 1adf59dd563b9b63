"""Shared, expensive test fixtures, built once per test session: KerasCV's models with
random weights at 128 px (the smallest the UNet takes), and the same with small
stand-ins for the VAE and the UNet."""

import contextlib
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the tools import their tools/drawing.py

RESOLUTION = 128
SHARED_VOCAB = os.path.join(ROOT, "..", "shared", "data", "bpe_simple_vocab_16e6.txt.gz")


def seed_keras_cache():
    """Put the CLIP vocabulary in the Keras download cache, as a CI cache would, when
    this machine has no internet but has ../shared beside the project."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    target = os.path.join(keras_home, "datasets", "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(target) and os.path.exists(SHARED_VOCAB):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(SHARED_VOCAB, target)


seed_keras_cache()

# float32 means float32 on every CPU: oneDNN (in TensorFlow and in PyTorch) may compute
# float32 products in bfloat16 on AMX or AVX-512 BF16 when told to by these variables,
# which would turn every float32 tolerance of the suite into a bfloat16 one. The test
# process and the runs it starts inherit the environment, so the suite clears them.
for variable in ("TF_SET_ONEDNN_FPMATH_MODE", "ONEDNN_DEFAULT_FPMATH_MODE"):
    os.environ.pop(variable, None)

import textual_inversion as ti  # noqa: E402
from textual_inversion_extras import saving
from stand_ins import stand_in_models  # noqa: E402


def write_test_images(folder, count=2, size=160):
    """Small, distinct RGB pictures: a coloured square on a gradient."""
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        image = np.stack([x, y, np.full_like(x, i / max(count - 1, 1))], axis=-1)
        image[size // 4 : size // 2, size // 4 : size // 2] = [1.0, 0.2 * i, 0.0]
        path = os.path.join(folder, f"concept_{i}.png")
        plt.imsave(path, image)
        paths.append(path)
    return paths


def run_script(*arguments, timeout=900):
    """Runs textual_inversion.py as a user would, from its command line."""
    import subprocess

    command = [sys.executable, os.path.join(ROOT, "textual_inversion.py"), *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def python_in_a_process_of_its_own(script, environment=None):
    """Runs `script` in a new Python process, which can import the project and the tests'
    modules, with `environment`'s variables added, and returns what it printed; if it
    fails, the test shows its error."""
    paths = [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={
            **os.environ, **(environment or {}),
            "PYTHONPATH": os.pathsep.join(filter(None, paths)),
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def import_tool(name):
    """A script of tools/ as a module, as `import textual_inversion` is."""
    import importlib.util

    path = os.path.join(ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_random_embedding(path, token, seed):
    vectors = np.random.default_rng(seed).normal(scale=0.02, size=(1, 768)).astype("float32")
    saving.save_embedding(str(path), token, vectors, {"step": 3})
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def allocator_left_as_it_is():
    """A training run in this process would have glibc's malloc keep freed memory for the
    rest of the session, which raises the suite's peak: the tests that train here leave
    the allocator as it is (that setting has a test in a process of its own)."""
    from textual_inversion_extras import hardware

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hardware, "keep_freed_memory", lambda: False)
        yield


@pytest.fixture(autouse=True)
def memory_given_back_after_each_test():
    """What a test's models held goes back to the system once the test ends. Each trace
    of a `tf.custom_gradient` function (`tf.nn.silu` is one) registers its gradient in
    TensorFlow's global registry under a name of its own, for good; that gradient holds
    the traced graph, and the graph the variables it captured: each in-process training
    run kept its text encoder's 490 MB. A test's traced functions have taken their
    gradients by the time it ends, so its registrations are dropped then."""
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry._registry
    before = set(registry)
    yield
    for name in set(registry) - before:
        if name.startswith("CustomGradient-"):
            del registry[name]
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory otherwise


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("images"))
    write_test_images(folder)
    return folder


def extended_stable_diffusion(image_folder):
    """A random-weights StableDiffusion extended with <my-funny-cat-token>, frozen,
    plus what the tests compare against."""
    import keras

    keras.utils.set_random_seed(0)
    tokenizer = ti.build_tokenizer()
    vocab_size_before = len(tokenizer.vocab)
    placeholder_token_id, initializer_token_id = ti.add_placeholder_token(
        tokenizer, "<my-funny-cat-token>", "cat"
    )
    stable_diffusion = ti.build_models(
        RESOLUTION, tokenizer, random_weights=True, jit_compile=False
    )
    original_text_encoder = stable_diffusion.text_encoder
    stable_diffusion._text_encoder = ti.extend_text_encoder(
        original_text_encoder, ti.token_rows(original_text_encoder, [initializer_token_id])
    )
    ti.freeze_models(stable_diffusion)
    return dict(
        stable_diffusion=stable_diffusion,
        tokenizer=tokenizer,
        vocab_size_before=vocab_size_before,
        placeholder_token_id=placeholder_token_id,
        initializer_token_id=initializer_token_id,
        original_text_encoder=original_text_encoder,
        images=ti.load_images(ti.resolve_image_files([image_folder]), RESOLUTION),
    )


@pytest.fixture(scope="session")
def concept(image_folder):
    """For the mechanics: KerasCV's tokenizer, with small stand-ins for the text
    encoder, the VAE and the UNet (tests/stand_ins.py)."""
    with stand_in_models():
        return extended_stable_diffusion(image_folder)


@pytest.fixture(scope="session")
def sd1x_checkpoint(tmp_path_factory):
    """A random full-size SD 1.x checkpoint in the CompVis layout (tests/sd1x_checkpoint.py)."""
    from sd1x_checkpoint import write_random_checkpoint

    path = str(tmp_path_factory.mktemp("checkpoint") / "sd1x-random.safetensors")
    write_random_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def sd2x_checkpoint(tmp_path_factory):
    """A random full-size SD 2.x checkpoint in the CompVis layout, its text encoder
    OpenCLIP's (tests/sd1x_checkpoint.py)."""
    from sd1x_checkpoint import write_random_checkpoint

    path = str(tmp_path_factory.mktemp("checkpoint") / "sd2x-random.safetensors")
    write_random_checkpoint(path, sd2=True)
    return path


@pytest.fixture(scope="session")
def checkpoint_command_line_run(sd1x_checkpoint, sd2x_checkpoint, image_folder, tmp_path_factory):
    """The command line on the full-size checkpoints, as a user runs it, in the
    background: on the SD 1.x one, 1 training step; then on the SD 2.x one, named as
    SD 2.1's 768-v release is, 1 step with sample images before and after it, and
    `tools/generate.py` draws with the 1024-wide embedding it learned. The command-line
    tests start it beside their own runs, while this process is small; the oracles wait
    for it (they need the memory), and check what it wrote. Each part's exit status goes
    into its `*.status` file."""
    folder = tmp_path_factory.mktemp("command-line")
    script = os.path.join(ROOT, "textual_inversion.py")
    common = ["--resolution", str(RESOLUTION), "--sample-steps", "1"]
    train = [
        sys.executable, script, "--base-model", sd1x_checkpoint, *common,
        "--images", image_folder, "--group-images", "--prompts", "a photo of {}",
        "--max-train-steps", "1", "--sample-every", "0", "--output-dir", str(folder / "run"),
    ]  # fmt: skip
    sd2_file = str(folder / "v2-1_768-random.safetensors")
    os.symlink(sd2x_checkpoint, sd2_file)
    train_sd2 = [
        sys.executable, script, "--base-model", sd2_file,
        *common, "--images", image_folder, "--group-images", "--prompts", "a photo of {}",
        "--max-train-steps", "1", "--sample-every", "1", "--output-dir", str(folder / "sd2-run"),
    ]  # fmt: skip
    generate_sd2 = [
        sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--base-model", sd2_file,
        "--embedding", str(folder / "sd2-run" / saving.EMBEDDING_FILE), *common,
        "--prompt", "an oil painting of {}", "--batch-size", "1",
        "--output-dir", str(folder / "sd2-draw"),
    ]  # fmt: skip
    script = (
        f"{shlex.join(train)} > train.log 2>&1; echo $? > sd1.status; "
        f"{shlex.join(train_sd2)} > sd2-train.log 2>&1; echo $? > sd2.status; "
        f"{shlex.join(generate_sd2)} > sd2-draw.log 2>&1; echo $? > sd2-draw.status"
    )
    process = subprocess.Popen(["bash", "-c", script], cwd=folder)
    yield folder, process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def loaded_stable_diffusion(sd1x_checkpoint):
    """For the arithmetic: all four of KerasCV's models at 128 px, loaded from that
    checkpoint as `--base-model` does, float32. The diffusers oracle checks them first;
    the tests of the UNet's backward and of mixed precision compare with them. Tests
    that change them put them back."""
    tokenizer = ti.build_tokenizer()
    ti.add_placeholder_token(tokenizer, "<my-funny-cat-token>", "cat")
    return ti.build_base_model(RESOLUTION, tokenizer, sd1x_checkpoint, jit_compile=False)


def extend_stand_in_encoder(text_encoder, new_rows):
    """`extend_text_encoder` for the concept's text encoder, a stand-in: the extended
    one is built as a stand-in too."""
    with stand_in_models():
        return ti.extend_text_encoder(text_encoder, new_rows)


@contextlib.contextmanager
def two_vector_encoder(concept, token):
    """The concept's Stable Diffusion with a text encoder that has `token` as two new
    tokens, both starting as "cat"; yields (tokenizer, their ids), then puts the
    one-token encoder back."""
    stable_diffusion = concept["stable_diffusion"]
    tokenizer = ti.build_tokenizer()
    ids, initializer_id = ti.add_placeholder_tokens(tokenizer, token, "cat", num_vectors=2)
    original = concept["original_text_encoder"]
    shared_encoder = stable_diffusion._text_encoder
    stable_diffusion._text_encoder = extend_stand_in_encoder(
        original, ti.token_rows(original, [initializer_id] * 2)
    )
    ti.freeze_models(stable_diffusion)
    try:
        yield tokenizer, ids
    finally:
        stable_diffusion._text_encoder = shared_encoder
        ti.freeze_models(stable_diffusion)


# The order of the modules, for memory: the notebook's kernel and the command-line runs
# first, while this process is small (a kernel with the full-size models at 128 px,
# then three script processes of about 2.5 GB side by side); the modules on the
# full-size models last, the oracle first among them (about 11 GB, once the background
# command-line runs of the two checkpoints have ended: the SD 2.x one takes 8.6 GB); the
# SD 2.x oracle at the very end, which releases the session's SD 1.x models first.
FIRST_MODULES = ["test_notebook.py", "test_runs_from_the_command_line.py"]
LAST_MODULES = [
    "test_diffusers_oracle.py", "test_sd2x_command_line.py", "test_unet_backward.py",
    "test_sd2x_oracle.py",
]  # fmt: skip


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        if name in FIRST_MODULES:
            return FIRST_MODULES.index(name)
        return 10 + LAST_MODULES.index(name) if name in LAST_MODULES else 5

    items.sort(key=rank)  # a stable sort: within a module, the file's order
