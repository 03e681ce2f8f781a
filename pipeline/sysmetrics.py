"""Machine figures beside the training figures: each node's CPU, memory, disk and network,
and its GPUs' utilisation, memory and power, sampled every few seconds by one worker per
node, under MLflow's own system-metric names with the node as a label
(`system/<node>/cpu_utilization_percentage`, as MLflow 3 names a node's figures).

How they travel: the samples ride with the worker's Ray Train reports to the controller on
the driver's node, which logs them with the epoch figures (pipeline/worker.py), so workers
need no route to the tracking server; each sample keeps the time it was taken.
"""

from __future__ import annotations

import threading
import time

INTERVAL_S = 5.0


class Sampler:
    """A daemon thread that samples this node every `interval` seconds; `drain()` hands
    over (epoch ms, {name: value}) samples taken since the last drain."""

    def __init__(self, interval: float | None = None, gpus: bool = False):
        import psutil

        self._psutil, self.interval = psutil, INTERVAL_S if interval is None else interval
        self._samples: list[tuple[int, dict]] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._nvml = self._gpus() if gpus else []
        self._disk0, self._net0 = psutil.disk_io_counters(), psutil.net_io_counters()
        psutil.cpu_percent(None)  # the first call only starts the measurement window
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _gpus(self) -> list:
        try:
            import pynvml

            pynvml.nvmlInit()
            return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no driver, no NVML: a node without GPUs to report
            return []

    def sample(self) -> dict:
        ps = self._psutil
        mem = ps.virtual_memory()
        out = {"cpu_utilization_percentage": ps.cpu_percent(None),
               "system_memory_usage_percentage": mem.percent,
               "system_memory_usage_megabytes": (mem.total - mem.available) / 2**20}
        disk, net = ps.disk_io_counters(), ps.net_io_counters()
        if disk is not None and self._disk0 is not None:
            out["disk_read_megabytes"] = (disk.read_bytes - self._disk0.read_bytes) / 2**20
            out["disk_write_megabytes"] = (disk.write_bytes - self._disk0.write_bytes) / 2**20
        if net is not None and self._net0 is not None:
            out["network_receive_megabytes"] = (net.bytes_recv - self._net0.bytes_recv) / 2**20
            out["network_transmit_megabytes"] = (net.bytes_sent - self._net0.bytes_sent) / 2**20
        if self._nvml:
            import pynvml

            for i, handle in enumerate(self._nvml):
                use = pynvml.nvmlDeviceGetUtilizationRates(handle)
                gmem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"gpu_{i}_utilization_percentage"] = use.gpu
                out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * gmem.used / max(gmem.total, 1)
                out[f"gpu_{i}_memory_usage_megabytes"] = gmem.used / 2**20
                out[f"gpu_{i}_power_usage_watts"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            taken = int(time.time() * 1000), self.sample()
            with self._lock:
                self._samples.append(taken)

    def drain(self) -> list[tuple[int, dict]]:
        with self._lock:
            out, self._samples = self._samples, []
        return out

    def stop(self) -> None:
        self._stop.set()
