"""Command line: serve, api, download, convert, chat, doctor, settings (python -m internlm_app ...).

Each subcommand is a pydantic model whose flags are the settings fields it inherits (pydantic-settings' CliApp
builds the parser, `--help` shows each field's description and default). The flags given override the environment:
`_settings(flags)` builds Settings from INTERNLM_* variables and the flags that were set.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliImplicitFlag,
    CliPositionalArg,
    CliSubCommand,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    get_subcommand,
)

from internlm_app.load_progress import TerminalProgress
from internlm_app.settings import ModelSettings, ServerSettings, Settings


def _progress() -> TerminalProgress:
    """Load steps on stderr: each new step at once, a download's bytes every few seconds."""
    return TerminalProgress(logging.getLogger("internlm_app.cli"))


def _settings(flags: BaseModel) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line (not the flags' defaults)."""
    given = {name: getattr(flags, name) for name in flags.model_fields_set if name in Settings.model_fields}
    return Settings(**given)


def _same_field(settings_class: type[BaseModel], name: str) -> Any:
    """The field `name` of a settings class, for a subcommand that takes a few of its fields only."""
    return settings_class.model_fields[name]


class Serve(Settings):
    """Serve the web app and the HTTP API on one port with one model (guarded by --web-password, --api-keys)."""

    def run(self) -> int:
        from internlm_app.server import serve
        from internlm_app.settings import check_not_forwarding_to_itself

        settings = _settings(self)
        check_not_forwarding_to_itself(settings, settings.host, settings.port)
        serve(settings)
        return 0


class Api(ModelSettings, ServerSettings):
    """Serve the HTTP API alone (classic POST / and OpenAI-compatible /v1)."""

    def run(self) -> int:
        from internlm_app.api import serve
        from internlm_app.settings import check_not_forwarding_to_itself

        settings = _settings(self)
        check_not_forwarding_to_itself(settings, settings.host, settings.port)
        serve(settings)
        return 0


class Download(BaseModel):
    """Download the model from ModelScope and print its directory."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str = _same_field(ModelSettings, "model_id")
    model_revision: str = _same_field(ModelSettings, "model_revision")
    cache_dir: Path = _same_field(ModelSettings, "cache_dir")

    def run(self) -> int:
        from internlm_app.runtime.model_source import download_model

        settings = _settings(self)
        print(download_model(settings.model_id, settings.model_revision, Path(settings.cache_dir), _progress()))
        return 0


class Convert(BaseModel):
    """Convert an InternLM2 checkpoint to a native Llama checkpoint."""

    src: CliPositionalArg[Path] = Field(description="InternLM2 checkpoint directory")
    dst: CliPositionalArg[Path] = Field(description="output directory")

    def run(self) -> int:
        from internlm_app.runtime.convert import convert_checkpoint

        print(convert_checkpoint(self.src, self.dst, progress=_progress()))
        return 0


class Chat(ModelSettings):
    """Chat in the terminal: interactive (/help, /clear, /exit), or piped: one output line per input line."""

    system: str | None = Field(
        None,
        description="System prompt ('' for none; default: INTERNLM_SYSTEM_PROMPT, else the official InternLM2 one).",
    )
    jsonl: CliImplicitFlag[bool] = Field(
        False,
        description="Piped (stdin not a terminal), each input line is a message and gets exactly one output line, the "
        "reply with newlines written as \\n and backslashes as \\\\ (an empty line gets an empty line); --jsonl reads "
        'JSON strings or {"content": ...} and writes {"content", "finish_reason", "usage"} objects instead.',
    )

    def run(self) -> int:
        from internlm_app.backends.factory import create_backend
        from internlm_app.terminal_chat import TerminalChat

        settings = _settings(self)
        backend = create_backend(settings.model, progress=_progress())
        system = settings.system_prompt if self.system is None else self.system
        return TerminalChat(backend, settings.default_sampling(), system, jsonl=self.jsonl).run()


class Doctor(ModelSettings):
    """Check Python, torch, CUDA, GPU memory, the model directory and disk (exit 1 when a problem is found)."""

    def run(self) -> int:
        from internlm_app.doctor import doctor_report, format_report

        report = doctor_report(_settings(self).model)
        print(format_report(report))
        return 0 if not report["problems"] else 1


class SettingsTable(BaseModel):
    """Print every setting (environment variable, default, meaning) as Markdown, then check the INTERNLM_ variables
    set here (exit 2 with the error when one is invalid)."""

    def run(self) -> int:
        from pydantic import ValidationError

        from internlm_app.settings import Settings, describe_settings_error, settings_table

        print(settings_table())
        try:
            Settings()
        except ValidationError as exc:
            print("error: invalid setting " + "; ".join(describe_settings_error(exc).splitlines()), file=sys.stderr)
            return 2
        return 0


class Command(Protocol):
    def run(self) -> int: ...


class Cli(BaseSettings):
    """InternLM2 Chat: native runtime. A flag overrides the INTERNLM_<NAME> variable of the same name (`settings`)."""

    model_config = SettingsConfigDict(
        cli_prog_name="python -m internlm_app",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_shortcuts={"verbose": "v"},
        protected_namespaces=(),
        hide_input_in_errors=True,
    )

    verbose: CliImplicitFlag[bool] = Field(False, description="Debug logging.")
    serve: CliSubCommand[Serve] = Field(description="serve the web app and the HTTP API on one port with one model")
    api: CliSubCommand[Api] = Field(description="serve the HTTP API alone (classic POST / and OpenAI-compatible /v1)")
    download: CliSubCommand[Download] = Field(description="download the model from ModelScope, print its directory")
    convert: CliSubCommand[Convert] = Field(description="convert an InternLM2 checkpoint to a native Llama checkpoint")
    chat: CliSubCommand[Chat] = Field(
        description="chat in the terminal (/help lists the commands); piped, one output line per input line"
    )
    doctor: CliSubCommand[Doctor] = Field(
        description="check Python, torch, CUDA, GPU memory, the model directory and disk"
    )
    settings: CliSubCommand[SettingsTable] = Field(
        description="print every setting (environment variable, default, meaning) as Markdown"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The command line only: the environment is read by Settings, once the subcommand is known (_settings).
        return (init_settings,)


def parse(argv: list[str] | None = None) -> Cli:
    """The command line parsed (argparse errors and --help exit here; an invalid value raises ValidationError)."""
    return CliApp.run(Cli, cli_args=sys.argv[1:] if argv is None else argv)


def run() -> NoReturn:
    """The process's entry (`python -m internlm_app`, `internlm-chat`): `main`, the exit handlers (the engine's
    close, logging's flush), then the exit itself without the interpreter's teardown. There, nanobind (the bindings
    of triton, which torch imports when it is installed: xgrammar needs it) prints dozens of "leaked instance" lines
    on every exit, burying the last line a user should read."""
    try:
        code = main()
    except SystemExit as exit:  # argparse's --help and usage errors
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:  # a bug: its traceback, then the same quiet exit
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed file
            stream.flush()
    atexit._run_exitfuncs()  # what the teardown would run first (CPython's own hook for it)
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    from internlm_app.chat_types import EngineError
    from internlm_app.errors import UserFacingError
    from internlm_app.settings import describe_settings_error

    try:  # the commands import torch and transformers inside: a Ctrl-C while they load is an interrupt too
        cli = parse(argv)
        logging.basicConfig(
            level=logging.DEBUG if cli.verbose else logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        command = cast(Command | None, get_subcommand(cli, is_required=False))  # every subcommand model has run()
        if command is None:
            names = ", ".join(name for name in Cli.model_fields if name != "verbose")
            print(f"error: name a command: {names} (python -m internlm_app --help)", file=sys.stderr)
            return 2
        return command.run()
    except ValidationError as exc:  # before ValueError: a bad setting or sampling value, one line naming it
        print("error: invalid setting " + "; ".join(describe_settings_error(exc).splitlines()), file=sys.stderr)
        return 2
    except (UserFacingError, EngineError, ValueError) as exc:  # PortInUseError is a UserFacingError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)  # the shell's prompt on a line of its own, not after "^C"
        return 130
    except BrokenPipeError:  # the reader went away (`... | head -1`): stop quietly, as a tool killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush must not fail
        return 128 + signal.SIGPIPE
    except OSError as exc:  # the output cannot be written (a full disk, /dev/full), a closed input ...
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1
