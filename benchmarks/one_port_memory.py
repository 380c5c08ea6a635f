"""Resident memory of the one-port server (`python -m internlm_app serve`: web app + API, one model) against the two
processes it replaces, web-only (`streamlit run app.py`) and API-only (`python -m internlm_app api`), together.

Each server runs alone, one after the other, on a free port of 127.0.0.1 with the same model. Each face gets the same
work: the web app one chat reply in headless Chromium (Debian's /usr/bin/chromium via Playwright; the web-only server
loads its model on that first visit), the API one `POST /` reply. Then the RSS of the server process is read
(and the kernel's high-water mark, VmHWM; Linux). Headline: one-port RSS / (web-only RSS + API-only RSS).

On the tiny fixture (about 1 MB of weights) the saving is the second Python runtime (torch, transformers, Streamlit);
the weights are noise. `--hidden H --layers L` loads a random Llama of that size instead, so the duplicated model shows
(a second copy of InternLM2-7B would be 15.5 GB of GPU memory, which a 24 GB card cannot hold).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import FIXTURE_DIR, ROOT, build_random_llama, free_port, headline, parser, workdir

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT = 300.0
MB = 1024 * 1024


def server_env(work: Path, model: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERNLM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        INTERNLM_MODEL_PATH=str(model),
        INTERNLM_DEVICE="cpu",
        INTERNLM_CACHE_DIR=str(work / "cache"),
        INTERNLM_DB_PATH=str(work / "conversations.db"),
        INTERNLM_MAX_NEW_TOKENS="16",
        INTERNLM_TEMPERATURE="0",
    )
    return env


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(url: str, ready, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not get ready ({url}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if ready(*get(url)):
                return
        except OSError:
            pass
        time.sleep(0.2)


def api_reply(base: str) -> None:
    request = urllib.request.Request(
        base + "/", data=json.dumps({"prompt": "你好"}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.loads(response.read())["status"] == 200


def web_reply(base: str) -> None:
    """One chat turn in headless Chromium, as a user would do it."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        page.goto(base)
        box = page.locator(".st-key-prompt textarea")
        expect(box).to_be_enabled(timeout=START_TIMEOUT * 1000)  # after the model loaded
        box.fill("你好")
        box.press("Enter")
        expect(page.get_by_text("tokens ·")).to_be_visible(timeout=120_000)
        browser.close()


def process_memory(pid: int) -> tuple[float, float]:
    """RSS and peak RSS (VmRSS, VmHWM from /proc) of a server process, in MiB (each server is one process)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(name: str, command: list[str], work: Path, model: Path, web: bool, api: bool) -> tuple[float, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *(part.format(port=port) for part in command)],
            cwd=ROOT,
            env=server_env(work / name, model),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        if api:  # the API's /health says when the model is loaded (the one-port server opens its port before that)
            wait_for(base + "/health", lambda status, body: status == 200 and b'"ok"' in body, process, log)
            api_reply(base)
        else:
            wait_for(base + "/_stcore/health", lambda status, body: status == 200, process, log)
        if web:
            web_reply(base)
        time.sleep(1.0)
        return process_memory(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=0, help="load a random Llama of this hidden size (0: the fixture)")
    p.add_argument("--layers", type=int, default=4, help="layers of that random Llama")
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"needs Debian's chromium at {CHROMIUM} (the web face is driven by a browser)")
    with workdir("one-port-memory") as tmp:
        work = Path(tmp)
        model, label = FIXTURE_DIR, "the tiny InternLM2 fixture"
        if args.hidden:
            model = build_random_llama(work / "model", hidden=args.hidden, layers=args.layers)
            label = f"a random Llama (hidden {args.hidden}, {args.layers} layers)"
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / MB
        print(f"model: {label}, {weights:.1f} MiB of weights on disk (float32 on the CPU)")
        bind = ["--host", "127.0.0.1", "--port", "{port}"]
        one, one_peak = measure("one-port", ["-m", "internlm_app", "serve", *bind], work, model, True, True)
        streamlit = ["-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1", "--server.port", "{port}"]
        web, web_peak = measure("web-only", streamlit, work, model, True, False)
        api, api_peak = measure("api-only", ["-m", "internlm_app", "api", *bind], work, model, False, True)
    rows = [
        ("one-port (python -m internlm_app serve)", one, one_peak),
        ("web-only (streamlit run app.py)", web, web_peak),
        ("API-only (python -m internlm_app api)", api, api_peak),
        ("web-only + API-only", web + api, web_peak + api_peak),
    ]
    for label, rss, peak in rows:
        print(f"{label:<42} RSS {rss:7.0f} MiB   peak {peak:7.0f} MiB")
    print(f"saved by one port: {web + api - one:.0f} MiB RSS ({(web + api - one) / (web + api):.0%})")
    headline("one_port_memory", one / (web + api))


if __name__ == "__main__":
    main()
