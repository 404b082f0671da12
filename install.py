"""Installs what HyCa needs into the WebUI's environment at start-up (A1111 / Forge /
Forge Neo run ``install.py`` of every extension with their ``launch`` helpers).

Only missing packages are installed, with lower bounds the WebUIs already satisfy, so
nothing the frontend pinned is upgraded; torch is never installed or upgraded (HyCa uses
whatever torch the frontend runs). The ``hyca`` package itself is this repository's root,
put on ``sys.path`` by ``scripts/hyca.py``: nothing to install for it. diffusers is not
needed inside a WebUI (the WebUI path, automatic probe included, never imports it), so a
frontend's pinned diffusers is left alone whatever its version.
"""

from __future__ import annotations

try:
    import launch
except ImportError:  # a frontend without A1111's launch helpers: say what to install by hand
    launch = None

#: distribution name -> pip requirement used when it is missing.
REQUIREMENTS = {
    "scikit-learn": "scikit-learn>=1.3",
    "safetensors": "safetensors>=0.4",
    "huggingface-hub": "huggingface-hub>=0.23",
}
NEVER = ("torch", "torchvision", "xformers")


def missing(requirements: dict[str, str] = REQUIREMENTS) -> list[str]:
    return [spec for name, spec in requirements.items() if name not in NEVER and not launch.is_installed(name)]


def install() -> list[str]:
    if launch is None:
        print("[HyCa] install.py: no `launch` module here; install by hand: " + " ".join(REQUIREMENTS.values()))
        return []
    specs = missing()
    for spec in specs:
        launch.run_pip(f'install "{spec}"', f"{spec} for HyCa")
    return specs


install()
