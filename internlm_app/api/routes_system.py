"""Operations endpoints: `GET /health` (open even with API keys: liveness only without one) and `GET /metrics`."""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from internlm_app.api.auth import key_matches
from internlm_app.api.model_gate import LOAD_FAILED_HINT, bound_backend
from internlm_app.backends.factory import backends_created
from internlm_app.runtime import gpu

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Model, device, GPU memory and queue; or the load's progress", response_model=None)
@router.head("/health", include_in_schema=False, response_model=None)  # (one documented operation: no duplicate id)
async def health(request: Request) -> dict | JSONResponse:
    """Whether the model is loaded (the step while it loads, the error if it failed), where it runs, GPU memory, how
    many requests wait. With API keys set, a request without one learns only whether the server is alive."""
    state = request.app.state
    backend = bound_backend(request.app)
    keys = [key.get_secret_value().encode() for key in state.settings.api_keys]
    details = not keys or key_matches(request.headers.get("authorization"), keys)
    if backend is None:
        status = state.loader.status() if state.loader is not None else None
        if status is not None and status.state == "failed":
            body = {"status": "failed", "model_loaded": False}
            if details:
                body.update(error=status.error, what_to_do=LOAD_FAILED_HINT)
            return JSONResponse(body, status_code=503)
        body = {"status": "loading", "model_loaded": False}
        if details and status is not None:
            body.update(step=status.step or "starting", elapsed_seconds=round(status.elapsed, 1))
        return body
    # A remote backend asks its server (blocking, up to 2 s): off the event loop; the local engine answers at once.
    problem = backend.unavailable() if backend.local else await anyio.to_thread.run_sync(backend.unavailable)
    if problem is not None:  # a remote model server that does not answer
        body = {"status": "unavailable", "model_loaded": True}
        return JSONResponse({**body, "error": problem} if details else body, status_code=503)
    if not details:
        return {"status": "ok", "model_loaded": True}  # liveness for anyone; the model, GPU and queue for key holders
    info, queue = backend.info, backend.queue
    waiting = None
    if queue is not None:
        waiting = {
            "waiting": queue.waiting(),
            "active": queue.active,  # replies generating now
            "slots": queue.slots,  # most replies generating at once (the batch size)
            "busy": queue.busy,  # every slot taken: a new request waits (see README, "Serving one user and many")
            "limit": queue.max_waiting,
        }
    decoding = backend.decoding()
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
        "decoding": None if decoding is None else decoding.to_dict(),
        "uptime_seconds": round(time.time() - state.started_at, 1),
        "models_loaded_by_process": backends_created(),  # 1 when the web app and the API share one model
    }


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
