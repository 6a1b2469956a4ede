"""Errors as ComfyUI's page shows them: no folder of this machine and no secret, only file names.

The engine's errors are written for the person at the machine: they carry checkpoint paths,
the workers' log paths and the ends of their logs (Python tracebacks with install paths). The
page may be open to others (a shared ComfyUI), so at the bridge's boundary every absolute path
in a message becomes its last part (``/models/unet/flux1-dev.safetensors`` -> ``flux1-dev.safetensors``)
and the values of secret-looking environment variables are masked. The full message goes to
ComfyUI's log first.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re

log = logging.getLogger("comfy_xdit")

# An absolute POSIX path (not the '//' of a URL) or a Windows drive path, up to a quote, space or bracket.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\])(?:/(?!/)|[A-Za-z]:[\\/]|\\\\)[^\s'\"()\[\]{},;<>]+")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|AUTH|CREDENTIAL|COOKIE|SESSION", re.IGNORECASE)
_MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words


def _last_part(match: re.Match) -> str:
    path = match.group(0)
    trailing = re.search(r"[.:]*$", path).group(0)  # a sentence's full stop or a 'path:' label stays
    core = path[: len(path) - len(trailing)] if trailing else path
    name = re.split(r"[\\/]", core.rstrip("\\/"))[-1]
    return (name or "<folder>") + trailing


def _secrets(environ=os.environ) -> list[str]:
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def clean_text(text: str, environ=os.environ) -> str:
    """``text`` with absolute paths cut to their file names and secret environment values masked."""
    for secret in _secrets(environ):
        text = text.replace(secret, "***")
    return _ABSOLUTE_PATH.sub(_last_part, text)


def for_page(exc: BaseException) -> BaseException:
    """The exception to show in the page: ``exc`` itself when it is clean, else a clean copy of the same type.

    Clean means: no folder in its message or notes, and none in its type's module name either
    (ComfyUI imports a node pack under the pack's path and shows ``module.Class`` in the page;
    a copy then gets a subclass of the same name whose module is the pack's folder name only).
    """
    text = str(exc)
    clean = clean_text(text)
    notes = getattr(exc, "__notes__", None)
    clean_notes = [clean_text(n) for n in notes] if notes else None
    shown_type = _page_type(type(exc))
    if clean == text and clean_notes == notes and shown_type is type(exc):
        return exc
    for make in (_copy_with_message, _same_type):
        try:
            new = make(exc, clean)
        except Exception:
            continue
        if str(new) == clean:
            break
    else:
        new = RuntimeError(clean)
    if type(new) is type(exc) and shown_type is not type(exc):
        try:
            new.__class__ = shown_type  # still an instance of the original class for any caller
        except TypeError:
            pass
    if clean_notes is not None:
        new.__notes__ = clean_notes
    return new


_PAGE_TYPES: dict[type, type] = {}


def _page_type(cls: type) -> type:
    module = cls.__module__ or ""
    if "/" not in module and "\\" not in module:
        return cls
    if cls not in _PAGE_TYPES:
        _PAGE_TYPES[cls] = type(cls.__name__, (cls,), {"__module__": clean_text(module), "__qualname__": cls.__qualname__,
                                                        "__doc__": cls.__doc__})
    return _PAGE_TYPES[cls]


def _copy_with_message(exc: BaseException, message: str) -> BaseException:
    new = copy.copy(exc)  # keeps attributes a caller may read (e.g. a cancelled job's step)
    new.args = (message,)
    return new


def _same_type(exc: BaseException, message: str) -> BaseException:
    return type(exc)(message)


def page_safe(function):
    """Decorate a bridge entry point: exceptions leave it with clean messages (the full one is logged)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            shown = for_page(exc)
            if shown is exc:
                raise
            log.error("comfy_xdit: %s failed: %s", function.__name__, exc)
            raise shown from None

    return wrapper
