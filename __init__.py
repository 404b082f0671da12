"""ComfyUI's entry into HyCa: ComfyUI imports this file when the repository is cloned into
``ComfyUI/custom_nodes/`` (``nodes.py`` ``load_custom_node`` runs it as a package named
after its path) and calls :func:`comfy_entrypoint` (V3 node schema).

The repository root goes on ``sys.path`` so ``hyca`` is imported once, under its own name,
as the pip package, the WebUI extension and the tests import it. Nothing else imports this
file: pip installs only ``hyca*`` packages, pytest collects ``tests/``, and the WebUIs load
``scripts/``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from hyca.adapters.comfyui.node import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
