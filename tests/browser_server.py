"""`streamlit run app.py` for the browser tests, the real model's load optionally held and its forward passes paced.

Two test knobs (environment variables), given to the app through its own seam for a backend factory
(`web.resources.use_backend_factory`; the one-port server takes a BackendLoader, see tests/one_port_server.py):

- BROWSER_TEST_TOKEN_DELAY: seconds slept before every forward pass. The tiny model writes ~500 tokens/s on a CPU,
  too fast to click "stop" mid-reply: generation stays real, only paced like a 7B model on a GPU;
- ONE_PORT_LOAD_GATE: a file path; the load waits (reporting a download step) until that file exists, so a test can
  see the app while it loads.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.backends.factory import create_backend
from internlm_app.chat_types import ChatBackend
from internlm_app.load_progress import LoadStep, Progress
from internlm_app.settings import ModelSettings


def paced_backend(settings: ModelSettings, progress: Progress | None = None) -> ChatBackend:
    """create_backend that first waits for the file ONE_PORT_LOAD_GATE names (when set: a test holds the load
    there), then sleeps BROWSER_TEST_TOKEN_DELAY seconds before every forward pass of the loaded model."""
    gate = os.environ.get("ONE_PORT_LOAD_GATE")
    delay = float(os.environ.get("BROWSER_TEST_TOKEN_DELAY", "0"))
    if gate:
        # Reported as a download step with real-looking numbers: what the page and /health show for it.
        if progress is not None:
            progress(LoadStep("download", 1_550_000_000, 15_500_000_000, 1, 8, "model-00002-of-00008.bin"))
        while not Path(gate).exists():
            time.sleep(0.05)
    backend = create_backend(settings, progress=progress)
    if delay and isinstance(backend, ChatEngine):  # the in-process model (a remote backend has its own pace)
        backend.model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    return backend


if __name__ == "__main__":
    torch.set_num_threads(1)  # the tests' reference behaviour, and calm on a 2-core CI machine
    from internlm_app.web import resources

    resources.use_backend_factory(paced_backend)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", "app.py", *sys.argv[1:]]
    sys.exit(cli.main())
