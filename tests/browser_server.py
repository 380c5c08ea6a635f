"""`streamlit run app.py` for the browser tests, each forward pass of the real model optionally slowed down."""

# The tiny model writes ~500 tokens/s on a CPU, too fast to click "stop" mid-reply. BROWSER_TEST_TOKEN_DELAY
# (seconds) sleeps before every forward pass: generation stays real, only paced like a 7B model on a GPU.

from __future__ import annotations

import os
import sys
import time

import torch

from internlm_app.engine import ChatEngine


def _slow_load(load):
    delay = float(os.environ.get("BROWSER_TEST_TOKEN_DELAY", "0"))

    def slow(cls, settings, progress=None):
        engine = load(cls, settings, progress=progress)
        if delay:
            engine.model.register_forward_pre_hook(lambda *_: time.sleep(delay))
        return engine

    return classmethod(slow)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the tests' reference behaviour, and calm on a 2-core CI machine
    ChatEngine.load = _slow_load(ChatEngine.load.__func__)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", "app.py", *sys.argv[1:]]
    sys.exit(cli.main())
