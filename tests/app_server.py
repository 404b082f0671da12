"""Launch ``app.py`` in this process on a free localhost port, for the app tests.

The app serves the shipped reference model (``models/reference``). Until that folder
exists (it is trained separately), a random-weight pipeline of the same layout
(``hyca.reference.tiny_components``, a stand-in) is saved to a temporary folder and
served instead, through the same ``HYCA_REFERENCE_MODEL`` setting a user could use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_folder(tmp: Path) -> Path:
    """The shipped reference model, or a saved stand-in of its layout when it is not there yet."""
    from hyca.reference import shipped_path, tiny_components

    if (shipped_path() / "model_index.json").is_file():
        return shipped_path()
    folder = tmp / "reference-standin"
    if not (folder / "model_index.json").is_file():
        tiny_components(seed=0).save_pretrained(str(folder))
    return folder


@contextlib.contextmanager
def running_app(tmp: Path) -> Iterator[tuple[str, Path]]:
    """``(url, reference folder)`` of the app, offline, with its profile cache in ``tmp``."""
    import torch

    folder = reference_folder(tmp)
    threads = torch.get_num_threads()
    # One thread: the 32x32 model's operations are tiny, and on a shared CPU several OpenMP
    # threads mostly wait for each other (10x slower under load here).
    torch.set_num_threads(1)
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HYCA_CACHE", "HYCA_REFERENCE_MODEL")}
    os.environ.update(HF_HUB_OFFLINE="1", HYCA_CACHE=str(tmp / "cache"), HYCA_REFERENCE_MODEL=str(folder))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import app

    _, url, _ = app.demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True)
    try:
        yield url, folder
    finally:
        app.demo.close()
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
