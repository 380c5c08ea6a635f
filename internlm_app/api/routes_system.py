"""Operations endpoints: `GET /health` (open even with API keys: liveness only without one) and `GET /metrics`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import gpu
from .auth import key_matches

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Model, device, GPU memory and queue")
async def health(request: Request) -> dict:
    """Whether the model is loaded, where it runs, GPU memory and how many requests wait for it."""
    state = request.app.state
    backend = getattr(state, "backend", None)
    if backend is None:
        return {"status": "loading", "model_loaded": False}
    keys = [key.get_secret_value().encode() for key in state.settings.api_keys]
    if keys and not key_matches(request.headers.get("authorization"), keys):
        return {"status": "ok", "model_loaded": True}  # liveness for anyone; the model, GPU and queue for key holders
    info, queue = backend.info, getattr(backend, "queue", None)
    waiting = None
    if queue is not None:
        waiting = {
            "waiting": queue.waiting(),
            "active": queue.active,  # replies generating now
            "slots": queue.slots,  # most replies generating at once (the batch size)
            "busy": queue.busy,  # every slot taken: a new request waits
            "limit": queue.max_waiting,
        }
    plan = getattr(backend, "plan", None)
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
        "decoding": None if plan is None else plan.to_dict(),
        "uptime_seconds": round(time.time() - state.started_at, 1),
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
