"""HyCa as a ComfyUI node pack: the "HyCa" model-patch node (node.py), the families it
patches as rows of data (families.py) and the replace patches and wrappers it installs on
a cloned ``ModelPatcher`` (hook.py). Imports no diffusers; ``comfy`` is imported only when
a model is patched and ``comfy_api`` only when ComfyUI loads the node."""

from .node import apply_hyca, comfy_entrypoint

__all__ = ["apply_hyca", "comfy_entrypoint"]
