"""What a page run knows: the settings, the language (with its labels) and where the process's backend loads."""

from __future__ import annotations

from dataclasses import dataclass

from internlm_app.backends.factory import BackendLoader
from internlm_app.settings import Settings
from internlm_app.web import hosting
from internlm_app.web.i18n import t
from internlm_app.web.resources import backend_loader


@dataclass
class PageContext:
    """Settings and language of this run, with the labels in that language."""

    settings: Settings
    lang: str

    def t(self, key: str, **values: object) -> str:
        return t(key, self.lang, **values)

    def loader(self) -> BackendLoader:
        """The process's one loader: the one-port server's, or (web-only) one per load configuration."""
        hosted = hosting.current()
        return hosted.loader if hosted is not None else backend_loader(self.settings)
