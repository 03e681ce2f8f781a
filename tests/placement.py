"""Guards against tensors made in the wrong place (issue 20): code under test runs while
torch's default device is `meta`, and every module's forward checks that each parameter
and buffer it holds sits on its input's device. (A module built on `meta` runs on CPU
inputs without complaint, so the default device alone guards nothing.) The dtype twin is
a float64 net fed float64 batches while torch's default dtype stays float32: a module
made at the default dtype then fails loudly on a dtype mismatch."""

from __future__ import annotations

import contextlib
from itertools import chain

import torch
from torch import nn


@contextlib.contextmanager
def elsewhere_by_default(device: str = "meta"):
    """torch's default device is `device`, and every module's forward (those built inside
    the code under test included) asserts its tensors are on its input's device."""
    def check(module: nn.Module, args) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None:
            return
        for name, t in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if t.device != x.device:
                raise AssertionError(f"{type(module).__name__}.{name} is on {t.device}, its input on {x.device}")
        checked.append(type(module).__name__)

    checked: list[str] = []
    handle = nn.modules.module.register_module_forward_pre_hook(check)
    try:
        with torch.device(device):
            yield checked
    finally:
        handle.remove()
