"""File names a node takes from ComfyUI's model folders: only plain names inside the folder.

ComfyUI 0.3.75 does not check a V3 combo's value against its options when a prompt is queued,
so an API prompt can send any string. The nodes therefore refuse, before anything is opened,
names that climb out of the folder ('..'), absolute paths, and names the folder does not list.
"""

from __future__ import annotations

import re


class FileNameError(ValueError):
    pass


def check_file_name(input_name: str, folder: str, name: str, listed: list[str]) -> str:
    """``name`` if it is one of the files ``listed`` in models/``folder``; else a clear refusal."""
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise FileNameError(f"{input_name} {name!r} is not a file name inside ComfyUI's models/{folder} folder: names "
                            "with '..' or absolute paths are refused; put the file in that folder and pick it from the list")
    if name not in listed:
        raise FileNameError(f"{input_name} {name!r} is not in ComfyUI's models/{folder} folder: put the file there "
                            "(restart ComfyUI or refresh the page) and pick it from the list")
    return name
