"""The command line as a user runs it: a subprocess on the tiny model."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_settings import get_subcommand

from internlm_app.cli import main, parse
from internlm_app.sampling import BOUNDS
from tests.conftest import FIXTURE_DIR

ROOT = FIXTURE_DIR.parents[2]


def _run(args: list[str], tmp_path, stdin: str | bytes = "", **env) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INTERNLM_CACHE_DIR": str(tmp_path / "cache"),
        "INTERNLM_DEVICE": "cpu",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "internlm_app", *args],
        input=stdin,
        capture_output=True,
        text=isinstance(stdin, str),
        timeout=240,
        env=environ,
        cwd=tmp_path,
    )


def test_piped_chat_prints_only_the_replies(engine, tmp_path):
    from internlm_app.sampling import SamplingParams

    lines = ["hello", "你好", "What is 2+2?"]
    messages, expected = [], ""
    for line in lines:
        messages.append({"role": "user", "content": line})
        reply, _ = engine.reply(messages, SamplingParams.greedy_params(20))
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    args = ["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "0", "--max-new-tokens", "20", "--system", ""]
    result = _run(args, tmp_path, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert "converting the checkpoint: shard 1/1" in result.stderr  # progress goes to stderr, never into the replies
    assert "loading the weights into memory (cpu, float32)" in result.stderr


def test_a_line_that_is_not_utf8_is_an_error_and_the_next_line_is_answered(engine, tmp_path):
    from internlm_app.sampling import SamplingParams

    expected, _ = engine.reply([{"role": "user", "content": "hello"}], SamplingParams.greedy_params(20))
    args = ["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "0", "--max-new-tokens", "20", "--system", ""]
    result = _run(args, tmp_path, stdin=b"\xff\xfe\nhello\n", PYTHONIOENCODING="utf-8:strict")  # as en_US.UTF-8
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr, stderr  # a line failed: the status says so
    assert "error: this line is not UTF-8 text (byte 0xff at character 1), so it was not sent" in stderr
    # One output line per input line: an empty one for the refused line, which is not sent again with the next one.
    assert result.stdout.decode() == "\n" + expected + "\n"


def test_a_corrupt_checkpoint_is_one_error_line_not_a_traceback(tmp_path):
    import shutil

    src = tmp_path / "copy"
    shutil.copytree(FIXTURE_DIR, src)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    result = _run(["chat", "--model-path", str(src)], tmp_path, stdin="hi\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "model.safetensors is incomplete or corrupt" in result.stderr
    (tmp_path / "a-file").write_text("")
    result = _run(["convert", str(FIXTURE_DIR), str(tmp_path / "a-file")], tmp_path)
    assert (
        result.returncode == 2 and "exists and is not a directory" in result.stderr and "Traceback" not in result.stderr
    )


def test_convert_command(tmp_path):
    result = _run(["convert", str(FIXTURE_DIR), str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_doctor_reports_versions_and_problems(tmp_path):
    result = _run(["doctor", "--model-path", str(FIXTURE_DIR)], tmp_path)
    assert "transformers" in result.stdout and "disk free" in result.stdout
    assert "present=True" in result.stdout
    assert "decoding: one reply: dynamic KV cache (on the CPU" in result.stdout  # which path and why, before loading
    assert ("problem: no CUDA GPU" in result.stdout) == (result.returncode == 1)


def test_missing_model_dir_is_a_plain_error(tmp_path):
    result = _run(["chat", "--model-path", str(tmp_path / "nope")], tmp_path, stdin="hi\n")
    assert result.returncode == 2
    assert "error:" in result.stderr and "no config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_sampling_flags_come_from_the_shared_bounds(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal's width
    with pytest.raises(SystemExit) as done:
        main(["chat", "--help"])
    assert done.value.code == 0
    helps: dict[str, str] = {}  # flag: its line and the next one (a long flag's help starts on the next line)
    for line in capsys.readouterr().out.split("options:")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0]
            helps[flag] = line
        elif helps:
            helps[flag] += line
    for name, bound in BOUNDS.items():
        flag = "--" + name.replace("_", "-")
        assert bound.description in helps[flag] and f"[{bound.low:g}..{bound.high:g}]" in helps[flag]
    chat = get_subcommand(parse(["chat", "--top-k", "7", "--temperature", "0"]))
    assert (chat.top_k, chat.temperature) == (7, 0.0)


def test_flags_override_the_environment_and_the_model_part_leaves_secrets_behind(monkeypatch):
    from internlm_app.cli import _settings
    from internlm_app.settings import ModelSettings

    monkeypatch.setenv("INTERNLM_TEMPERATURE", "0.3")
    monkeypatch.setenv("INTERNLM_TOP_K", "9")
    monkeypatch.setenv("INTERNLM_API_KEYS", "sk-env")
    monkeypatch.setenv("INTERNLM_WEB_PASSWORD", "pw")
    settings = _settings(get_subcommand(parse(["serve", "--temperature", "0", "--port", "7001"])))
    assert (settings.temperature, settings.top_k, settings.port) == (0.0, 9, 7001)  # a flag wins, the env fills in
    assert [key.get_secret_value() for key in settings.api_keys] == ["sk-env"]
    model = settings.model
    assert type(model) is ModelSettings and (model.temperature, model.top_k) == (0.0, 9)
    assert not hasattr(model, "api_keys") and not hasattr(model, "web_password")


def test_no_command_is_an_error_naming_them(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: name a command: serve, api, download, convert, chat, doctor")


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["chat", "--temperature", "9"], {}, "INTERNLM_TEMPERATURE / --temperature: "),
        (["serve", "--api-keys", "sk-1,"], {}, "INTERNLM_API_KEYS / --api-keys: "),
        (["doctor"], {"INTERNLM_DTYPE": "fp16"}, "INTERNLM_DTYPE / --dtype: "),
    ],
)
def test_an_invalid_flag_or_variable_is_one_error_line(capsys, monkeypatch, args, env, named):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid setting " + named) and len(err.splitlines()) == 1 and "sk-1" not in err


def test_out_of_bounds_flag_is_rejected(tmp_path):
    result = _run(["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "9"], tmp_path, stdin="hi\n")
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr


@contextlib.contextmanager
def fake_modelscope() -> Iterator[str]:
    """A local stand-in for the ModelScope hub that knows no model: every request gets its 404 JSON (no network)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"Code": 10010205001, "Message": "model not found", "Success": False}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_failure_is_a_plain_error(tmp_path):
    args = ["download", "--model-id", "internlm-app-tests/no-such-model", "--cache-dir", str(tmp_path / "ms")]
    with fake_modelscope() as endpoint:
        result = _run(args, tmp_path, MODELSCOPE_CACHE=str(tmp_path / "ms"), MODELSCOPE_ENDPOINT=endpoint)
    assert result.returncode == 2, result.stderr
    assert "could not download internlm-app-tests/no-such-model" in result.stderr and "model not found" in result.stderr
    assert "INTERNLM_MODEL_PATH" in result.stderr and "Traceback" not in result.stderr


def test_interactive_commands_and_banner(engine, tmp_path):
    """The interactive chat (a terminal on stdin): a banner, /help, /clear, unknown commands, empty lines, /exit."""
    import io

    from internlm_app.sampling import SamplingParams
    from internlm_app.terminal_chat import TerminalChat

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stdin = Terminal("/help\n\n/nonsense\nhello\n/clear\n//hello\n/exit\nnever sent\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    chat = TerminalChat(engine, SamplingParams.greedy_params(8), "", stdin=stdin, stdout=stdout, stderr=stderr)
    assert chat.run() == 0
    notes = stderr.getvalue()
    assert "/help lists the commands" in notes.splitlines()[0] and "internlm2-tiny" in notes
    assert "/clear" in notes and "/exit" in notes  # the help
    assert "unknown command /nonsense" in notes and "(the conversation was cleared)" in notes
    expected, _ = engine.reply([{"role": "user", "content": "hello"}], SamplingParams.greedy_params(8))
    slashed, _ = engine.reply([{"role": "user", "content": "/hello"}], SamplingParams.greedy_params(8))
    assert stdout.getvalue() == f"{expected}\n{slashed}\n"  # after /clear the second one is a new conversation
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["/hello"]


def test_piped_replies_stay_one_line_each_and_jsonl(engine, tmp_path):
    import io

    from internlm_app.sampling import SamplingParams
    from internlm_app.terminal_chat import TerminalChat, escape_line

    class MultiLine:  # a backend whose reply spans lines
        info = engine.info

        def stream_reply(self, messages, params, **kwargs):
            yield "line one\nline \\two"

    out = io.StringIO()
    every_line_answered = TerminalChat(
        MultiLine(), SamplingParams.greedy_params(4), "", stdin=io.StringIO("a\n\nb\n"), stdout=out
    )
    assert every_line_answered.run() == 0
    assert out.getvalue().splitlines() == [escape_line("line one\nline \\two"), "", escape_line("line one\nline \\two")]
    assert escape_line("line one\nline \\two") == "line one\\nline \\\\two"
    out = io.StringIO()
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's recursion limit
    lines = '"hello"\n{"content": "multi\\nline"}\nnot json\n' + deep + "\n"
    status = TerminalChat(engine, SamplingParams.greedy_params(6), "", jsonl=True, stdin=io.StringIO(lines), stdout=out)
    assert status.run() == 1 and status.failures == 2  # the two bad lines; the others were answered
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == 4 and rows[0]["finish_reason"] in {"stop", "length"} and rows[0]["usage"]["completion_tokens"]
    assert "content" in rows[1] and "bad input line" in rows[2]["error"] and "bad input line" in rows[3]["error"]


def test_doctor_says_a_model_path_does_not_exist(tmp_path):
    result = _run(["doctor", "--model-path", str(tmp_path / "nonexistent")], tmp_path)
    assert result.returncode == 1 and "does not exist" in result.stdout and "internlm_app download" not in result.stdout


@pytest.mark.parametrize("command", ["api", "serve"])
def test_a_port_in_use_fails_before_loading(tmp_path, command):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run([command, "--model-path", str(FIXTURE_DIR), "--host", "127.0.0.1", "--port", str(port)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "converting checkpoint" not in result.stderr and "Loading weights" not in result.stderr  # nothing loaded


@pytest.mark.parametrize(
    ("host", "cause"),
    [
        ("999.1.1.1", "no such address"),
        ("10.99.99.99", "no such address"),
        ("fe80::1", "no such address"),  # a link-local address without its interface: EINVAL
        ("127.0.0.1", None),
    ],
)
def test_a_host_that_is_not_this_machines_is_told_apart_from_a_port_in_use(host, cause):
    """A mistyped --host (a name that does not resolve, an address of another machine) gets advice about the host,
    not "another program uses the port"."""
    import socket

    from internlm_app.api.server import PortInUseError, bind_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError) as raised:
            bind_socket(host, port)
    message = str(raised.value)
    if cause is None:
        assert "another program" in message and "--port" in message
    else:
        assert cause in message and "--host" in message and "another program" not in message


def test_api_alone_with_a_model_that_cannot_load_is_one_error_line(tmp_path):
    """`api` loads the model before it serves: a wrong path is the CLI's one `error:` line and exit 2 (as `chat`),
    not uvicorn's traceback and "Application startup failed"; the port is free again at once."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run(
        ["api", "--model-path", str(tmp_path / "nonexistent"), "--host", "127.0.0.1", "--port", str(port)], tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr and "nonexistent" in result.stderr and "startup failed" not in result.stderr
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_a_reader_that_goes_away_ends_the_chat_quietly(tmp_path):
    """`chat ... | head -1`: the pipe closes after the first reply; the chat stops as a tool killed by SIGPIPE (exit
    141), without a BrokenPipeError traceback."""
    import signal

    args = ["chat", "--model-path", str(FIXTURE_DIR), "--max-new-tokens", "5", "--system", ""]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "INTERNLM_CACHE_DIR": str(tmp_path / "cache")}
    environ["INTERNLM_DEVICE"] = "cpu"
    chat = subprocess.Popen(
        [sys.executable, "-m", "internlm_app", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
        cwd=tmp_path,
    )
    chat.stdin.write(b"a\n")
    chat.stdin.flush()
    assert chat.stdout.readline()  # the first reply, then the reader leaves
    chat.stdout.close()
    _, stderr = chat.communicate(b"b\nc\nd\n" * 50, timeout=240)
    text = stderr.decode()
    assert chat.returncode == 128 + signal.SIGPIPE and "Traceback" not in text and "BrokenPipe" not in text, text


def test_the_terminal_chat_says_when_earlier_turns_no_longer_fit(engine):
    """History is never dropped silently: once the conversation outgrows the context window, each reply that left
    turns out says how many, on stderr (plain) and as `dropped_messages` (--jsonl), as the API does."""
    import io

    from internlm_app.sampling import SamplingParams
    from internlm_app.terminal_chat import TerminalChat

    long_line = "tell me more about the weather in Shanghai " * 12  # ~100 tokens: a few turns fill the 512 window
    out, err = io.StringIO(), io.StringIO()
    lines = "".join(json.dumps(long_line) + "\n" for _ in range(6))
    params = SamplingParams.greedy_params(40)
    TerminalChat(engine, params, "", jsonl=True, stdin=io.StringIO(lines), stdout=out, stderr=err).run()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == 6 and all("error" not in row for row in rows), rows
    assert "dropped_messages" not in rows[0] and rows[-1]["dropped_messages"] > 0, rows
    out, err = io.StringIO(), io.StringIO()
    plain = TerminalChat(engine, params, "", stdin=io.StringIO((long_line + "\n") * 6), stdout=out, stderr=err)
    plain.run()
    assert (
        len(out.getvalue().splitlines()) == 6 and "earlier messages no longer fit the context window" in err.getvalue()
    )


def test_a_jsonl_object_without_content_says_what_a_line_needs(engine):
    import io

    from internlm_app.sampling import SamplingParams
    from internlm_app.terminal_chat import TerminalChat

    out = io.StringIO()
    lines = '{"role": "user"}\n{"content": 5}\n'
    TerminalChat(engine, SamplingParams.greedy_params(4), "", jsonl=True, stdin=io.StringIO(lines), stdout=out).run()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [row["error"] for row in rows] == [
        "bad input line: a line must be a JSON string or an object with a string 'content'"
    ] * 2


def test_doctor_lists_a_damaged_or_weightless_model_and_a_cache_that_is_a_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from internlm_app.doctor import doctor_report
    from internlm_app.settings import ModelSettings

    def keys(**values) -> set[str]:
        return {p.key for p in doctor_report(ModelSettings(**values))["problems"]} - {"no_gpu", "low_disk"}

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"model_type": "internl')  # cut short
    assert keys(model_path=damaged) == {"damaged_model"}
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((FIXTURE_DIR / "config.json").read_text())
    assert keys(model_path=weightless) == {"no_weights"}
    (tmp_path / "a_file").write_text("not a folder")
    assert keys(cache_dir=tmp_path / "a_file") == {"cache_not_dir"}
    assert keys(cache_dir=tmp_path / "a_file" / "models") == {"cache_not_dir"}
    for config, key in (
        ("{}", "damaged_model"),
        ('{"model_type": "llama", "hidden_size": "64", "num_attention_heads": 2}', "damaged_config"),
        ('{"model_type": "llama", "hidden_size": 64, "rope_parameters": null}', None),
    ):
        (weightless / "config.json").write_text(config)
        save_file({"w": torch.zeros(2)}, str(weightless / "model.safetensors"))
        (weightless / "tokenizer.json").write_text("{}")
        # never "no problems" for a config no model can be built from, never a traceback
        assert keys(model_path=weightless) == ({key} if key else set()), config
    (weightless / "model.safetensors").write_bytes(b"x" * 8)  # weights that are no safetensors file
    assert keys(model_path=weightless) == {"damaged_model"}
    assert keys(model_path=FIXTURE_DIR) == set()
    on_cpu = {p.key for p in doctor_report(ModelSettings(model_path=FIXTURE_DIR, device="cpu"))["problems"]}
    assert "no_gpu" not in on_cpu  # INTERNLM_DEVICE=cpu asks for the CPU


def test_a_cache_directory_that_cannot_be_made_is_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = _run(["download", "--cache-dir", str(tmp_path / "a_file" / "models")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot make the cache directory" in result.stderr and "INTERNLM_CACHE_DIR" in result.stderr


def test_the_settings_command_checks_the_variables_set_here(monkeypatch, capsys):
    monkeypatch.setenv("INTERNLM_PORT", "6006")
    assert main(["settings"]) == 0 and "| `INTERNLM_PORT` |" in capsys.readouterr().out
    monkeypatch.setenv("INTERNLM_PORT", "abc")
    assert main(["settings"]) == 2
    assert "error: invalid setting INTERNLM_PORT / --port" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["api", "serve"])
def test_a_server_told_to_forward_to_itself_says_so_before_it_starts(tmp_path, command):
    args = [command, "--backend", "openai", "--openai-base-url", "http://localhost:6407/v1/", "--port", "6407"]
    result = _run(args, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "is this server's own address (port 6407)" in result.stderr


def test_ctrl_c_ends_a_piped_chat_and_crlf_and_a_closed_stdin_are_handled():
    import io

    from internlm_app.sampling import SamplingParams
    from internlm_app.terminal_chat import TerminalChat

    class Interrupted:  # Ctrl-C arrives while the first line's reply streams
        info = None
        seen: list[str] = []

        def stream_reply(self, messages, params, **kwargs):
            self.seen.append(messages[-1]["content"])
            yield "part"
            raise KeyboardInterrupt

    backend, out = Interrupted(), io.StringIO()
    chat = TerminalChat(backend, SamplingParams.greedy_params(4), "", stdin=io.StringIO("a\r\nb\n"), stdout=out)
    with pytest.raises(KeyboardInterrupt):  # the whole run ends (exit 130), not only line "a"
        chat.run()
    assert backend.seen == ["a"]  # the CRLF line's \r is not part of the message, and "b" was never sent

    class NoInput(io.StringIO):
        pass

    closed = TerminalChat(backend, SamplingParams.greedy_params(4), "", stdin=NoInput(), stdout=out)
    closed.stdin = None  # as `sys.stdin` is when started with `<&-`
    with pytest.raises(ValueError, match="no standard input"):
        closed.run()


def test_output_that_cannot_be_written_is_one_error_line(tmp_path):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "INTERNLM_DEVICE": "cpu", "INTERNLM_CACHE_DIR": str(tmp_path)}
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "internlm_app", "chat", "--model-path", str(FIXTURE_DIR), "--max-new-tokens", "4"],
            input="hi\n",
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
            env=environ,
            cwd=tmp_path,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: No space left on device" in result.stderr and "leaked" not in result.stderr


def test_the_interactive_chat_edits_a_line_with_the_arrow_keys(engine, tmp_path):
    """In a terminal the arrow keys printed ^[[D into the message instead of moving in it. Typed: "helo", Left,
    "l", Enter: the message sent is "hello" (its reply is the greedy reply to "hello"); Up brings it back."""
    import pty
    import select
    import time

    from internlm_app.sampling import SamplingParams

    args = ["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "0", "--max-new-tokens", "8", "--system", ""]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INTERNLM_CACHE_DIR": str(tmp_path / "cache"),
        "INTERNLM_DEVICE": "cpu",
    }
    env["TERM"] = "xterm"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on the terminal's side
        os.chdir(tmp_path)
        os.execvpe(sys.executable, [sys.executable, "-m", "internlm_app", *args], env)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120, after: int = 0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen[after:]:
            assert time.monotonic() < deadline, seen[-2000:]
            if select.select([fd], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(fd, 4096)

    try:
        read_until(b">>> ")
        os.write(fd, b"helo\x1b[Dl\r")  # Left arrow: ESC [ D
        hello, _ = engine.reply([{"role": "user", "content": "hello"}], SamplingParams.greedy_params(8))
        read_until(hello.encode())
        read_until(b">>> ", 30, after=seen.index(hello.encode()))  # the next prompt: the reply has ended
        start = len(seen)
        os.write(fd, b"\x1b[A")  # Up: the last line again, to edit or send
        read_until(b"hello", 30, after=start)
        assert b"^[" not in seen
        os.write(fd, b"\x03")  # Ctrl-C at the prompt: a note, then Ctrl-D leaves
        read_until(b"Ctrl-D", 30, after=start)
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def test_doctor_finds_what_the_load_would_fail_on(tmp_path):
    """doctor said "no problems found" for folders the load then failed on: an InternLM2 checkpoint without its
    tokenizer.model or with a config value no model can be built from, a weight index naming a missing file, a
    model type that needs the folder's own code; a converted copy damaged since; and it crashed on one config."""
    import shutil

    from internlm_app.doctor import doctor_report
    from internlm_app.runtime.model_source import resolve_model_dir
    from internlm_app.settings import ModelSettings

    def keys(path, **values) -> set[str]:
        report = doctor_report(ModelSettings(model_path=path, cache_dir=tmp_path / "cache", **values))
        return {p.key for p in report["problems"]} - {"no_gpu", "low_disk"}

    def copy(name: str) -> Path:
        return Path(shutil.copytree(FIXTURE_DIR, tmp_path / name))

    (copy("no_tokenizer") / "tokenizer.model").unlink()
    heads = copy("zero_heads")
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    rope = copy("bad_rope")
    (rope / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "linear"}}))
    index = copy("bad_index")
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    own = tmp_path / "own_code"
    own.mkdir()
    (own / "config.json").write_text(json.dumps({"model_type": "evilmodel", "auto_map": {"AutoConfig": "c.C"}}))
    (own / "model.safetensors").write_bytes(b"x" * 8)
    for name in ("no_tokenizer", "zero_heads", "bad_rope", "bad_index"):
        assert keys(tmp_path / name) == {"damaged_model"}, name
    assert keys(own) == {"needs_own_code"}
    fine = copy("fine")
    settings = ModelSettings(model_path=fine, cache_dir=tmp_path / "cache", device="cpu")
    converted = resolve_model_dir(settings)
    assert keys(fine) == set()
    (fine / "model.safetensors").rename(tmp_path / "moved.safetensors")  # deleted after converting, to save disk
    assert keys(fine) == set()  # the conversion is what is used
    (tmp_path / "moved.safetensors").rename(fine / "model.safetensors")
    for shard in converted.glob("*.safetensors"):
        with open(shard, "r+b") as f:
            f.truncate(4096)
    assert keys(fine) == {"damaged_conversion"}
    cut = copy("cut_source")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    assert keys(cut) == {"damaged_model"}  # (the load refuses it: doctor says so too)
