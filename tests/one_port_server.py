"""`python -m internlm_app serve` for the one-port tests, with three test knobs (environment variables):

- ONE_PORT_LOAD_GATE: a file path; loading the model waits (logging a step) until that file exists, so a test can see
  the server while it loads;
- BROWSER_TEST_TOKEN_DELAY: seconds slept before every forward pass (generation stays real, only paced like a 7B on a
  GPU, so replies overlap);
- ONE_PORT_EXPORT_LIFETIME: seconds an export stays in the media store (the app's default is 10).
"""

from __future__ import annotations

import os
import sys

import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.web import history
from tests.browser_server import paced_load

if __name__ == "__main__":
    torch.set_num_threads(1)  # the tests' reference behaviour, and calm on a 2-core CI machine
    ChatEngine.load = paced_load(ChatEngine.load.__func__)
    history.EXPORT_LIFETIME_SECONDS = float(os.environ.get("ONE_PORT_EXPORT_LIFETIME", history.EXPORT_LIFETIME_SECONDS))
    from internlm_app.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
