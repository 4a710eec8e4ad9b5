"""What machine a benchmark ran on, recorded in every results JSON under ``machine``.

The same code measures differently on the VMs this project gets (an Intel Xeon with AVX-512 and
AMX one day, an AMD EPYC with AVX-512 the next): the CPU model and its vector extensions say
which results can be compared with which.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

# the vector extensions that decide how fast convolutions and matrix products run on a CPU
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def describe_machine() -> dict:
    """The benchmark machine: ``cpu`` (model name), ``cpus`` (logical CPUs), ``memory_gib``,
    ``simd`` (which of ``SIMD_FLAGS`` the CPU has), ``gpu`` (CUDA device name or None), ``torch``
    and ``python`` versions. Reads ``/proc/cpuinfo`` where there is one."""
    cpu, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == platform.processor():
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    import torch

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
