"""Child process for tests/test_store.py: appends messages, or saves a streaming reply and waits to be killed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from internlm_app.store.db import ConversationStore


def wait_for(go: Path) -> None:
    """Wait (bounded) until the parent creates the `go` file, so the writers start together."""
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)


def append(db: str, cid: str, tag: str, count: int, go: str) -> None:
    """Append `count` user messages named `tag-i`."""
    store = ConversationStore(db)
    print("ready", flush=True)
    wait_for(Path(go))
    for i in range(count):
        store.add_message(cid, "user", f"{tag}-{i}")
        if i % 10 == 0:
            store.list_conversations()
    print("done", flush=True)


def crash(db: str) -> None:
    """Save a user message and a growing streaming reply, report it, then hang until killed."""
    store = ConversationStore(db)
    cid = store.create_conversation("be brief", {"temperature": 0.5})
    store.add_message(cid, "user", "Tell me a story")
    mid = store.add_message(cid, "assistant", "", status="streaming")
    text = ""
    for word in ["Once", " upon", " a", " time", " there", " was"]:
        text += word
        store.update_message(mid, text, "streaming")
    print(json.dumps({"cid": cid, "mid": mid, "text": text}), flush=True)
    time.sleep(60)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "append":
        append(args[0], args[1], args[2], int(args[3]), args[4])
    else:
        crash(args[0])
