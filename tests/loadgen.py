"""Steady HTTP traffic against a sandbox app while something changes it (a reload, a takeover):
a pool of threads, a new connection per request, every answer's status (or the exception's name)
counted. Bounded: it runs only between ``__enter__`` and ``__exit__``, and each request times out."""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from slipway import sandbox as sb


class Load:
    """GET /api/health, and with ``token`` also POST track-view on ``book`` (every other thread;
    default the smoke book); ``releases`` counts the release each health answer named."""

    def __init__(self, url: str, token: str | None = None, threads: int = 20, rate: float | None = None,
                 book: str = sb.SMOKE_BOOK):
        """``rate``: requests per second across all threads (None: as fast as they go)."""
        self.url, self.token, self.threads, self.book = url, token, threads, book
        self.pause = threads / rate if rate else 0.0
        self.stop = threading.Event()
        self.counts: Counter = Counter()
        self.releases: Counter = Counter()
        self.lock = threading.Lock()

    def worker(self, i: int) -> None:
        while not self.stop.is_set():
            if self.pause:
                self.stop.wait(self.pause)
            try:
                if self.token and i % 2:
                    status, _ = sb.http_json("POST", f"{self.url}/api/books/{self.book}/track-view",
                                             {"viewType": "card_view"}, token=self.token, timeout=10)
                    release = None
                else:
                    status, body = sb.http_json("GET", f"{self.url}/api/health", timeout=10)
                    release = body.get("release") if isinstance(body, dict) else None
            except Exception as exc:  # noqa: BLE001 - refused/reset/timeout: a failed request, counted by kind
                status, release = type(exc).__name__, None
            with self.lock:
                self.counts[status] += 1
                if release:
                    self.releases[release] += 1

    def __enter__(self):
        self.pool = ThreadPoolExecutor(self.threads)
        self.futures = [self.pool.submit(self.worker, i) for i in range(self.threads)]
        time.sleep(1.0)  # traffic is flowing before the action starts
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)  # and goes on after it
        self.stop.set()
        for fut in self.futures:
            fut.result()
        self.pool.shutdown()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        return self.total - self.counts[200]
