"""What HyCa tells a user about a run: which profile ran (``hyca.stats`` and the log), when
a pipeline call takes another profile than the one ``hyca.enable`` named (once), one log
line per probe rather than one per candidate run, and an interval that spans the whole
run (the library notes it, the CLI refuses it before loading a model).

Tiny FluxPipeline (tests/tiny.py); profiles live in the test's own folders."""

from __future__ import annotations

import logging

import pytest
import torch

import hyca
from hyca.adapters.diffusers.families import blocks_of, family_of, hidden_size
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.cli import main
from hyca.engine.schedule import Schedule
from hyca.profiles import Profile, load_profile, save_profile

from tiny import tiny_flux, tiny_pipeline

STEPS = 12


@pytest.fixture
def pipe():
    return tiny_pipeline(tiny_flux())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty local cache and no other profile source."""
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "nothing-here"))
    return tmp_path / "cache"


def conditioning() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g))


def generate(pipe, steps: int = STEPS) -> torch.Tensor:
    return pipe(**conditioning(), height=32, width=32, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


#: a first-use probe kept small: two candidate solvers
PROBE = dict(**conditioning(), height=32, width=32, clusters=2, progress=False, candidates=("reuse", "taylor-1"))


def said(caplog, text: str, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "hyca" and text in r.getMessage() and (level is None or r.levelno == level)]


def test_each_call_names_its_profile_and_a_replacement_is_logged_once(pipe, cache, caplog):
    caplog.set_level(logging.DEBUG, logger="hyca")
    hyca.enable(pipe, interval=3, warmup=2, num_inference_steps=8, probe_kwargs=PROBE)  # probes for 8 steps now
    (at_8,) = cache.glob("*.safetensors")
    (line,) = said(caplog, "HyCa: FluxTransformer2DModel: profile ")
    assert f"probed on first use, saved to {at_8}" in line and "made for 8 steps" in line
    assert "a pipeline call at other settings takes or probes the profile for its own" in line

    generate(pipe, steps=8)
    run = hyca.stats(pipe)[0]
    assert run.profile == f"probed on first use, saved to {at_8}"
    assert f"profile: probed on first use, saved to {at_8}" in run.describe()

    generate(pipe)  # 12 steps: a profile for them is probed, and the change said once
    (at_12,) = set(cache.glob("*.safetensors")) - {at_8}
    assert hyca.stats(pipe)[0].profile == f"probed on first use, saved to {at_12}"
    generate(pipe)
    (change,) = said(caplog, "calls at 12 steps")
    assert str(at_12) in change and f"in place of probed on first use, saved to {at_8}" in change

    assert len(said(caplog, "HyCa [cond]:", logging.INFO)) == 3  # the three pipeline calls, not the probes' runs

    hyca.enable(pipe, interval=3, warmup=2)  # found in the cache this time
    generate(pipe)
    assert hyca.stats(pipe)[0].profile == f"{at_12} (local cache)"


def test_a_probe_logs_one_line_and_its_candidate_runs_only_at_debug(pipe, caplog):
    caplog.set_level(logging.DEBUG, logger="hyca")
    profile = hyca.probe(pipe, steps=8, interval=3, warmup=2, **PROBE)
    trials = profile.metadata["selection"]["closed_loop"]["trials"]
    assert len(said(caplog, "closed loop chose", logging.INFO)) == 1
    assert not said(caplog, "HyCa [", logging.INFO)
    runs = [t for t in trials if "same_as" not in t]  # a trial that is an earlier one's run ran once
    assert len(said(caplog, "HyCa [cond]:", logging.DEBUG)) >= len(runs) >= 2  # one per cached run at least
    hyca.enable(pipe, profile, interval=3, warmup=2)  # the model's own runs keep their INFO line
    generate(pipe)
    assert len(said(caplog, "HyCa [cond]:", logging.INFO)) == 1
    hyca.disable(pipe)


def test_explicit_profiles_are_named_as_given(pipe, tmp_path):
    transformer = pipe.transformer
    blocks, dim = len(blocks_of(transformer, family_of(transformer))), hidden_size(transformer)
    path = save_profile(Profile.uniform("taylor-1", blocks, dim), tmp_path / "mine.safetensors",
                        fingerprint(transformer))
    for given, expected in [(str(path), str(path)), (load_profile(path), str(path)),
                            ("taylor-2", "solver 'taylor-2' for every dimension (no profile file)"),
                            (Profile(torch.zeros(blocks, dim), torch.zeros(blocks, 1)),
                             "a Profile object given to hyca.enable")]:
        hyca.enable(pipe, given, interval=3, warmup=2)
        generate(pipe)
        assert hyca.stats(pipe)[0].profile == expected
    hyca.disable(pipe)


def test_an_interval_that_spans_the_run_is_said_once_and_noted_in_every_run(pipe, caplog):
    caplog.set_level(logging.INFO, logger="hyca")
    hyca.enable(pipe, "taylor-1", interval=20, warmup=2)
    generate(pipe)
    generate(pipe)
    run = hyca.stats(pipe)[0]
    assert (run.computed, run.forecast) == (3, 9)  # steps 0, 1 (warm-up) and 11 (the last): by hand
    (line,) = said(caplog, "N=20 does not fit in this run", logging.WARNING)
    assert "(12 steps, warm-up 2): of the 10 steps after the warm-up it computes 1 and forecasts 9" in line
    assert "use an N below 10" in line
    assert any("N=20 does not fit in this run" in n for n in run.notes)

    caplog.clear()  # told up front when the steps are given, and not again at the run
    hyca.enable(pipe, "taylor-1", interval=20, warmup=2, num_inference_steps=STEPS)
    assert said(caplog, "N=20 does not fit in this run", logging.WARNING)
    generate(pipe)
    assert len(said(caplog, "N=20 does not fit in this run", logging.WARNING)) == 1

    caplog.clear()
    hyca.enable(pipe, "taylor-1", interval=9, warmup=2)  # 1 + 9 = 10: step 10 is computed, the interval fits
    generate(pipe)
    assert not said(caplog, "does not fit") and not any("does not fit" in n for n in hyca.stats(pipe)[0].notes)
    hyca.disable(pipe)


def test_whether_an_interval_fits_is_read_from_the_schedule_by_hand():
    # 12 steps, warm-up 3: computed 0, 1, 2, then 2 + N must come before the last step, 11
    assert Schedule(8, 3).interval_beyond(12) is None  # step 10 is computed
    assert "of the 9 steps after the warm-up it computes 1 and forecasts 8" in Schedule(9, 3).interval_beyond(12)
    # a profile's short first interval without the last step (diffusers TaylorSeer's start): step 4 only
    lite = Schedule(20, 3, first_interval=2, compute_last=False)
    assert "it computes 1 and forecasts 8" in lite.interval_beyond(12)
    assert Schedule(5, 3).interval_beyond(3) is None  # nothing forecast: the engine says that itself


@pytest.mark.parametrize("arguments, expected", [
    (["--steps", "12", "--interval", "20"], "--interval 20 with --steps 12: N=20 does not fit in this run"),
    (["--steps", "12", "--interval", "9"], "use an N below 9"),  # the probe's warm-up 3: 2 + 9 = 11, the last step
    (["--steps", "3"], "--steps 3 with --interval 5 and --warmup 3 computes every step"),
    (["--interval", "1"], "computes every step"),
])
def test_the_cli_refuses_a_schedule_the_probe_cannot_serve_before_loading_the_model(
        arguments, expected, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("hyca.cli._load_pipeline", no_model)
    assert main(["probe", "--model", "reference", *arguments]) == 1
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("settings", [dict(interval=1), dict(interval=4, warmup=30)])
def test_settings_with_nothing_to_forecast_get_no_advice_meant_for_a_bare_transformer(settings, caplog):
    """A pipeline whose schedule forecasts nothing: the closest (shipped) profile plays no part,
    so nothing about its settings or about probing a bare transformer is said; the run says
    every step was computed."""
    from hyca.reference import load_pipeline

    reference = load_pipeline()
    with caplog.at_level(logging.INFO, logger="hyca"):
        hyca.enable(reference, **settings)
        reference("a large red circle at the center on a white background", num_inference_steps=8, seed=0)
    stats = hyca.stats(reference)[0]
    hyca.disable(reference)
    assert "bare transformer" not in caplog.text and "made for other settings" not in caplog.text
    assert (stats.computed, stats.forecast) == (8, 0) and "every step is computed" in stats.describe()


def test_a_wrong_positions_axis_is_refused_before_anything_is_probed(pipe, cache, caplog):
    with caplog.at_level(logging.INFO, logger="hyca"), pytest.raises(ValueError, match="positions must be one of"):
        hyca.enable(pipe, interval=4, warmup=3, positions="time", num_inference_steps=16)
    assert "probing" not in caplog.text and not cache.exists()


def test_enable_on_a_pipeline_with_a_profile_for_other_settings_says_its_calls_choose_for_their_own(cache, caplog):
    """The shipped reference profiles were chosen on the step axis; ``positions="sigma"``
    makes them a profile for other settings. On a pipeline (whose calls take or probe one
    for their own settings) the enable-time warning says that, not that runs take the
    off-settings path (fresh-eyes finding 9); on a bare transformer it says the path."""
    from hyca.reference import load_pipeline

    caplog.set_level(logging.WARNING, logger="hyca")
    pipe = load_pipeline()
    hyca.enable(pipe, interval=4, warmup=3, positions="sigma")
    (line,) = said(caplog, "was made for other settings")
    assert "each pipeline call takes or probes one for its own settings" in line and "off-settings path" not in line
    hyca.disable(pipe)
    caplog.clear()
    hyca.enable(pipe.transformer, interval=4, warmup=3, positions="sigma")
    (line,) = said(caplog, "was made for other settings")
    assert "takes the off-settings path" in line and "bare transformer cannot be probed" in line
    hyca.disable(pipe.transformer)


def test_a_profile_that_forecasts_the_last_step_says_so_in_the_stats(pipe):
    """A profile chosen on TaylorSeer lite's end (metadata ``skip_last``) forecasts the last
    step though the run asked for it computed: the stats say so, and the counts show it
    (12 steps, N=3, warm-up 2: 0 1 | 4 7 10, plus 11 only when the last step is computed)."""
    from hyca.engine.cache import LAST_FORECAST

    transformer = pipe.transformer
    blocks, dim = len(blocks_of(transformer, family_of(transformer))), hidden_size(transformer)
    counts = {}
    for skip_last in (False, True):
        chosen = Profile.uniform("taylor-1", blocks, dim)
        # what the probe writes (hyca.probing.probe: a lite-start candidate, chosen for N and warm-up)
        chosen.metadata.update(first_interval=3, chosen_for={"interval": 3, "warmup": 2},
                               **({"skip_last": True} if skip_last else {}))
        hyca.enable(pipe, chosen, interval=3, warmup=2)
        generate(pipe)
        run = hyca.stats(pipe)[0]
        counts[skip_last] = run.computed
        assert (LAST_FORECAST in run.notes) == skip_last
    hyca.disable(pipe)
    assert counts == {False: 6, True: 5}
