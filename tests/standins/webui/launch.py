"""Stand-in of A1111 / Forge ``launch.py`` (re-exporting ``modules/launch_utils.py``):
``is_installed(package)`` and ``run_pip(command, desc=None, live=False)``. Records the
pip commands instead of running them."""

import importlib.metadata

pip_commands: list[tuple[str, str]] = []


def is_installed(package):
    try:
        return importlib.metadata.distribution(package) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def run_pip(command, desc=None, live=False):
    pip_commands.append((command, desc))
