"""The benchmark's memory figures (benchmarks/versus_diffusers.py): the loading peak and
the training peak are measured apart, each from the moment the last one ended."""

import os

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
