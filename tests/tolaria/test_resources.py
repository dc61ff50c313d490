"""The packet's memory and utilisation figures (`esper.tolaria.resources`), read from the real platform."""

from __future__ import annotations

import time

import pytest
import torch

from esper.tolaria.resources import ResourceSampler, cpu_util_percent, resource_metrics


def test_resource_metrics_report_memory() -> None:
    metrics = resource_metrics(torch.device("cpu"))
    assert metrics["cpu_mem_peak_gb"] > 0.01  # this process has torch loaded: well above 10 MB
    assert "gpu_mem_used_gb" not in metrics


def test_resource_figures_are_read_once_per_interval() -> None:
    now = [100.0]
    sampler = ResourceSampler(torch.device("cpu"), interval_s=1.0, clock=lambda: now[0])
    first = sampler.read()
    assert first["cpu_mem_peak_gb"] > 0.01
    now[0] += 0.9
    assert sampler.read() is first  # within the interval: the same reading, no system call
    now[0] += 0.1
    again = sampler.read()
    assert again is not first and again["cpu_mem_peak_gb"] >= first["cpu_mem_peak_gb"]  # a peak never falls


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_cpu_utilisation_is_the_machines_since_the_last_reading() -> None:
    cpu_util_percent()  # baseline
    _spin(0.3)  # this process keeps one core busy meanwhile
    busy = cpu_util_percent()
    assert 0.0 < busy <= 100.0


def test_a_cpu_trainer_sends_no_cpu_utilisation() -> None:
    """Training is the CPU load there: ~100 % on every healthy step would trip Tamiyo's CPU-pressure rule
    (SEED downgraded) for the whole run."""
    sample = ResourceSampler(torch.device("cpu")).read()
    assert "cpu_util_percent" not in sample and "gpu_util_percent" not in sample


def test_an_accelerator_trainer_sends_the_machines_cpu_utilisation() -> None:
    """Any device other than the CPU (`meta` here, a real torch device with no memory to read): the CPU
    figure is sampled, over the interval since the sampler's baseline."""
    now = [0.0]
    sampler = ResourceSampler(torch.device("meta"), interval_s=1.0, clock=lambda: now[0])
    _spin(0.3)
    sample = sampler.read()
    assert 0.0 < sample["cpu_util_percent"] <= 100.0
    assert "gpu_util_percent" not in sample  # NVML is a CUDA figure
    assert sampler.gpu_util_unavailable == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_trainer_sends_gpu_memory_and_utilisation() -> None:
    sampler = ResourceSampler(torch.device("cuda"))
    sample = sampler.read()
    assert sampler.gpu_util_unavailable == "", sampler.gpu_util_unavailable  # NVML present (nvidia-ml-py)
    assert 0.0 <= sample["gpu_util_percent"] <= 100.0
    assert 0.0 <= sample["cpu_util_percent"] <= 100.0
    assert sample["gpu_mem_free_gb"] > 0 and sample["gpu_mem_used_gb"] > 0
