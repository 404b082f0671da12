"""HyCa inside the WebUI frontends (A1111, Forge, Forge Neo).

One thin module per hook point declares an :class:`~.adapter.Adapter` (``forge_flux``,
``forge_chroma``, ``forge_mmditx``, ``neo_flux``, ``neo_qwen``, ``neo_wan``, ``neo_lumina``,
``a1111_sd3``); ``registry`` picks the one matching the loaded model; ``session`` maps a
pass's model calls to steps and branches and runs the engine; ``controller`` hooks a pass
in through the frontend's own extension points; ``profiles`` is the one place profiles
come from. The extension's script (``scripts/hyca.py``) only talks to ``controller``.
"""
