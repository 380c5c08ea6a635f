"""`streamlit run app.py` for the browser tests, each forward pass of the real model optionally slowed down."""

# The tiny model writes ~500 tokens/s on a CPU, too fast to click "stop" mid-reply. BROWSER_TEST_TOKEN_DELAY
# (seconds) sleeps before every forward pass: generation stays real, only paced like a 7B model on a GPU.

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.load_progress import LoadStep


def paced_load(load):
    """ChatEngine.load that waits for the file ONE_PORT_LOAD_GATE names (when set: a test holds the load there),
    then sleeps BROWSER_TEST_TOKEN_DELAY seconds before every forward pass of the loaded model."""
    gate = os.environ.get("ONE_PORT_LOAD_GATE")
    delay = float(os.environ.get("BROWSER_TEST_TOKEN_DELAY", "0"))

    def paced(cls, settings, progress=None):
        if gate:
            # Reported as a download step with real-looking numbers: what the page and /health show for it.
            progress(LoadStep("download", 1_550_000_000, 15_500_000_000, 1, 8, "model-00002-of-00008.bin"))
            while not Path(gate).exists():
                time.sleep(0.05)
        engine = load(cls, settings, progress=progress)
        if delay:
            engine.model.register_forward_pre_hook(lambda *_: time.sleep(delay))
        return engine

    return classmethod(paced)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the tests' reference behaviour, and calm on a 2-core CI machine
    ChatEngine.load = paced_load(ChatEngine.load.__func__)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", "app.py", *sys.argv[1:]]
    sys.exit(cli.main())
