"""What the hosts read off a sampler's name (:mod:`hyca.adapters.samplers`), against the
names the frontends use: k-diffusion's ``sample_<name>`` functions as ComfyUI lists them
(``comfy/k_diffusion/sampling.py``), the WebUIs' labels (``modules/sd_samplers_kdiffusion.py``)
and diffusers' scheduler classes and configs."""

import copy

import pytest
from diffusers import EulerAncestralDiscreteScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from hyca.adapters.samplers import renoising, replaces_noise, scheduler_renoising


@pytest.mark.parametrize("name, label, replaces", [
    ("sample_euler_ancestral", "euler_ancestral", False),
    ("sample_dpmpp_2m_sde", "dpmpp_2m_sde", False),
    ("sample_lcm", "lcm", True),
    ("Euler a", "Euler a", False),
    ("DPM++ 2M SDE", "DPM++ 2M SDE", False),
    ("LCM", "LCM", True),
])
def test_a_renoising_sampler_is_named_as_the_user_knows_it(name, label, replaces):
    reason = renoising(name)
    assert reason.label == label and replaces_noise(reason) is replaces
    assert str(reason) == f"sampler: {label} adds fresh noise every step (the profile was chosen without)"
    for copied in (copy.copy(reason), copy.deepcopy(reason)):  # a copy is the same reason
        assert str(copied) == str(reason) and copied.label == label and copied.replaces is replaces


@pytest.mark.parametrize("name", ["sample_euler", "sample_dpmpp_2m", "Euler", "DPM++ 2M", "UniPC", None, ""])
def test_a_deterministic_sampler_gives_no_reason(name):
    assert renoising(name) is None and not replaces_noise(renoising(name))


def test_diffusers_schedulers_by_class_and_config():
    assert scheduler_renoising(FlowMatchEulerDiscreteScheduler()) is None
    stochastic = scheduler_renoising(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    assert stochastic.label == "FlowMatchEulerDiscreteScheduler (stochastic_sampling=True)" and stochastic.replaces
    assert scheduler_renoising(LCMScheduler()).replaces
    ancestral = scheduler_renoising(EulerAncestralDiscreteScheduler())
    assert ancestral.label == "EulerAncestralDiscreteScheduler" and not ancestral.replaces
