"""VAE disaggregation: the decode runs on its own workers while the DiT workers sample the next job.

Two pools (of any backend): the DiT pool samples, the VAE pool (its own devices and degree, the
image rows split over its workers) decodes. ``submit`` samples a job on the caller's thread
and queues its decode on a decode thread, so the DiT pool is free for the next ``submit`` as
soon as sampling ends: with a stream of jobs the decode of job N overlaps the sampling of job
N + 1, as in xDiT's Ray launcher. Each pool still runs one job at a time; the pools never share
a worker, so nothing waits on the other.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..requests import SampleRequest, VaeDecodeRequest, VaeWeights
from .host import OnStep, WorkerPool


class DisaggregatedPipeline:
    """Sample on ``dit_pool``, decode with ``vae`` on ``vae_pool``; ``events`` records when each part ran.

    ``events`` holds ``(what, job, monotonic seconds)`` with ``what`` in sample_start, sample_end,
    decode_start, decode_end; ``job`` counts submits from 0.
    """

    def __init__(self, dit_pool: WorkerPool, vae_pool: WorkerPool, vae: VaeWeights):
        if dit_pool is vae_pool:
            raise ValueError("the VAE pool must be another pool than the DiT pool (its own workers)")
        self.dit_pool, self.vae_pool, self.vae = dit_pool, vae_pool, vae
        self.events: list[tuple[str, int, float]] = []
        self._lock = threading.Lock()
        self._jobs = 0
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comfy-xdit-vae")  # decodes in order

    def __enter__(self) -> "DisaggregatedPipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _mark(self, what: str, job: int) -> None:
        with self._lock:
            self.events.append((what, job, time.monotonic()))

    def submit(self, request: SampleRequest, on_step: OnStep | None = None) -> tuple[torch.Tensor, Future]:
        """Sample now (on this thread); returns the latent and a future of its image [B, H, W, 3]."""
        job = self._jobs
        self._jobs += 1
        self._mark("sample_start", job)
        latent = self.dit_pool.sample(request, on_step=on_step)
        self._mark("sample_end", job)
        return latent, self._decoder.submit(self._decode, job, latent)

    def _decode(self, job: int, latent: torch.Tensor) -> torch.Tensor:
        self._mark("decode_start", job)
        try:
            if not self.vae_pool.has_vae(self.vae.fingerprint):
                self.vae_pool.load_vae(self.vae)
            return self.vae_pool.decode(VaeDecodeRequest(self.vae.fingerprint, latent))
        finally:
            self._mark("decode_end", job)

    def when(self, what: str, job: int) -> float:
        with self._lock:
            return next(t for w, j, t in self.events if w == what and j == job)

    def close(self) -> None:
        """Wait for the queued decodes; the pools stay the caller's."""
        self._decoder.shutdown(wait=True)
