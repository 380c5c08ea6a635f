"""The HTTP API: the classic `POST /` contract and OpenAI-compatible `/v1`, on one ChatBackend.

`app.create_app` builds the FastAPI app (the factory); `server` runs it with uvicorn. Both are re-exported here.
"""

from internlm_app.api.app import create_app
from internlm_app.api.server import running_server, serve

__all__ = ["create_app", "running_server", "serve"]
