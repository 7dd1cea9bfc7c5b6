"""What a number was measured on: recorded beside runs, benches and cached cuts, because
float results differ between CPU kinds (another vector unit picks other kernels)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

__all__ = ["machine_info", "cpu_name"]


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."), or the architecture
    where the system does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """The machine's kind, never its name: CPU model and vector unit torch uses, cores,
    GPUs when CUDA is up, and the software versions."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
