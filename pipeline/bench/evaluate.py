"""`python -m pipeline bench eval`: a net's evaluation forward passes, in images/s, in the
memory order the paper's protocols run it (channels last: pipeline/protocols.py) and in
torch's default NCHW, in the same run, on one synthetic batch already on the device (what
a multi-crop pass hands the net: its crops and their flips, stacked), no loader. The two
orders' outputs are compared too: the speed must not change the posteriors."""

from __future__ import annotations

import platform
import time

import torch


def _forward_rate(net, batch: torch.Tensor, seconds: float, warmup: int) -> tuple[float, int]:
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            net(batch)
        sync()
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            net(batch)
            images += batch.shape[0]
        sync()
    return images / (time.perf_counter() - start), images


def bench_eval(arch: str, device: str = "cpu", batch_size: int = 256, seconds: float = 10.0,
               width_mult: float = 1.0, crop: int = 224, warmup: int = 2) -> dict:
    from pipeline.models import build_model

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu: no CUDA device visible")
    model = build_model(arch, num_classes=1000, width_mult=width_mult, input_size=crop, init="kaiming").eval().to(dev)
    x = torch.randn(batch_size, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(dev)
    rates, outputs = {}, {}
    for order, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net, batch = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        rates[order] = _forward_rate(net, batch, seconds, warmup)
        with torch.no_grad():
            outputs[order] = net(batch[:8]).float().cpu()
    nchw, last = rates["nchw"][0], rates["channels_last"][0]
    return {"bench": "eval", "arch": arch, "width_mult": width_mult, "crop": crop, "batch_size": batch_size,
            "device": device, "seconds": seconds, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "nchw_img_s": round(nchw, 1), "channels_last_img_s": round(last, 1),
            "channels_last_vs_nchw": round(last / nchw, 3), "images": {k: v[1] for k, v in rates.items()},
            "max_abs_logit_diff": float((outputs["nchw"] - outputs["channels_last"]).abs().max())}
