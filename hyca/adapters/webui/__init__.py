"""HyCa inside the WebUI frontends (A1111, Forge, Forge Neo).

Every hook point is one :class:`~.adapter.Adapter` row of ``registry.ADAPTERS``, its block
lists named in :mod:`hyca.layouts`' vocabulary; ``registry`` picks the row matching the
loaded model; ``kinds`` maps each layout to its hook function; ``session`` maps a
pass's model calls to steps and branches and runs the engine; ``controller`` hooks a pass
in through the frontend's own extension points; ``profiles`` is the one place profiles
come from. The extension's script (``scripts/hyca.py``) only talks to ``controller``.
"""
