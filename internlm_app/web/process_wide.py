"""`process_wide`: the web app's shared objects (the model's loader, the live replies, the login throttle ...), made
once per process and per argument, and never dropped.

Streamlit's `st.cache_resource` would do the first part, but any websocket client may send Streamlit's "clear cache"
request (`BackMsg.clear_cache`; in web-only mode no login stands before the websocket), which empties every
cache_resource: the loader would be made again and load a second copy of the model (two do not fit a 24 GB card),
the login throttle would forget the wrong passwords, the page would lose track of the replies being generated.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def process_wide(function: Callable[P, T]) -> Callable[P, T]:
    """`function`'s result, made once per distinct arguments and kept for the process. Arguments whose parameter name
    starts with `_` are left out of the key (as st.cache_resource does); the others must be hashable. Thread-safe:
    two sessions asking at once get the same object, made once."""
    names = list(inspect.signature(function).parameters)
    made: dict[tuple, T] = {}
    lock = threading.Lock()

    @functools.wraps(function)
    def get(*args: P.args, **kwargs: P.kwargs) -> T:
        bound = dict(zip(names, args, strict=False)) | kwargs
        key = tuple((name, value) for name, value in bound.items() if not name.startswith("_"))
        with lock:
            if key not in made:
                made[key] = function(*args, **kwargs)
            return made[key]

    return get
