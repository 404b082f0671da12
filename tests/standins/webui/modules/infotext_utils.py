"""Stand-in of ``modules/infotext_utils.py`` (AUTOMATIC1111 1.10, also in Forge):
``PasteField``, ``quote`` and ``parse_generation_parameters`` for the last line of an
infotext, plus the paste step that fills components from parsed parameters (the real one
is ``connect_paste``'s inner function; it calls callables with the parameter dict and
skips ``None``)."""

from __future__ import annotations

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class PasteField(tuple):
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parameters_line(params: dict) -> str:
    """The ``k: v, ...`` line ``processing.create_infotext`` writes."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def parse_generation_parameters(x: str) -> dict:
    res = {}
    lastline = x.strip().split("\n")[-1]
    for k, v in re_param.findall(lastline):
        res[k] = unquote(v)
    return res


def paste_values(paste_fields, params: dict) -> list:
    """What each component receives when ``params`` are pasted (``None``: left unchanged)."""
    out = []
    for component, key in paste_fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            out.append(None)
            continue
        valtype = type(component.value)
        if valtype == bool and v == "False":
            out.append(False)
        elif valtype in (int, float, bool, str):
            out.append(valtype(v))
        else:
            out.append(v)
    return out
