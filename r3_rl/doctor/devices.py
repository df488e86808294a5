"""The GPUs this machine shows (index, name, total and free memory): what the doctor's checks measure against.

Its own module so that the shared :class:`~r3_rl.doctor.base.Context` can list them without importing the
checks that use them.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass
class GpuInfo:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes


def visible_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_properties(i).name, int(total), int(free)))
    return out
