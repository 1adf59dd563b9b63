"""The benchmark's figures (benchmarks/versus_diffusers.py): the loading peak and the
training peak are measured apart, each from the moment the last one ended; a step's
FLOPs, against which its distance to the CPU's floor is printed, count all of them."""

import os
import sys

from conftest import ROOT, python_in_a_process_of_its_own

MEASURED_APART = f"""
import sys, time
import numpy as np
sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
from versus_diffusers import MemoryWatch

watch = MemoryWatch()
loading = np.ones(800 * 2**20 // 8)  # 800 MB, written, then freed before training
time.sleep(0.1)  # the watch samples every 10 ms
del loading
loading_peaks = watch.peaks_gb()
watch.reset()
training = np.ones(300 * 2**20 // 8)  # 300 MB
time.sleep(0.1)
del training
print(*loading_peaks, *watch.peaks_gb())
"""


def test_the_training_peak_leaves_out_what_loading_freed_and_counts_what_training_holds():
    """In a process of its own, so that the figures are of that process alone."""
    printed = python_in_a_process_of_its_own(MEASURED_APART)
    loading_anonymous, loading_resident, training_anonymous, training_resident = map(
        float, printed.split()
    )
    assert loading_anonymous > 0.78 and loading_resident > 0.78  # GB: the 800 MB block
    # after the reset: the 300 MB block and what the interpreter holds, not the 800 MB
    assert 0.29 < training_anonymous < 0.7 and 0.29 < training_resident < 0.75


def test_the_flop_count_of_a_step_includes_attention_which_the_counter_skips_on_a_cpu():
    """PyTorch's counter counts nothing for the CPU kernel of scaled_dot_product_attention;
    count_flops computes attention as batched matmuls, so that the floor counts it."""
    import torch
    from diffusers.models.attention_processor import Attention

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from versus_diffusers import count_flops

    tokens, width, heads, head_width = 256, 64, 2, 32
    attention = Attention(query_dim=width, heads=heads, dim_head=head_width)
    x = torch.randn(1, tokens, width)
    projections = 4 * 2 * tokens * width * (heads * head_width)  # q, k, v and out
    scores_and_mix = 2 * heads * 2 * tokens * tokens * head_width  # q @ k.T, then @ v
    assert count_flops(lambda: attention(x), [attention]) == projections + scores_and_mix
