"""The command line as a user runs it: a subprocess on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from internlm_app.cli import build_parser
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
    assert "converting checkpoint" in result.stderr  # progress goes to stderr, never into the replies


def test_a_line_that_is_not_utf8_is_an_error_and_the_next_line_is_answered(engine, tmp_path):
    from internlm_app.sampling import SamplingParams

    expected, _ = engine.reply([{"role": "user", "content": "hello"}], SamplingParams.greedy_params(20))
    args = ["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "0", "--max-new-tokens", "20", "--system", ""]
    result = _run(args, tmp_path, stdin=b"\xff\xfe\nhello\n", PYTHONIOENCODING="utf-8:strict")  # as en_US.UTF-8
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    assert "error: message 1 (user) is not valid Unicode text" in stderr
    assert result.stdout.decode() == expected + "\n"  # the bad line is not sent again with the next one


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


def test_sampling_flags_come_from_the_shared_bounds():
    parser = build_parser()
    chat = parser._subparsers._group_actions[0].choices["chat"]
    helps = {a.dest: a.help for a in chat._actions}
    for name, bound in BOUNDS.items():
        assert bound.description in helps[name]
    args = parser.parse_args(["chat", "--top-k", "7", "--temperature", "0"])
    assert (args.top_k, args.temperature) == (7, 0.0)


def test_out_of_bounds_flag_is_rejected(tmp_path):
    result = _run(["chat", "--model-path", str(FIXTURE_DIR), "--temperature", "9"], tmp_path, stdin="hi\n")
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr


def test_download_failure_is_a_plain_error(tmp_path):
    # A model id that exists nowhere: offline this fails on the network, online with "not found"; never a traceback.
    args = ["download", "--model-id", "internlm-app-tests/no-such-model", "--cache-dir", str(tmp_path / "ms")]
    result = _run(args, tmp_path, MODELSCOPE_CACHE=str(tmp_path / "ms"))
    assert result.returncode == 2, result.stderr
    assert "could not download internlm-app-tests/no-such-model" in result.stderr
    assert "INTERNLM_MODEL_PATH" in result.stderr and "Traceback" not in result.stderr
