"""Operations endpoints: `GET /health` (open even with API keys) and Prometheus `GET /metrics`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import gpu

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Model, device, GPU memory and queue")
async def health(request: Request) -> dict:
    """Whether the model is loaded, where it runs, GPU memory and how many requests wait for it."""
    state = request.app.state
    backend = getattr(state, "backend", None)
    if backend is None:
        return {"status": "loading", "model_loaded": False}
    info, queue = backend.info, getattr(backend, "queue", None)
    waiting = None if queue is None else {"waiting": queue.waiting(), "busy": queue.busy, "limit": queue.max_waiting}
    return {
        "status": "ok",
        "model_loaded": True,
        "model": info.name,
        "backend": info.extra.get("backend", "local"),
        "device": info.device,
        "dtype": info.dtype,
        "quantization": info.quantization,
        "context_window": info.context_window,
        "gpu_memory": [device.to_dict() for device in gpu.memory_report()],
        "queue": waiting,
        "uptime_seconds": round(time.time() - state.started_at, 1),
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
