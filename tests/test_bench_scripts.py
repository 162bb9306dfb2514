"""The GPU benchmark script stays runnable: its CPU smoke mode goes through the same code."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_benchmark_script_smoke_mode_prints_its_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_gpu_sd15.py"), "--tiny"],
                            capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| engine")]
    assert len(lines) == 4  # fp32 x (ControlNet off, on) x batch (1, 2)
    assert "naive diffusers loop" in result.stdout and "best engine setting" in result.stdout


def test_attention_benchmark_smoke_mode_checks_images_and_prints_its_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_attention.py"), "--tiny",
                             "--resolution", "32", "--steps", "2", "--batch", "2", "--images", "2"],
                            capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| every image records its subject map |" in result.stdout
    assert "images identical with and without recording: yes" in result.stdout
