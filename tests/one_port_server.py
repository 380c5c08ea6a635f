"""`python -m internlm_app serve` for the one-port tests: `server.serve(settings, loader)` with a loader that makes
its backend through tests/browser_server.py's `paced_backend`. Settings come from the environment (INTERNLM_HOST,
INTERNLM_PORT and the rest), and three test knobs:

- ONE_PORT_LOAD_GATE: a file path; loading the model waits (reporting a step) until that file exists, so a test can
  see the server while it loads;
- BROWSER_TEST_TOKEN_DELAY: seconds slept before every forward pass (generation stays real, only paced like a 7B on a
  GPU, so replies overlap);
- ONE_PORT_EXPORT_LIFETIME: seconds an export stays in the media store (the app's default is 10).
"""

from __future__ import annotations

import os

import torch

from internlm_app.backends.factory import BackendLoader
from internlm_app.server import serve
from internlm_app.settings import Settings
from internlm_app.web import history
from tests.browser_server import paced_backend

if __name__ == "__main__":
    torch.set_num_threads(1)  # the tests' reference behaviour, and calm on a 2-core CI machine
    history.EXPORT_LIFETIME_SECONDS = float(os.environ.get("ONE_PORT_EXPORT_LIFETIME", history.EXPORT_LIFETIME_SECONDS))
    settings = Settings()
    serve(settings, BackendLoader(settings, create=paced_backend))
