"""The figures of one telemetry document that the service stores, charts and gates on.

Plain Python (no database): `sightline push`'s telemetry gate uses it without the
`sightline[cloud]` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def integer(value: Any) -> int | None:
    value = number(value)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class Figures:
    """The figures of one telemetry document the service keeps and gates on."""

    models: str | None
    fps: float | None
    p50_ms: float | None
    p99_ms: float | None
    received: int | None
    results: int | None
    dropped: int | None
    errors: int | None


def figures(document: dict[str, Any]) -> Figures:
    """Reduce a telemetry document: the worst model's end-to-end p50/p99, frame counters
    and errors summed over models (cumulative since the daemon started)."""
    models = document.get("models") if isinstance(document.get("models"), list) else []
    models = [m for m in models if isinstance(m, dict)]
    p50s, p99s, errors, results = [], [], [], []
    for model in models:
        total = ((model.get("latency_ms") or {}).get("total") or {})
        if isinstance(total, dict):
            if number(total.get("p50")) is not None:
                p50s.append(float(total["p50"]))
            if number(total.get("p99")) is not None:
                p99s.append(float(total["p99"]))
        if number(model.get("errors")) is not None:
            errors.append(int(model["errors"]))
        if number(model.get("results")) is not None:
            results.append(int(model["results"]))
    frames = document.get("frames") if isinstance(document.get("frames"), dict) else {}
    names = ",".join(sorted(f"{m.get('name')}@{m.get('version')}" for m in models))
    return Figures(
        models=names[:255] or None, fps=number(document.get("fps")),
        p50_ms=max(p50s) if p50s else None, p99_ms=max(p99s) if p99s else None,
        received=integer(frames.get("received")),
        results=sum(results) if results else integer(frames.get("results")),
        dropped=integer(frames.get("dropped")), errors=sum(errors) if errors else None)
