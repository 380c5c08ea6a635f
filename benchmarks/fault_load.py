"""Fault and load trial of the API, the web app and the CLI on the tiny fixture, as an attacker and a load tester would.

- Bad inputs, each answered cleanly or not: API requests that are malformed, out of bounds, not Unicode, oversized or
  cut short (clean: a 4xx JSON answer, or 200 where the input is valid, no traceback in the server log, the server
  healthy after); web URL values, typed Markdown and import files (clean: no exception on the page, no image and no
  data:/javascript: link in what it renders, a bad import refused with nothing changed); CLI flags, stdin that is not
  UTF-8 and broken checkpoints (clean: the expected exit code, one `error:` line, no traceback).
- Concurrent streams held: N streamed chat completions at once against the API, each ending in `[DONE]`.
- Faults survived: kill -9 of the API server mid-reply (it restarts and serves); kill -9 of the web server mid-reply
  in a real browser (the conversation and its partial reply are there after the restart); the conversation database
  on a full disk, on a read-only disk and damaged (a clear message, the typed text kept, nothing written to the
  damaged file); a full disk while converting (one line, nothing half-written left). Run as root, the disks are real
  (a tmpfs in a private mount namespace); otherwise SQLite's own errors are caused as in tests/store_faults.py.
- Data lost: saved messages missing after a fault, and typed messages not given back.
Headline (last line): fault_load = (clean bad inputs + held streams + survived faults) / everything tried.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from common import FIXTURE_DIR, ROOT, free_port, headline, parser, workdir

from internlm_app.store.db import ConversationStore
from tests.store_faults import fingerprint, make_disk_full, make_read_only, not_a_database

PY = sys.executable
TRIED: dict[str, list[tuple[str, bool]]] = {"api": [], "web": [], "cli": [], "streams": [], "faults": []}
LOST = {"messages": 0, "typed": 0}


def note(kind: str, name: str, ok: bool, detail: str = "") -> None:
    TRIED[kind].append((name, ok))
    if not ok or kind == "faults":
        print(f"  {kind} {name}: {'ok' if ok else 'NOT clean'} {detail}".rstrip(), flush=True)


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERNLM_")}
    env.update({"PYTHONPATH": str(ROOT), "INTERNLM_MODEL_PATH": str(FIXTURE_DIR), "INTERNLM_DEVICE": "cpu"})
    env.update({"INTERNLM_CACHE_DIR": str(tmp / "cache"), "INTERNLM_DB_PATH": str(tmp / "conversations.db")})
    return {**env, **extra}


# ----- real disks: a private mount namespace when root, else SQLite's errors caused directly -----


def real_disks() -> bool:
    return os.environ.get("FAULT_LOAD_NAMESPACE") == "1"


MOUNTS: list[Path] = []


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    MOUNTS.append(path)


def unmount_all() -> None:
    """Lazily: the web app's cached stores still hold their files open (the namespace goes with this process)."""
    while MOUNTS:
        subprocess.run(["umount", "-l", str(MOUNTS.pop())], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


# ----- API -----


def start_api(tmp: Path, port: int, log: Path) -> subprocess.Popen:
    command = [PY, "-m", "internlm_app", "api", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env_for(tmp), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the API did not start:\n{log.read_text()[-2000:]}")


def send_and_leave(port: int, data: bytes) -> None:
    """Send bytes as they are (a body shorter than its Content-Length) and go away."""
    with socket.create_connection(("127.0.0.1", port), timeout=40) as s:
        s.sendall(data)


def api_bad_inputs(url: str, port: int, log: Path) -> None:
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    cases = {
        "not JSON": ("POST", "/", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        "no prompt": ("POST", "/", {"json": {}}),
        "prompt a number": ("POST", "/", {"json": {"prompt": 123}}),
        "temperature -1": ("POST", "/", {"json": {"prompt": "hi", "temperature": -1}}),
        "temperature text": ("POST", "/", {"json": {"prompt": "hi", "temperature": "hot"}}),
        "top_p 2": ("POST", "/", {"json": {"prompt": "hi", "top_p": 2}}),
        "max_new_tokens 0": ("POST", "/", {"json": {"prompt": "hi", "max_new_tokens": 0}}),
        "history not a list": ("POST", "/", {"json": {"prompt": "hi", "history": "x"}}),
        "lone surrogate": ("POST", "/", {"content": b'{"prompt": "\\ud800"}'}),
        "not UTF-8": ("POST", "/", {"content": b'{"prompt": "\xff\xfe"}'}),
        "NaN": ("POST", "/", {"content": b'{"prompt": "hi", "temperature": NaN}'}),
        "prompt over the window": ("POST", "/", {"json": {"prompt": "word " * 5000}}),
        "body over 1 MiB": ("POST", "/", {"json": {"prompt": "x" * (2 << 20)}}),
        "nested 100k deep": ("POST", "/", {"content": b"[" * 100_000 + b"]" * 100_000}),
        "v1 empty body": ("POST", chat, {"json": {}}),
        "v1 no messages": ("POST", chat, {"json": {"messages": []}}),
        "v1 role robot": ("POST", chat, {"json": {"messages": [{"role": "robot", "content": "hi"}]}}),
        "v1 lone surrogate": ("POST", chat, {"content": b'{"messages": [{"role": "user", "content": "\\udfff"}]}'}),
        "v1 five stops": ("POST", chat, {"json": {"messages": user, "stop": ["a", "b", "c", "d", "e"]}}),
        "v1 100 KB stop": ("POST", chat, {"json": {"messages": user, "stop": ["x" * 100_000]}}),
        "v1 max_tokens -1": ("POST", chat, {"json": {"messages": user, "max_tokens": -1}}),
        "v1 stream not bool": ("POST", chat, {"json": {"messages": user, "stream": "yes please"}}),
        "v1 image content": (
            "POST",
            chat,
            {"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}},
        ),
        "v1 temperature 1e-45 (valid: greedy)": ("POST", chat, {"json": {"messages": user, "temperature": 1e-45}}),
        "unknown path": ("GET", "/no/such/path", {}),
        "PUT on /": ("PUT", "/", {"json": {"prompt": "hi"}}),
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, (method, path, kwargs) in cases.items():
            size = log.stat().st_size
            try:
                response = client.request(method, path, **kwargs)
                status, body_ok = response.status_code, response.headers.get("content-type", "").startswith("appl")
            except httpx.HTTPError as exc:
                status, body_ok = 0, False
                print(f"  api {name}: {exc!r}")
            valid = "valid" in name
            clean = (status == 200 if valid else 400 <= status < 500) and body_ok
            clean = clean and "Traceback" not in log.read_text(errors="replace")[size:]
            clean = clean and client.get("/health").status_code == 200
            note("api", name, clean, f"status {status}")
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        size = log.stat().st_size
        send_and_leave(port, head + b'{"prompt": ')
        deadline, logged = time.monotonic() + 10, ""
        while "POST / 400" not in logged and time.monotonic() < deadline:  # the server logs what it answered
            time.sleep(0.1)
            logged = log.read_text(errors="replace")[size:]
        note("api", "body cut short", "POST / 400" in logged and "Traceback" not in logged, logged[-200:])


def api_streams(url: str, count: int) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me about Shanghai."}], "stream": True, "max_tokens": 48}
    results: list[bool] = []
    barrier = threading.Barrier(count)

    def one() -> None:
        done = False
        try:
            barrier.wait(30)
            with (
                httpx.Client(timeout=120) as client,
                client.stream("POST", url + "/v1/chat/completions", json=body) as r,
            ):
                done = r.status_code == 200 and any(line == "data: [DONE]" for line in r.iter_lines())
        finally:
            results.append(done)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for i, held in enumerate(results + [False] * (count - len(results))):
        note("streams", f"stream {i}", held)


def api_kill9(tmp: Path, server: subprocess.Popen, url: str, port: int, log: Path) -> subprocess.Popen:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True, "max_tokens": 400}
    got_chunk = False
    try:
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got_chunk = True
                    os.kill(server.pid, signal.SIGKILL)  # mid-reply
                    break
    except httpx.HTTPError:
        pass
    server.wait(30)
    restarted = start_api(tmp, port, log)
    reply = httpx.post(url + "/", json={"prompt": "hello", "max_new_tokens": 8}, timeout=60)
    note("faults", "api kill -9 mid-reply", got_chunk and reply.status_code == 200, "(restarted, answers)")
    return restarted


def api_part(tmp: Path, streams: int) -> None:
    port, log = free_port(), tmp / "api.log"
    url = f"http://127.0.0.1:{port}"
    server = start_api(tmp, port, log)
    try:
        api_bad_inputs(url, port, log)
        api_streams(url, streams)
        server = api_kill9(tmp, server, url, port, log)
    finally:
        server.terminate()
        server.wait(30)


# ----- web (AppTest in this process; kill -9 with a real browser) -----


def web_env(tmp: Path, db: Path) -> None:
    os.environ.update({k: v for k, v in env_for(tmp).items() if k.startswith("INTERNLM_")})
    os.environ.update({"INTERNLM_DB_PATH": str(db), "INTERNLM_MAX_NEW_TOKENS": "16"})


def run_page(query: dict | None = None, page: str = "app.py"):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update(query or {})
    at.run()
    if page != "app.py":
        at.switch_page(page).run()
    return at


def rendered_safe(at) -> bool:
    """No image and no unsafe link in any Markdown the page sends to the browser (parsed as CommonMark)."""
    from markdown_it import MarkdownIt

    from internlm_app.web.safe_markdown import safe_link

    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    md.validateLink = lambda url: True
    elements = [*at.markdown, *at.warning, *at.error, *at.caption, *at.info, *at.success]
    for text in [str(e.value) for e in elements] + [b.label for b in at.button]:
        for token in md.parse(text):
            for child in token.children or ():
                if child.type == "image" or (child.type == "link_open" and not safe_link(child.attrGet("href"))):
                    return False
    return True


def web_bad_inputs(tmp: Path) -> None:
    db = tmp / "web-bad.db"
    web_env(tmp, db)
    for value in [
        "[Session expired – log in again](https://evil.example/login)",
        "![x](http://img.evil.example/c.png)",
        "<script>alert(1)</script>",
        "x" * 5000,
        "../../etc/passwd",
        "'; DROP TABLE conversations;--",
        "\u202eevil\u202c",
    ]:
        at = run_page({"c": value})
        note("web", f"?c={value[:30]!r}", not at.exception and bool(at.warning) and rendered_safe(at))
    for text in [
        "![x](http://img.evil.example/typed.png)",
        "[a](javascript:alert(1)) [b](data:text/html,x) <data:text/html,y>",
        '<img src="http://img.evil.example/html.png">',
        "word " * 3000,  # longer than the context window
    ]:
        at = run_page()
        at.chat_input(key="prompt").set_value(text).run()
        note("web", f"typed {text[:30]!r}", not at.exception and rendered_safe(at))
    store = ConversationStore(db)
    base = {"format": "internlm-chat-export", "version": 1}
    good = {**base, "conversations": [{"title": "![t](http://img.evil.example/t.png)", "messages": []}]}
    imports = {
        "not JSON": b"{nope",
        "a JSON array": b"[]",
        "another format": json.dumps({"format": "x", "version": 1}).encode(),
        "version 99": json.dumps({**base, "version": 99}).encode(),
        "role robot": json.dumps(
            {**base, "conversations": [{"messages": [{"role": "robot", "content": "x"}]}]}
        ).encode(),
        "lone surrogate": b'{"format": "internlm-chat-export", "version": 1, "conversations": [{"title": "\\ud800"}]}',
        "nested 50k deep": b"[" * 50_000 + b"]" * 50_000,
        "binary": bytes(range(256)) * 10,
        "stats of the wrong type": json.dumps(
            {**base, "conversations": [{"messages": [{"role": "assistant", "content": "x", "stats": {"error": 5}}]}]}
        ).encode(),
    }
    for name, data in imports.items():
        before = len(store.list_conversations(limit=None))
        at = run_page(page="internlm_app/web/views/history.py")
        at.file_uploader(key="import_file_0").set_value(("x.json", data, "application/json")).run()
        at.button(key="import_button").click().run()
        unchanged = len(store.list_conversations(limit=None)) == before
        note("web", f"import {name}", not at.exception and bool(at.error) and unchanged and rendered_safe(at))
    at = run_page(page="internlm_app/web/views/history.py")
    at.file_uploader(key="import_file_0").set_value(("x.json", json.dumps(good).encode(), "application/json")).run()
    at.button(key="import_button").click().run()
    note("web", "import a hostile title", not at.exception and bool(at.success) and rendered_safe(run_page()))


def seed(db: Path) -> tuple[str, list[str]]:
    store = ConversationStore(db)
    cid = store.create_conversation("", title="kept")
    for text in ("hello", "hi there", "how are you?", "fine"):
        store.add_message(cid, "user" if text in ("hello", "how are you?") else "assistant", text)
    store.close()
    return cid, ["hello", "hi there", "how are you?", "fine"]


def contents(db: Path, cid: str) -> list[str]:
    store = ConversationStore(db)
    try:
        return [m.content for m in store.get_conversation(cid).messages]
    finally:
        store.close()


def typed_on_fault(tmp: Path, db: Path, cid: str, expected: str) -> bool:
    """Type a message into the conversation; True when the page says `expected` and gives the text back."""
    web_env(tmp, db)
    at = run_page({"c": cid})
    typed = "a message typed while the disk fails " + "字" * 3000
    at.chat_input(key="prompt").set_value(typed).run()
    proto = at.chat_input(key="prompt").proto
    kept = proto.set_value and proto.value == typed
    LOST["typed"] += 0 if kept else 1
    errors = "\n".join(str(e.value) for e in at.error)
    return not at.exception and expected in errors and str(db) in errors and kept and len(at.chat_message) == 4


def web_store_faults(tmp: Path) -> None:
    import pytest

    for fault, expected in (("full disk", "磁盘已满"), ("read-only disk", "是只读的")):
        disk = tmp / fault.replace(" ", "-")
        db = disk / "conversations.db"
        patch = pytest.MonkeyPatch()
        if real_disks():
            mount_tmpfs(disk, "512k")
            cid, before = seed(db)
            if fault == "full disk":
                filler = fill(disk)
            else:
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            method = "real tmpfs"
        else:
            cid, before = seed(db)
            (make_disk_full if fault == "full disk" else make_read_only)(patch)
            method = "SQLite errors caused"
        survived = typed_on_fault(tmp, db, cid, expected)
        patch.undo()
        if real_disks():
            if fault == "full disk":
                filler.unlink()
            else:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        after = contents(db, cid)
        LOST["messages"] += sum(1 for text in before if text not in after)
        note("faults", f"web {fault}", survived and after == before, f"({method}; read and kept the typed text)")
    db = tmp / "damaged" / "conversations.db"
    seed(db)
    not_a_database(db)
    before = fingerprint(db)
    web_env(tmp, db)
    at = run_page()
    offered = (
        not at.exception and any("已损坏" in str(e.value) for e in at.error) and at.button(key="store_start_fresh")
    )
    at.button(key="store_start_fresh").click().run()
    at.chat_input(key="prompt").set_value("a fresh start").run()
    fresh_ok = not at.exception and "a fresh start" in str(contents_of_all(db.with_name("conversations-fresh.db")))
    untouched = fingerprint(db) == before
    note("faults", "web damaged database", bool(offered) and fresh_ok and untouched, "(file untouched, fresh db used)")


def contents_of_all(db: Path) -> list[str]:
    store = ConversationStore(db)
    try:
        return [m.content for s in store.list_conversations() for m in store.get_conversation(s.id).messages]
    finally:
        store.close()


def web_kill9(tmp: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.browser_helpers import CHROMIUM, chromium, send, streamlit_server, tiny_model_env, wait_for_text

    if not CHROMIUM.exists():
        print("  faults web kill -9: not run (no /usr/bin/chromium)")
        return
    home = tmp / "kill9"
    home.mkdir()
    env = tiny_model_env(home, INTERNLM_TEMPERATURE="0", INTERNLM_REPETITION_PENALTY="2.0")
    env.update({"INTERNLM_MAX_NEW_TOKENS": "280", "BROWSER_TEST_TOKEN_DELAY": "0.03"})
    db = home / "conversations.db"
    cid, before = seed(db)
    with chromium() as browser:
        with streamlit_server(env, home / "server1.log") as url:
            page = browser.new_page()
            page.goto(f"{url}/?c={cid}")
            page.locator(".st-key-prompt textarea").wait_for(timeout=90_000)
            send(page, "写一个很长的故事")
            wait_for_text(page, 5, min_chars=20, timeout_ms=60_000)
            time.sleep(2.5)  # past one periodic save of the partial reply
            pid = int(
                subprocess.run(
                    ["pgrep", "-f", f"server.port {url.rsplit(':', 1)[1]}"], capture_output=True, text=True
                ).stdout.split()[0]
            )
            os.kill(pid, signal.SIGKILL)
            page.close()
        with streamlit_server(env, home / "server2.log") as url:
            page = browser.new_page()
            page.goto(f"{url}/?c={cid}")
            page.locator('[data-testid="stChatMessage"]').nth(5).wait_for(timeout=90_000)
            shown = page.get_by_text("生成被中断").count() > 0
    after = contents(db, cid)
    LOST["messages"] += sum(1 for text in [*before, "写一个很长的故事"] if text not in after)
    partial = after[-1] if len(after) == 6 else ""
    ok = after[:5] == [*before, "写一个很长的故事"] and len(partial) > 0 and shown
    note("faults", "web kill -9 mid-reply", ok, f"(conversation kept, {len(partial)} chars of the reply saved)")


# ----- CLI -----


def cli(tmp: Path, args: list[str], stdin: bytes = b"hi\n", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "internlm_app", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        cwd=tmp,
        env=env_for(tmp, **env),
    )


def one_error_line(result: subprocess.CompletedProcess, code: int) -> bool:
    err = result.stderr.decode(errors="replace")
    return (
        result.returncode == code and "Traceback" not in err and sum(1 for x in err.splitlines() if "error:" in x) == 1
    )


def broken_copies(tmp: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    copies = {}
    for name in ("truncated", "quantized", "bad-config"):
        copies[name] = tmp / name
        shutil.copytree(FIXTURE_DIR, copies[name])
    with open(copies["truncated"] / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    tensors = load_file(str(copies["quantized"] / "model.safetensors"))
    quantized = {k: (v * 100).to(torch.int8) for k, v in tensors.items()}
    save_file(quantized, str(copies["quantized"] / "model.safetensors"))
    (copies["bad-config"] / "config.json").write_text('{"model_type": "intern')
    return copies


def cli_part(tmp: Path) -> None:
    copies = broken_copies(tmp)
    (tmp / "a-file").write_text("")
    model = ["--model-path", str(FIXTURE_DIR)]
    cases = {
        "a line that is not UTF-8": (["chat", *model, "--max-new-tokens", "8"], b"\xff\xfe\nhello\n", 0, {}),
        "--temperature 9": (["chat", *model, "--temperature", "9"], b"hi\n", 2, {}),
        "--dtype int8": (["chat", *model, "--dtype", "int8"], b"hi\n", 2, {}),
        "INTERNLM_DTYPE=fp16": (["chat", *model], b"hi\n", 2, {"INTERNLM_DTYPE": "fp16"}),
        "a model path that is absent": (["chat", "--model-path", str(tmp / "nope")], b"hi\n", 2, {}),
        "truncated weights": (["chat", "--model-path", str(copies["truncated"])], b"hi\n", 2, {}),
        "quantized (int8) weights": (["chat", "--model-path", str(copies["quantized"])], b"hi\n", 2, {}),
        "config.json cut short": (["chat", "--model-path", str(copies["bad-config"])], b"hi\n", 2, {}),
        "convert into a file": (["convert", str(FIXTURE_DIR), str(tmp / "a-file")], b"", 2, {}),
    }
    for name, (args, stdin, code, env) in cases.items():
        note("cli", name, one_error_line(cli(tmp, args, stdin, **env), code))
    out = tmp / "disk" / "converted"
    if real_disks():
        mount_tmpfs(tmp / "disk", "400k")  # smaller than the converted checkpoint (~0.9 MB)
        result, method = cli(tmp, ["convert", str(FIXTURE_DIR), str(out)], b""), "real tmpfs"
    else:
        inject = (
            "import sys; from safetensors import SafetensorError; from internlm_app import cli\n"
            "from internlm_app.runtime import convert\n"
            "def full(*a, **k): raise SafetensorError('Error while serializing: I/O error: No space left on device "
            "(os error 28)')\n"
            "convert.save_file = full; sys.exit(cli.main(sys.argv[1:]))"
        )
        command = [PY, "-c", inject, "convert", str(FIXTURE_DIR), str(out)]
        result = subprocess.run(command, capture_output=True, timeout=300, cwd=tmp, env=env_for(tmp))
        method = "ENOSPC caused in the writer"
    err = result.stderr.decode(errors="replace")
    left = out.exists() or out.with_name(out.name + ".partial").exists()
    ok = one_error_line(result, 2) and "No space left on device" in err and not left
    note("faults", "cli full disk while converting", ok, f"({method}; nothing half-written left)")


# ----- main -----


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--streams", type=int, default=16, help="concurrent API streams")
    p.add_argument("--no-browser", action="store_true", help="leave out the web kill -9 (needs Chromium)")
    args = p.parse_args()
    if os.geteuid() == 0 and shutil.which("unshare") and os.environ.get("FAULT_LOAD_NAMESPACE") is None:
        command = ["unshare", "--mount", "--propagation", "private", PY, *sys.argv]
        env = {**os.environ, "FAULT_LOAD_NAMESPACE": "1"}
        if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0:
            sys.exit(subprocess.run(command, env=env).returncode)
    from common import set_threads

    set_threads(args.threads)
    print(f"disks: {'real tmpfs in a private mount namespace' if real_disks() else 'SQLite errors caused'}")
    started = time.perf_counter()
    with workdir("fault-load") as name:
        tmp = Path(name)
        try:
            api_part(tmp, args.streams)
            web_bad_inputs(tmp)
            web_store_faults(tmp)
            if not args.no_browser:
                web_kill9(tmp)
            cli_part(tmp)
        finally:
            unmount_all()
    for kind in ("api", "web", "cli"):
        print(f"{kind}_bad_inputs_tried={len(TRIED[kind])}")
        print(f"{kind}_bad_inputs_clean={sum(ok for _, ok in TRIED[kind])}")
    inputs = TRIED["api"] + TRIED["web"] + TRIED["cli"]
    print(f"bad_inputs_clean={sum(ok for _, ok in inputs)}/{len(inputs)}")
    print(f"concurrent_streams_held={sum(ok for _, ok in TRIED['streams'])}/{len(TRIED['streams'])}")
    print(f"faults_survived={sum(ok for _, ok in TRIED['faults'])}/{len(TRIED['faults'])}")
    print(f"data_lost_messages={LOST['messages']}")
    print(f"typed_messages_lost={LOST['typed']}")
    print(f"seconds={time.perf_counter() - started:.0f}")
    everything = [ok for items in TRIED.values() for _, ok in items]
    headline("fault_load", sum(everything) / len(everything))


if __name__ == "__main__":
    main()
