"""The environment header of every table and report: device, torch, triton, python, date.
Low in the layer order, so that both `theria.boundary` and `theria.bench` can use it."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Device, torch and triton versions and the date, for the header of every table."""
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        env["threads"] = str(torch.get_num_threads())
    return env
