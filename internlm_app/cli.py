"""Command line: serve, api, download, convert, chat, doctor, settings (python -m internlm_app ...)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from .load_progress import TerminalProgress
from .sampling import BOUNDS, INT_PARAMS, SamplingParams
from .settings import Settings, add_settings_arguments, settings_from_args

MODEL_FLAGS = [
    *("model_path", "model_id", "model_revision", "cache_dir", "dtype", "device", "quantization", "max_length"),
    *("static_cache", "max_batch_size", "kv_reuse_tokens"),
]


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    for name, bound in BOUNDS.items():
        kind = int if name in INT_PARAMS else float
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"{bound.description} [{bound.low:g}..{bound.high:g}]",
        )


def _progress() -> TerminalProgress:
    """Load steps on stderr: each new step at once, a download's bytes every few seconds."""
    return TerminalProgress(logging.getLogger("internlm_app.cli"))


def _load_backend(settings: Settings):
    from .backend import create_backend

    return create_backend(settings, progress=_progress())


def cmd_download(args: argparse.Namespace) -> int:
    from .model_source import download_model

    settings = settings_from_args(args)
    path = download_model(settings.model_id, settings.model_revision, Path(settings.cache_dir), _progress())
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    print(convert_checkpoint(Path(args.src), Path(args.dst), progress=_progress()))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .terminal_chat import TerminalChat

    settings = settings_from_args(args)
    backend = _load_backend(settings)
    sampling = settings.default_sampling().model_dump()
    sampling.update({k: v for k, v in vars(args).items() if k in SamplingParams.model_fields and v is not None})
    system = settings.system_prompt if args.system is None else args.system
    return TerminalChat(backend, SamplingParams(**sampling), system, jsonl=args.jsonl).run()


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_report, format_report

    report = doctor_report(settings_from_args(args))
    print(format_report(report))
    return 0 if not report["problems"] else 1


def cmd_api(args: argparse.Namespace) -> int:
    from .api import serve

    serve(settings_from_args(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(settings_from_args(args))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from .settings import settings_table

    print(settings_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m internlm_app", description="InternLM2 Chat: native runtime.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download the model from ModelScope and print its directory")
    add_settings_arguments(p, ["model_id", "model_revision", "cache_dir"])
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="convert an InternLM2 checkpoint to a native Llama checkpoint")
    p.add_argument("src", help="InternLM2 checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "chat",
        help="chat in the terminal (/help lists the commands); piped, one output line per input line",
        description="Interactive: /help, /clear, /exit. Piped (stdin not a terminal): each input line is a message "
        "and gets exactly one output line, the reply with newlines written as \\n and backslashes as \\\\ "
        '(an empty line gets an empty line); --jsonl reads JSON strings or {"content": ...} and writes '
        '{"content", "finish_reason", "usage"} objects.',
    )
    add_settings_arguments(p, [*MODEL_FLAGS, "backend", "openai_base_url", "openai_model"])
    p.add_argument("--system", default=None, help="system prompt ('' for none; default: the official InternLM2 one)")
    p.add_argument("--jsonl", action="store_true", help="piped mode: JSON lines in and out (see above)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("doctor", help="check Python, torch, CUDA, GPU memory, the model directory and disk")
    add_settings_arguments(p, ["model_path", "model_id", "cache_dir"])
    p.set_defaults(func=cmd_doctor)

    server_flags = [*MODEL_FLAGS, "host", "port", "queue_limit", "empty_cache_after_reply", "stream_interval_ms"]
    server_flags += ["log_prompts", "backend", "openai_base_url", "openai_model"]
    p = sub.add_parser(
        "serve",
        help="serve the web app and the HTTP API on one port with one model (INTERNLM_WEB_PASSWORD guards the page, "
        "INTERNLM_API_KEYS the API)",
    )
    add_settings_arguments(p, server_flags)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="serve the HTTP API alone (classic POST / and OpenAI-compatible /v1)")
    add_settings_arguments(p, server_flags)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("settings", help="print every setting (environment variable, default, meaning) as Markdown")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .api.server import PortInUseError
    from .chat_types import EngineError
    from .errors import UserFacingError
    from .settings import describe_settings_error

    try:
        return args.func(args)
    except ValidationError as exc:  # before ValueError: a bad setting or sampling value, one line naming it
        print("error: invalid setting " + "; ".join(describe_settings_error(exc).splitlines()), file=sys.stderr)
        return 2
    except (UserFacingError, EngineError, PortInUseError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
