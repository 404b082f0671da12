"""What the extension tells the user besides the image: the guard's switches and the
engine's notes (infotext and console), what a probed profile was chosen for, what differs
when a profile made for other settings is used, and which LoRA set a pass runs with on
each frontend."""

import re
from types import SimpleNamespace

import pytest

from webui_harness import Frontend, args


def demote_first_check(monkeypatch):
    """What the guard leaves in a branch's stats, made deterministic: one demotion at the
    branch's third computed step (the WebUI only reads ``state.stats.switches``)."""
    from hyca.engine.cache import HybridCache
    from hyca.engine.guard import Switch

    real = HybridCache.end_step

    def end_step(self, state):
        computing, step = state.computing, state.step
        real(self, state)
        if computing and self.guard and state.stats.computed == 3:
            state.stats.switches.append(Switch(step, "taylor-2", "reuse"))

    monkeypatch.setattr(HybridCache, "end_step", end_step)


def test_guard_switches_reach_infotext_and_console(monkeypatch, capsys):
    demote_first_check(monkeypatch)
    with Frontend("forge_flux") as f:
        out, p = f.run(args(True, 3, 2, guard=True), steps=10)
        off, p_off = f.run(args(True, 3, 2, guard=False), steps=10)
    value = p.extra_generation_params["HyCa guard switches"]
    assert re.fullmatch(r"taylor-2 -> reuse at step \d+", value), value
    assert f"guard switched {value}" in capsys.readouterr().out
    assert "HyCa guard switches" not in p_off.extra_generation_params
    assert "HyCa guard switches" in out.infotexts[0]


def test_switches_name_the_branch_when_cond_and_uncond_are_split(monkeypatch):
    demote_first_check(monkeypatch)
    with Frontend("neo_wan") as f:
        _, p = f.run(args(True, 3, 2, guard=True), steps=10, split=True)
    value = p.extra_generation_params["HyCa guard switches"]
    assert "(cond)" in value and "(uncond)" in value


@pytest.mark.parametrize("cfg_scale", [3.0, 1.0])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_a1111_switches_name_branch_and_image_not_batch_rows(batch_size, cfg_scale, monkeypatch):
    """A1111 batches the cond rows, then the uncond rows, in one unnamed call: a switch on
    row ``batch_size + i`` is image ``i + 1``'s uncond branch (it read "(images 1, 2)" for one
    image)."""
    from hyca.engine.cache import HybridCache
    from hyca.engine.guard import Switch

    real = HybridCache.end_step

    def end_step(self, state):  # one demotion per batch row at the branch's third computed step
        computing, step = state.computing, state.step
        real(self, state)
        if computing and self.guard and state.stats.computed == 3:
            state.stats.switches += [Switch(step, "taylor-2", "reuse", item=row) for row in range(2 * batch_size)]

    monkeypatch.setattr(HybridCache, "end_step", end_step)
    with Frontend("a1111_sd3") as f:
        _, p = f.run(args(True, 3, 2, guard=True), steps=10, batch_size=batch_size, cfg_scale=cfg_scale)
    value = p.extra_generation_params["HyCa guard switches"]
    images = "" if batch_size == 1 else "images 1, 2, "  # hyca.engine.guard.describe_switches's image list
    assert f"({images}cond)" in value and f"({images}uncond)" in value, value
    assert "image 3" not in value and "images 1-4" not in value, value


@pytest.mark.parametrize("key,label", [
    (str([["/models/Lora/my lora, v2.safetensors", 1.0, 1.0, False]]), "my lora, v2"),   # Forge
    (str([["C:\\Lora\\Ünï (x).safetensors", 0.5, 0.5, False]]), "Ünï (x)"),
    (str([["/a/outline.safetensors", 1.0, 1.0], ["/a/detail.pt", 1.0, 1.0]]), "outline, detail"),
    (repr((("it's", 1.0, 1.0, None),)), "it's"),                                          # A1111
])
def test_lora_sets_are_named_by_their_files(key, label):
    from hyca.adapters.webui.processing import lora_label

    assert re.fullmatch(re.escape(label) + r" \([0-9a-f]{8}\)", lora_label(key))
    other = key.replace("1.0", "0.7") if "1.0" in key else key.replace("0.5", "0.7")
    assert lora_label(other) != lora_label(key)  # the same files at other weights
    assert re.fullmatch(r"[0-9a-f]{8}", lora_label("not a list ["))


def test_engine_notes_go_to_the_console_once(monkeypatch, capsys):
    from hyca.engine.cache import HybridCache

    real = HybridCache.begin_step

    def noting(self, state, *a, **k):
        state.stats.note("a note from the engine")
        return real(self, state, *a, **k)

    monkeypatch.setattr(HybridCache, "begin_step", noting)
    with Frontend("forge_flux") as f:
        f.run(args(True, 3, 2), steps=6)
        f.run(args(True, 3, 2), steps=6)
    assert capsys.readouterr().out.count("a note from the engine") == 1


def test_probed_profile_records_the_settings_of_its_pass(automatic, capsys):
    from hyca.profiles.io import read_profile
    from hyca.profiles.settings import RunSettings
    from webui_harness import flow_sigmas

    with Frontend("forge_flux") as f:
        f.run(args(True, 4, 2, compute_last=False, profile="automatic"), steps=12, cfg_scale=3.5)
        (path,) = automatic.glob("*.safetensors")
        profile, _ = read_profile(path)
        # that file chosen for passes at other settings (automatic would probe for them): said once,
        # with the guard's part
        f.run(args(True, 4, 2, compute_last=False, profile=path.name, guard=True), steps=8, cfg_scale=1.0)
        f.run(args(True, 4, 2, compute_last=False, profile=path.name, guard=True), steps=8, cfg_scale=1.0)
    chosen = RunSettings.of_profile(profile.metadata)
    assert chosen == RunSettings(steps=12, guidance_scale=3.5, sigmas=tuple(flow_sigmas(12).tolist()), interval=4,
                                 warmup=2, compute_last=False, positions="step")
    lines = [line for line in capsys.readouterr().out.splitlines() if "chosen for other settings" in line]
    assert len(lines) == 1
    assert "steps 12 vs 8" in lines[0] and "guidance 3.5 vs 1" in lines[0] and "robust path" in lines[0]


def test_a_profile_probed_without_guidance_starts_a_guided_pass_from_plain_reuse(automatic, capsys):
    """As on diffusers (hyca.profiles.off_settings): a pass with guidance on a profile
    probed without it starts every solver group from reuse, says so, and lists the switches."""
    import torch

    from hyca.math.solvers import pool_names
    from hyca.profiles.io import read_profile, save_profile

    with Frontend("forge_flux") as f:
        f.run(args(True, 3, 2, profile="automatic"), steps=10, cfg_scale=1.0)  # probes, unguided
    # the tiny model's probe picks reuse everywhere: give its groups a solver to switch from
    (path,) = automatic.glob("*.safetensors")
    profile, _ = read_profile(path)
    profile.solvers = torch.full_like(profile.solvers, pool_names().index("taylor-1"))
    save_profile(profile, path)
    with Frontend("forge_flux") as f:  # the file chosen by name (automatic would probe for CFG 4)
        _, p = f.run(args(True, 3, 2, profile=path.name, guard=True), steps=10, cfg_scale=4.0)
        out = capsys.readouterr().out
        _, p_off = f.run(args(True, 3, 2, profile=path.name, guard=False), steps=10, cfg_scale=4.0)
    line = next(line for line in out.splitlines() if "chosen for other settings" in line)
    assert "guidance 1 vs 4" in line and "starts every solver group from plain reuse" in line
    switches = p.extra_generation_params["HyCa guard switches"].split(", ")
    assert switches and all(re.fullmatch(r"\S+ -> reuse at step 0 \(robust start\)", s) for s in switches), switches
    assert "HyCa guard switches" not in p_off.extra_generation_params


def test_no_settings_message_for_uniform_profiles_or_the_same_settings(automatic, capsys):
    with Frontend("forge_flux") as f:
        f.run(args(True, 3, 2), steps=10)
        f.run(args(True, 3, 2, profile="automatic"), steps=10)
        f.run(args(True, 3, 2, profile="automatic"), steps=10)
    assert "chosen for other settings" not in capsys.readouterr().out


# --- LoRA identity ------------------------------------------------------------------------

def forge_p(lora_hash):
    return SimpleNamespace(sd_model=SimpleNamespace(forge_objects=object(), current_lora_hash=lora_hash))


def test_lora_identity_on_forge_and_neo():
    from hyca.adapters.webui.processing import lora_identity

    assert lora_identity(forge_p(str([]))) == ""  # backend/diffusion_engine/base.py default
    assert lora_identity(forge_p("")) == ""
    targets = str([["/models/Lora/a.safetensors", 0.8, 1.0, False]])
    assert lora_identity(forge_p(targets)) == targets


def test_lora_identity_on_a1111_follows_loaded_networks(monkeypatch):
    from hyca.adapters.webui.processing import lora_identity
    from webui_harness import standins

    with standins("forge"):
        import networks

        p = SimpleNamespace(sd_model=SimpleNamespace(model=object()))
        networks.load_networks([])
        assert lora_identity(p) == ""
        networks.load_networks(["outline"], [1.0], [0.7])
        first = lora_identity(p)
        networks.load_networks(["outline"], [1.0], [0.5])
        assert first and lora_identity(p) != first  # another strength: another set, as A1111 sees it
        networks.load_networks([])
        assert lora_identity(p) == ""
    monkeypatch.delitem(__import__("sys").modules, "networks", raising=False)
    assert lora_identity(p) == ""  # the Lora extension disabled


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_no_lora_is_the_base_profile_and_a_lora_set_is_probed(kind, automatic, capsys):
    """LoRA reuse off: without a LoRA the base profile serves (no extra probe); a LoRA
    set gets its own probe on all three frontends."""
    reuse_off = args(True, 3, 2, profile="automatic", lora_reuse=False)
    with Frontend(kind) as f:
        f.run(reuse_off, steps=10)                    # probes the base model
        _, p_base = f.run(reuse_off, steps=10)        # no LoRA: the base profile
        _, p_lora = f.run(reuse_off, steps=10, lora_hash="outline")  # probes the set
        _, p_again = f.run(reuse_off, steps=10, lora_hash="outline")
    out = capsys.readouterr().out
    assert out.count("[HyCa] probing ") == 2  # the base model, then the LoRA set
    assert p_base.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert "HyCa LoRA ARI" not in p_base.extra_generation_params
    # the probing pass is cached with the set's profile from its first step
    assert p_lora.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert p_lora.extra_generation_params["HyCa LoRA ARI"] == p_again.extra_generation_params["HyCa LoRA ARI"] == "1.000"


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_each_lora_set_is_announced_by_its_own_name(kind, automatic, capsys):
    """LoRA reuse off, two LoRA sets in turn: each probe is announced with the set's name
    (Forge's key begins alike for every set: its first 12 characters named them all the same,
    and the second announcement was swallowed as already said)."""
    reuse_off = args(True, 3, 2, profile="automatic", lora_reuse=False)
    with Frontend(kind) as f:
        f.run(reuse_off, steps=10, lora_hash="outline")
        f.run(reuse_off, steps=10, lora_hash="detail")
    lines = [line for line in capsys.readouterr().out.splitlines() if "probing its own profile" in line]
    assert len(lines) == 2 and "outline" in lines[0] and "detail" in lines[1], lines


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_a_lora_set_is_compared_with_the_base_profile_saved_by_an_earlier_session(kind, automatic, capsys):
    """LoRA reuse off in a new session whose base profile for these settings is in the cache
    (an earlier session probed it): the LoRA set's profile is compared with that one, not
    told "no base profile for these settings yet" (found by a fresh helper in ComfyUI)."""
    with Frontend(kind) as f:
        f.run(args(True, 3, 2, profile="automatic"), steps=10)  # probes the base model, saved to the cache
    capsys.readouterr()
    with Frontend(kind) as f:  # a new session: nothing known but the cache
        _, p = f.run(args(True, 3, 2, profile="automatic", lora_reuse=False), steps=10, lora_hash="outline")
    out = capsys.readouterr().out
    assert out.count("[HyCa] probing ") == 1 and "no base profile" not in out
    assert p.extra_generation_params["HyCa LoRA ARI"] == "1.000"  # the stand-in LoRA leaves the clusters as they were
