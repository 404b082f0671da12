"""Stand-in of ``modules/infotext_utils.py`` (AUTOMATIC1111/stable-diffusion-webui v1.10.1,
82a973c04367123ae98bd9abdf80d9eda9b910e2; Forge main dfdcbab has the same logic), the
three ways a script's ``infotext_fields`` are used, restated without gradio events:

* ``PasteField`` (line 34) and ``add_paste_fields`` (tuples become PasteFields);
* Send to txt2img / img2img: ``send_to`` restates ``connect_paste_params_buttons``
  (lines 168-173): fields are matched by *name*, ``name in paste_field_names``, where the
  names are the fixed four (+ "Seed") plus the scripts' ``paste_field_names``; source and
  destination fields are zipped in their lists' order and values are copied as they are;
* pasting an infotext (PNG Info, the paste button): ``paste`` restates ``connect_paste``'s
  ``paste_func`` (lines 486-517): ``infotext_pasted_callback``, then a callable target is
  called with the parameters and a string one looked up, and the value converted with the
  control's type (``bool("off")`` is ``True``: only ``"False"`` is special-cased);
* the API's ``infotext`` field: ``api_field_value`` restates ``modules/api/api.py``
  ``get_field_value`` (lines 378-397): ``field.function`` first, else ``field.label``,
  converted with ``type(field.component.value)``.

``parse_generation_parameters`` keeps only the last line's ``k: v`` pairs."""

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


paste_fields: dict[str, dict] = {}


def add_paste_fields(tabname, init_img, fields, override_settings_component=None):
    if fields:
        for i in range(len(fields)):
            if not isinstance(fields[i], PasteField):
                fields[i] = PasteField(*fields[i])
    paste_fields[tabname] = {"init_img": init_img, "fields": fields, "override_settings_component": override_settings_component}


def send_to(binding_paste_field_names, source_tabname, tabname, send_seed=False):
    """``(inputs, outputs)`` of the Send-to button's copy (values go across unchanged)."""
    paste_field_names = ['Prompt', 'Negative prompt', 'Steps', 'Face restoration'] + (["Seed"] if send_seed else []) + binding_paste_field_names
    fields = paste_fields[tabname]["fields"]
    inputs = [field for field, name in paste_fields[source_tabname]["fields"] if name in paste_field_names]
    outputs = [field for field, name in fields if name in paste_field_names]
    return inputs, outputs


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
        elif valtype == int:
            out.append(float(v))
        else:
            try:
                out.append(valtype(v))
            except Exception:
                out.append(None)
    return out


def paste(text: str, paste_fields) -> list:
    """PNG Info / the paste button: parse, let callbacks see the parameters, fill."""
    from modules import script_callbacks

    params = parse_generation_parameters(text)
    script_callbacks.infotext_pasted_callback(text, params)
    return paste_values(paste_fields, params)


def api_field_value(field, params):
    value = field.function(params) if field.function else params.get(field.label)
    if value is None:
        return None
    target_type = type(field.component.value)
    if target_type == type(None):
        return None
    if value is not None and not isinstance(value, target_type):
        value = target_type(value)
    return value
