"""The extension's Script against the WebUI's interface contract (stand-ins of
``modules.scripts``, ``ui_components.InputAccordion``, ``infotext_utils``,
``script_callbacks``, ``launch``), with real gradio components: UI, element ids, argument
order for the API, infotext round trip, XYZ-grid axes, install.py, metadata.ini, hover help."""

import configparser
import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import types

import gradio as gr
import pytest
import torch

from webui_harness import ROOT, Processing, generate, load_script, model_kinds, standins


@pytest.fixture
def webui():
    with standins("forge"):
        module = load_script()
        yield module
        from hyca.adapters.webui.controller import CONTROLLER

        CONTROLLER.reset()


def build_ui(module, is_img2img=False):
    script = module.HyCaScript()
    script.is_img2img = is_img2img
    with gr.Blocks():
        components = script.ui(is_img2img)
    return script, components


def test_script_contract(webui):
    from modules import scripts

    script = webui.HyCaScript()
    assert isinstance(script, scripts.Script)
    assert script.title() == "HyCa"  # the API's alwayson_scripts key is the title lowercased: "hyca"
    assert script.show(False) is scripts.AlwaysVisible and script.show(True) is scripts.AlwaysVisible
    for hook in ("process", "process_before_every_sampling", "process_batch", "before_hr", "post_sample",
                 "postprocess_batch", "postprocess"):
        assert type(script).__dict__.get(hook) is not None, f"{hook} not implemented"


def test_ui_components_in_argument_order_with_unique_ids(webui):
    from modules.ui_components import InputAccordion

    ids = []
    for is_img2img in (False, True):
        script, components = build_ui(webui, is_img2img)
        assert len(components) == len(webui.ARGUMENTS) == 11
        assert isinstance(components[0], InputAccordion)  # the enable box is the accordion itself
        values = [c.value for c in components]
        assert values == [False, 5, 3, True, True, "automatic", "", True, "model", True, 0.0]
        ids += [c.accordion.elem_id if isinstance(c, InputAccordion) else c.elem_id for c in components]
    assert all(i.startswith("hyca_") for i in ids)
    assert len(set(ids)) == len(ids) == 22


def test_api_arguments_follow_ui_order(webui):
    from hyca.adapters.webui.settings import Settings

    # what a client sends: {"alwayson_scripts": {"hyca": {"args": [...]}}}, positional, JSON numbers
    payload = json.loads('{"alwayson_scripts": {"hyca": {"args": [true, 6.0, 2, false, false, "FORA (reuse)", "me/p", false, "float16"]}}}')
    settings = Settings.from_args(payload["alwayson_scripts"]["hyca"]["args"])
    assert settings == Settings(True, 6, 2, False, False, "FORA (reuse)", "me/p", False, "float16")
    assert Settings.from_args([True, 4]) == Settings(enabled=True, interval=4)  # trailing ones default
    assert Settings.from_args(settings.args()) == settings
    with pytest.raises(ValueError, match="at least 1"):
        Settings.from_args([True, 0])
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        Settings.from_args([True, 5, 3, True, True, "automatic", "", True, "int8"])


def test_bad_api_arguments_turn_hyca_off_with_a_message(webui, capsys):
    with torch.no_grad():
        model = model_kinds()["forge_flux"].factory()
        p = Processing("forge_flux", model, steps=4)
        generate(p, webui.HyCaScript(), [True, "many"])
    assert "ignoring HyCa's arguments" in capsys.readouterr().out
    assert not any(k.startswith("HyCa") for k in p.extra_generation_params)


def test_infotext_round_trip(webui):
    from modules.infotext_utils import paste_values, parse_generation_parameters

    script, components = build_ui(webui)
    # target 2x over 6 steps with warm-up 2 picks N=4 (steps 0, 1, 5), the N set here
    args = [True, 4, 2, False, False, "FORA (reuse)", "me/profiles", True, "bfloat16", False, 2.0]
    model = model_kinds()["forge_flux"].factory()
    with torch.no_grad():
        out = generate(Processing("forge_flux", model, steps=6), script, args)
    params = parse_generation_parameters("a cat\nNegative prompt: dog\n" + out.infotexts[0])
    assert params["HyCa steps"] == "3 computed, 3 forecast"  # N=4, W=2, 6 steps: 0, 1, 5
    assert params["HyCa saving"] == "50%"
    pasted = paste_values(script.infotext_fields, params)
    assert pasted[0] is True  # the enable box
    assert pasted[1:] == args[1:]  # infotext_fields follow the settings' order after the box
    assert set(script.paste_field_names) - {"HyCa"} <= set(params)


def main_fields(tab):
    """The frontend's own paste fields that Send-to always carries (ui.py)."""
    return [(gr.Textbox("a cat", elem_id=f"{tab}_prompt"), "Prompt"), (gr.Slider(1, 150, value=20, step=1), "Steps")]


def test_send_to_img2img_carries_hyca_settings_by_name(webui):
    """Send to img2img copies the txt2img controls whose paste names are listed in the
    scripts' paste_field_names (infotext_utils.connect_paste_params_buttons): every HyCa
    control must land on its img2img twin."""
    from modules import infotext_utils

    with gr.Blocks():
        t2i = webui.HyCaScript()
        t2i_components = t2i.ui(False)
        i2i = webui.HyCaScript()
        i2i_components = i2i.ui(True)
        infotext_utils.add_paste_fields("txt2img", None, main_fields("txt2img") + list(t2i.infotext_fields))
        infotext_utils.add_paste_fields("img2img", None, main_fields("img2img") + list(i2i.infotext_fields))
    # ScriptRunner.paste_field_names: the scripts' lists concatenated (modules/scripts.py)
    inputs, outputs = infotext_utils.send_to(list(t2i.paste_field_names), "txt2img", "img2img")
    assert len(inputs) == len(outputs) == 2 + len(t2i_components)
    pairs = {id(a): b for a, b in zip(inputs, outputs)}
    for a, b in zip(t2i_components, i2i_components):
        assert pairs[id(a)] is b  # each control goes to its own twin, in order
    assert len(set(t2i.paste_field_names)) == len(t2i.paste_field_names)  # names unique


def test_send_to_would_carry_nothing_with_unnamed_fields(webui):
    """Why the names matter: a callable-only target is never matched by Send-to."""
    from modules import infotext_utils

    with gr.Blocks():
        box = gr.Checkbox(False)
    infotext_utils.add_paste_fields("txt2img", None, [(box, lambda params: True)])
    infotext_utils.add_paste_fields("img2img", None, [(box, lambda params: True)])
    assert infotext_utils.send_to(["HyCa N"], "txt2img", "img2img") == ([], [])


def test_png_info_paste_and_api_infotext_restore_every_setting(webui):
    """PNG Info (connect_paste: callable targets called, values converted by the control's
    type) and the API's ``infotext`` (get_field_value) both restore HyCa's settings,
    booleans included (a plain string target would make "off" truthy)."""
    from modules import infotext_utils

    script, components = build_ui(webui)
    args = [True, 7, 4, False, False, "FORA (reuse)", "me/profiles", False, "float16", False, 2.5]
    settings = webui.Settings.from_args(args)
    line = infotext_utils.parameters_line({"Steps": 20, **settings.infotext()})
    pasted = infotext_utils.paste(f"a cat\n{line}", script.infotext_fields)
    assert pasted == args
    params = infotext_utils.parse_generation_parameters(line)
    fields = [infotext_utils.PasteField(*f) for f in script.infotext_fields]
    assert [infotext_utils.api_field_value(f, params) for f in fields] == args
    assert all(f.label and f.function for f in fields)  # named for Send-to, callable for pasting


def test_an_older_infotext_pastes_the_settings_it_implies(webui):
    """Written before the guard and cache dtype existed, without a hub repo: HyCa was on,
    so those controls take the values the image was made with."""
    from modules import infotext_utils

    script, _ = build_ui(webui)
    old = "Steps: 20, HyCa N: 5, HyCa warm-up: 3, HyCa last step: on, HyCa hires: on, HyCa profile: automatic, HyCa LoRA reuse: on"
    assert infotext_utils.paste(old, script.infotext_fields) == [True, 5, 3, True, True, "automatic", "", True, "model",
                                                                 False, 0.0]


def test_no_infotext_when_off_and_paste_leaves_controls(webui):
    from modules.infotext_utils import paste_values, parse_generation_parameters

    script, _ = build_ui(webui)
    model = model_kinds()["forge_flux"].factory()
    with torch.no_grad():
        out = generate(Processing("forge_flux", model, steps=4), script, [False, 4, 2, True, True, "automatic", "", True])
    assert "HyCa" not in out.infotexts[0]
    pasted = paste_values(script.infotext_fields, parse_generation_parameters(out.infotexts[0]))
    assert pasted == [False] + [None] * 10


def xyz_stand_in():
    """Stand-in of ``scripts/xyz_grid.py`` (A1111 1.10): ``AxisOption`` and ``axis_options``."""
    module = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    module.AxisOption, module.axis_options = AxisOption, [AxisOption("Seed", int, lambda p, x, xs: None)]
    return module


def test_xyz_axes(webui):
    from modules import script_callbacks, scripts

    assert webui.add_xyz_axes() is False  # no grid script: nothing happens
    xyz = xyz_stand_in()
    scripts.scripts_data.append(scripts.ScriptClassData(object, "/webui/scripts/xyz_grid.py", "/webui", xyz))
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()  # a reloaded UI does not add them twice
    labels = [o.label for o in xyz.axis_options]
    assert labels == ["Seed", "[HyCa] N", "[HyCa] Warm-up steps", "[HyCa] On/off"]
    assert xyz.axis_options[3].choices() == ["on", "off"]

    # a grid cell: the axis turns HyCa on with N=3 though the UI says off
    model = model_kinds()["forge_flux"].factory()
    p = Processing("forge_flux", model, steps=10)
    xyz.axis_options[1].apply(p, "3", ["3", "5"])
    xyz.axis_options[3].apply(p, "on", ["on", "off"])
    with torch.no_grad():
        generate(p, webui.HyCaScript(), [False, 5, 2, True, True, "TaylorSeer (taylor-2)", "", True])
    assert p.extra_generation_params["HyCa N"] == 3
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def test_install_installs_only_what_is_missing_and_never_torch(webui, monkeypatch):
    import launch

    present = {"safetensors", "huggingface-hub", "torch"}
    monkeypatch.setattr(launch, "is_installed", lambda name: name in present)
    launch.pip_commands.clear()
    spec = importlib.util.spec_from_file_location("hyca_install", ROOT / "install.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert [c for c, _ in launch.pip_commands] == ['install "scikit-learn>=1.3"']
    present.clear()
    launch.pip_commands.clear()
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    commands = " ".join(c for c, _ in launch.pip_commands)
    assert "torch" not in commands and "-U" not in commands and "--upgrade" not in commands
    assert "diffusers" not in commands  # the WebUI path never imports it; the frontend's pin stays
    assert len(launch.pip_commands) == 3


def test_metadata_ini():
    parser = configparser.ConfigParser()
    assert parser.read(ROOT / "metadata.ini")
    assert parser["Extension"]["Name"] == "sd-webui-hyca"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_hover_help_covers_every_control(webui, tmp_path):
    from modules.ui_components import InputAccordion

    ids = []
    for is_img2img in (False, True):
        _, components = build_ui(webui, is_img2img)
        ids += [c.accordion.elem_id if isinstance(c, InputAccordion) else c.elem_id for c in components]
    runner = tmp_path / "run.js"
    runner.write_text(
        "const ids = " + json.dumps(ids) + ";\n"
        "const elements = {}; for (const id of ids) elements[id] = {title: '', querySelector: () => null};\n"
        "let callbacks = [];\n"
        "global.gradioApp = () => ({getElementById: (id) => elements[id] || null});\n"
        "global.onUiUpdate = (f) => callbacks.push(f);\n"
        f"require({json.dumps(str(ROOT / 'javascript' / 'hyca.js'))});\n"
        "callbacks.forEach((f) => f());\n"
        "console.log(JSON.stringify(ids.filter((id) => !elements[id].title)));\n")
    untitled = json.loads(subprocess.run(["node", str(runner)], capture_output=True, text=True, check=True).stdout)
    assert untitled == []


def test_a_broken_environment_hides_hyca_and_leaves_the_ui(monkeypatch, capsys):
    with standins("forge"):
        # as if hyca's core could not be imported (e.g. a diffusers too old for it)
        monkeypatch.setitem(sys.modules, "hyca.adapters.webui.controller", None)
        module = load_script(fresh=False)
        assert module.LOAD_ERROR is not None
        assert module.HyCaScript().show(False) is False and module.HyCaScript().show(True) is False
        from modules import script_callbacks

        assert not any(script_callbacks.callback_map.values())
    assert "[HyCa] not loaded (ModuleNotFoundError" in capsys.readouterr().out


def test_a_target_speedup_picks_n_from_the_passs_steps(webui, capsys):
    """20 steps, warm-up 3, target 4x: N from the pass's own step count, independently
    counted here from the schedule definition ({0 .. W-1} U {W-1 + kN} U {last})."""
    script, _ = build_ui(webui)
    model = model_kinds()["forge_flux"].factory()
    with torch.no_grad():
        out = generate(Processing("forge_flux", model, steps=20), script,
                       [True, 5, 3, True, True, "FORA (reuse)", "", True, "model", False, 4.0])

    def computed(n):
        return sum(1 for k in range(20) if k < 3 or k == 19 or (k - 2) % n == 0)

    n = min(n for n in range(1, 21) if 20 / computed(n) >= 4.0)
    params = __import__("modules.infotext_utils", fromlist=["x"]).parse_generation_parameters(
        "a cat\nNegative prompt: dog\n" + out.infotexts[0])
    assert params["HyCa steps"] == f"{computed(n)} computed, {20 - computed(n)} forecast"
    assert params["HyCa target speed-up"] == "4.0" and f"N={n}" in capsys.readouterr().out


@pytest.mark.parametrize("name, same_as", [("fora", "FORA (reuse)"), ("taylor-2", "TaylorSeer (taylor-2)"),
                                           ("taylorseer (TAYLOR-2)", "TaylorSeer (taylor-2)")])
def test_a_solver_name_is_that_solver(webui, name, same_as):
    script, _ = build_ui(webui)
    model = model_kinds()["forge_flux"].factory()
    outputs = []
    for profile in (name, same_as):
        with torch.no_grad():
            out = generate(Processing("forge_flux", copy.deepcopy(model), steps=8), script,
                           [True, 3, 2, True, True, profile, "", True, "model", False])
        outputs.append(out)
    assert torch.equal(outputs[0].images[0], outputs[1].images[0])
    if name.casefold() == same_as.casefold():  # a menu label typed in another case: the infotext spells the menu's
        assert f"HyCa profile: {same_as}" in outputs[0].infotexts[0]


def test_an_unknown_profile_name_runs_automatic_and_says_so(webui, capsys, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HYCA_CACHE", str(cache))  # automatic probes, and saves what it learned here
    script, _ = build_ui(webui)
    model = model_kinds()["forge_flux"].factory()
    with torch.no_grad():
        done = generate(Processing("forge_flux", model, steps=8), script,
                        [True, 3, 2, True, True, "nonexistent.safetensors", "", True, "model", False])
    out = capsys.readouterr().out
    assert "profile 'nonexistent.safetensors' is neither a choice of the menu" in out and "using automatic" in out
    assert "HyCa profile: automatic" in done.infotexts[0]  # what ran, not the name that did not
    saved = list(cache.glob("*.safetensors"))
    assert len(saved) == 1 and f"saved to {saved[0]}" in out  # in the temporary cache, nowhere else
