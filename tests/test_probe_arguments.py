"""Probe arguments told wrong fail at once, with what each expects: in ``hyca.probe`` before
anything samples, and in ``hyca.enable``'s ``probe_kwargs`` when it is called (the plain
call's probe may run hours later, inside a user's pipeline call, at the first new setting)."""

from __future__ import annotations

import logging

import pytest

import hyca
from hyca.probing import check_options

from tiny import tiny_flux, tiny_pipeline

WRONG = [
    (dict(candidates="taylor-1"), "candidates must be a list of solver names"),
    (dict(candidates=[1, 2]), "candidates must be solver names (strings), got 1"),
    (dict(candidates=["taylor-9"]), "unknown solver 'taylor-9'"),
    (dict(singles=[None]), "singles must be solver names (strings), got None"),
    (dict(candidates=["reuse"], singles=["taylor-1"]), "singles ['taylor-1'] are not among the candidates"),
    (dict(tolerance="xyz"), "tolerance must be 'best', 'se' or a margin in dB >= 0, got 'xyz'"),
    (dict(tolerance=-1.0), "tolerance must be 'best', 'se' or a margin in dB >= 0, got -1.0"),
    (dict(halving="yes"), "halving must be True or False, got 'yes'"),
    (dict(clusters=0), "clusters must be an integer >= 1, got 0"),
    (dict(n_init=0), "n_init must be an integer >= 1, got 0"),
    (dict(spectral_rows="x"), "spectral_rows must be None or an integer >= 0"),
    (dict(selection="best"), "selection must be one of ('closed-loop', 'eq5'), got 'best'"),
    (dict(target="blocks"), "target must be one of"),
    (dict(on_progress=5), "on_progress must be a callable"),
    (dict(branch=""), "branch must be the cond branch's context name"),
    (dict(accumulate_on="nowhere"), "accumulate_on must be None or a torch device"),
]


@pytest.mark.parametrize("options, message", WRONG)
def test_the_core_check_names_what_each_option_expects(options, message):
    with pytest.raises(ValueError) as err:
        check_options(options)
    assert message in str(err.value)


def test_right_options_pass():
    check_options(dict(candidates=("reuse", "taylor-1"), singles=["reuse"], tolerance=0.5, halving=True, clusters=2))
    check_options(dict(tolerance="se"))
    check_options({})


@pytest.mark.parametrize("options, message", [
    *WRONG,
    (dict(bogus=1), "'bogus' is neither a hyca.probe setting"),
    (dict(prompt=[]), "prompt must be a caption or a non-empty list of captions"),
    (dict(prompt=["ok", 5]), "prompt must be a caption or a non-empty list of captions"),
    (dict(prompt=["ok", " "]), "prompt must be a caption or a non-empty list of captions"),
    (dict(num_inference_steps=20), "'num_inference_steps' is set by HyCa itself; use steps="),
    (dict(generator=None), "'generator' is set by HyCa itself; use seed="),
    (dict(interval=6), "'interval' is set by HyCa itself; use hyca.enable's interval="),
    (dict(height=33.5), "height must be a positive number of pixels"),
    (dict(clusters=1000), "clusters (1000) must be at most the hidden size"),
])
def test_enable_refuses_wrong_probe_kwargs_when_called(options, message):
    pipe = tiny_pipeline(tiny_flux())
    with pytest.raises(ValueError) as err:
        hyca.enable(pipe, "taylor-1", interval=3, warmup=2, probe_kwargs=options)
    assert message in str(err.value)
    assert not hyca.is_enabled(pipe)  # refused before anything was patched


def test_numpy_integers_are_integers():
    import numpy as np

    from hyca.adapters.diffusers.probe import check_probe_kwargs

    pipe = tiny_pipeline(tiny_flux())
    check_probe_kwargs(pipe, dict(steps=np.int64(12), interval=np.int64(3), warmup=np.int64(2), seed=np.int64(1),
                                  clusters=np.int64(2), height=np.int64(32)))


def test_steps_told_twice_must_agree():
    """probe_kwargs' steps prepare a profile for those steps; with num_inference_steps as
    well, the two must be the same (a 24-step profile was saved under a 16-step name)."""
    pipe = tiny_pipeline(tiny_flux())
    with pytest.raises(ValueError, match="probe_kwargs steps=24 and num_inference_steps=16 differ"):
        hyca.enable(pipe, "taylor-1", interval=3, warmup=2, num_inference_steps=16, probe_kwargs=dict(steps=24))
    hyca.enable(pipe, "taylor-1", interval=3, warmup=2, probe_kwargs=dict(steps=24))  # steps alone: allowed
    hyca.disable(pipe)


def test_enable_takes_the_pipelines_own_call_arguments_and_probe_settings():
    pipe = tiny_pipeline(tiny_flux())
    # a named profile: nothing is probed now, the probe_kwargs are checked all the same
    hyca.enable(pipe, "taylor-1", interval=3, warmup=2,
                probe_kwargs=dict(guidance_scale=2.0, max_sequence_length=16, candidates=["reuse", "taylor-1"],
                                  clusters=2))
    assert hyca.is_enabled(pipe)
    hyca.disable(pipe)


def test_fewer_calibration_captions_than_the_default_are_said(caplog):
    """A list of one caption is one sample (a caption string is sampled under four noises):
    said, as the default scores every candidate on four; four captions are not."""
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    said = {}
    for prompt in (["a red circle"], ["a red circle", "a blue square", "a red square", "a blue circle"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hyca"):
            hyca.probe(pipe, prompt=prompt, steps=6, interval=3, warmup=2, clusters=2, selection="eq5", progress=False)
        said[len(prompt)] = [r.getMessage() for r in caplog.records if "calibration sample" in r.getMessage()]
    assert len(said[1]) == 1 and "1 calibration sample(s)" in said[1][0] and not said[4]


def test_singles_with_the_open_loop_choice_are_said_to_be_ignored(caplog):
    """selection="eq5" tries no candidate alone: singles given with it are said to be
    ignored, and the profile does not record them as tried."""
    from hyca.reference import load_pipeline

    with caplog.at_level(logging.WARNING, logger="hyca"):
        profile = hyca.probe(load_pipeline(), steps=6, interval=3, warmup=2, clusters=2, selection="eq5",
                             singles=["reuse"], progress=False)
    assert any("selection='eq5' ignores them" in r.getMessage() for r in caplog.records)
    assert profile.metadata["probe"]["singles"] is None
