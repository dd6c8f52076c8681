"""Connecting to Ray from several threads at once (a sweep's stages run as Prefect task
threads, each connecting before it submits its Ray task)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from pipelines import ray_runtime


def test_threads_connecting_at_once_start_ray_once(monkeypatch):
    connected, calls = threading.Event(), []

    def slow_init(**_):  # ray.init takes seconds; a second call meanwhile fails
        calls.append(threading.get_ident())
        time.sleep(0.2)
        connected.set()

    monkeypatch.setattr(ray, "is_initialized", connected.is_set)
    monkeypatch.setattr(ray, "init", slow_init)
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(ray_runtime.connect, None) for _ in range(4)]:
            future.result()
    assert len(calls) == 1
