"""The script's arguments, in the order ``ui()`` returns them (and the API's
``alwayson_scripts`` sends them), and the infotext keys they are written under."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

#: Infotext key of each setting; written only when HyCa is on.
INFOTEXT_KEYS = {
    "interval": "HyCa N",
    "warmup": "HyCa warm-up",
    "compute_last": "HyCa last step",
    "hires": "HyCa hires",
    "profile": "HyCa profile",
    "hub_repo": "HyCa hub repo",
    "lora_reuse": "HyCa LoRA reuse",
    "cache_dtype": "HyCa cache dtype",
    "guard": "HyCa guard",
    "speedup": "HyCa target speed-up",
}
#: History precision choices; "model" keeps the dtype the blocks compute in.
CACHE_DTYPES = ("model", "bfloat16", "float16", "float32")
#: Results, written after sampling.
ERROR_KEY = "HyCa error"  # a pass HyCa could not start ran uncached: why
#: Every result entry (``Controller.results`` and the start error): the frontends build each
#: batch's infotext from one ``p.extra_generation_params`` (``modules/processing.py``), so a
#: new batch drops the last one's before its own are added.
RESULT_KEYS = ("HyCa steps", "HyCa saving", "HyCa LoRA ARI", "HyCa off-settings", "HyCa guard switches",
               "HyCa last step ran", "HyCa stopped", "HyCa interrupted", ERROR_KEY)
#: Paste-field name of the enable box (never written: HyCa is on when "HyCa N" is there).
ENABLED_KEY = "HyCa"
#: What an infotext written with HyCa on but without a key meant: the key is left out at
#: its default (hub repo, cache dtype), or predates the setting (the guard: off before it).
IMPLIED = {"hub_repo": "", "cache_dtype": "model", "guard": False, "speedup": 0.0}


@dataclass(frozen=True)
class Settings:
    enabled: bool = False
    interval: int = 5
    warmup: int = 3
    compute_last: bool = True
    hires: bool = True
    profile: str = "automatic"
    hub_repo: str = ""
    lora_reuse: bool = True
    cache_dtype: str = "model"  # appended: API callers' positional args keep their meaning
    guard: bool = True  # appended, for the same reason
    speedup: float = 0.0  # appended last; > 0: N is picked per pass for this many times fewer block passes

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "Settings":
        """From positional script arguments; missing trailing ones take their defaults
        (API callers may send fewer), numbers arrive as floats from sliders and JSON."""
        values: dict[str, Any] = {}
        for spec, value in zip(fields(cls), args):
            if value is None:
                continue
            if spec.type in ("bool", bool):
                value = _as_bool(value)
            elif spec.type in ("int", int):
                value = int(round(float(value)))
            elif spec.type in ("float", float):
                value = float(value)
            else:
                value = str(value).strip()
            values[spec.name] = value
        settings = cls(**values)
        if settings.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"HyCa: cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {settings.cache_dtype!r}")
        if settings.interval < 1 or settings.warmup < 1:
            raise ValueError(f"HyCa: N and warm-up must be at least 1 (got N={settings.interval}, warm-up={settings.warmup})")
        if settings.speedup != 0 and not settings.speedup >= 1:
            raise ValueError(f"HyCa: a target speed-up must be 0 (off) or at least 1, got {settings.speedup}")
        return settings

    def args(self) -> list[Any]:
        return list(asdict(self).values())

    def infotext(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        out: dict[str, Any] = {}
        for name, key in INFOTEXT_KEYS.items():
            value = getattr(self, name)
            if (name == "hub_repo" and not value) or (name == "cache_dtype" and value == "model") or (
                    name == "speedup" and not value):
                continue
            out[key] = value if not isinstance(value, bool) else ("on" if value else "off")
        return out


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "on", "yes")
    return bool(value)


def from_infotext(params: dict[str, Any], name: str) -> Any:
    """The value of setting ``name`` as pasted text holds it; ``None`` (control left as it
    is) when absent, except that an infotext written with HyCa on implies the settings it
    leaves out (:data:`IMPLIED`)."""
    if name == "enabled":
        return INFOTEXT_KEYS["interval"] in params
    raw = params.get(INFOTEXT_KEYS[name])
    if raw is None:
        return IMPLIED.get(name) if INFOTEXT_KEYS["interval"] in params else None
    kind = next(f.type for f in fields(Settings) if f.name == name)
    if kind in ("bool", bool):
        return _as_bool(raw)
    if kind in ("int", int):
        return int(float(raw))
    if kind in ("float", float):
        return float(raw)
    return str(raw)


class PasteKey(str):
    """A paste field's target that is both the field's *name* and its *reader*.

    The WebUIs match paste fields two ways (A1111 1.10 / Forge ``modules/infotext_utils.py``):
    "Send to txt2img / img2img" copies a field only when its target is a string listed in
    the script's ``paste_field_names`` (``connect_paste_params_buttons``: ``name in
    paste_field_names``), while pasting an infotext (PNG Info, the paste button, the API's
    ``infotext``) calls a callable target with the parsed parameters, and otherwise
    converts the raw string with the control's type, so ``bool("off")`` would be ``True``.
    A ``str`` that is also callable serves both: equal to its key for Send-to, read by
    :func:`from_infotext` for pasting."""

    def __new__(cls, key: str, name: str) -> "PasteKey":
        obj = super().__new__(cls, key)
        obj.setting = name
        return obj

    def __call__(self, params: dict[str, Any]) -> Any:
        return from_infotext(params, self.setting)


def paste_keys() -> list[tuple[str, PasteKey]]:
    """``(setting, paste key)`` for the enable box and every setting, in ``ui()`` order
    of the settings after the box."""
    return [("enabled", PasteKey(ENABLED_KEY, "enabled"))] + [(name, PasteKey(key, name))
                                                               for name, key in INFOTEXT_KEYS.items()]


def torch_dtype(name: str):
    """The engine's ``cache_dtype`` for a setting: ``None`` keeps the model's dtype."""
    import torch

    return None if name == "model" else getattr(torch, name)
