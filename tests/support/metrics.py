"""Reading a service process's Prometheus /metrics in tests."""

from __future__ import annotations

import urllib.request

from services.cluster import ServiceProcess


def scrape(p: ServiceProcess) -> str:
    assert p.metrics_url, f"{p.label} runs without STT_METRICS_PORT"
    with urllib.request.urlopen(p.metrics_url, timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
