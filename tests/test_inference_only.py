"""Inference only (issue 18 item 4): a forward with gradients enabled or the model in
training mode passes through uncached and touches no HyCa state.

The scenario of ParaAttention #15 and mflux PR #136: HyCa on, validation images generated,
then training steps whose timesteps decrease like a sampling run. The expectation is the
same training on an unpatched copy of the model (same seed, same data)."""

from __future__ import annotations

import logging

import torch

import hyca
from hyca.engine.schedule import Schedule

from tiny import Inputs, euler_sample, fresh_copy, tiny_flux, tiny_pipeline

INTERVAL, WARMUP, STEPS = 2, 1, 8
TRAINING_TIMESTEPS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


def validation_images(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
                height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


def train(model: torch.nn.Module, inputs: Inputs) -> list[float]:
    """Eight optimizer steps of a flow-matching loss at decreasing timesteps; the losses."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    losses = []
    for t in TRAINING_TIMESTEPS:
        target = torch.randn(inputs.noise.shape, generator=g)
        prediction = inputs.call(model, inputs.noise, torch.tensor(t))
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_training_after_validation_images_equals_the_unpatched_model(caplog):
    unpatched = tiny_flux()
    patched = fresh_copy(unpatched)
    pipe = tiny_pipeline(patched)
    hyca.enable(pipe, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    cached = validation_images(pipe)
    assert not torch.equal(cached, validation_images(tiny_pipeline(fresh_copy(unpatched))))  # HyCa did forecast
    validation = hyca.stats(pipe)[0]
    inputs = Inputs()

    with caplog.at_level(logging.WARNING, logger="hyca"):
        losses = train(patched, inputs)  # no "backward through the graph a second time"
    assert losses == train(unpatched, inputs)
    for (name, a), (_, b) in zip(patched.named_parameters(), unpatched.named_parameters()):
        assert torch.equal(a, b), name
    said = [r.message for r in caplog.records if "inference only" in r.message]
    assert len(said) == 1 and "training mode" in said[0]
    after = hyca.stats(pipe)[0]
    # what the stats report now: the training forwards, one per training step, computed in full
    # (not the validation run's counts beside a note that says nothing was cached)
    assert (after.computed, after.forecast) == (len(losses), 0)
    assert (validation.computed, validation.forecast) != (len(losses), 0)
    assert any("inference only" in note for note in after.notes)

    # evaluation after training: under no_grad HyCa caches again; the steps it computes are
    # the unpatched model's outputs on the same inputs
    trajectory: list[torch.Tensor] = []

    def record(model, x, sigma, i):
        trajectory.append(x.clone())
        return inputs.call(model, x, sigma)

    with torch.no_grad():
        euler_sample(unpatched, inputs, STEPS, record)
        expected = [inputs.call(unpatched, x, s) for x, s in zip(trajectory, _sigmas())]
        got = [inputs.call(patched, x, s) for x, s in zip(trajectory, _sigmas())]
    schedule = Schedule(interval=INTERVAL, warmup=WARMUP)  # a loop without a scheduler: its end is not known
    computed = [i for i in range(STEPS) if schedule.computes(i, None)]
    assert 0 < len(computed) < STEPS
    for i in computed:
        assert torch.equal(got[i], expected[i]), i
    assert any(not torch.equal(got[i], expected[i]) for i in range(STEPS) if i not in computed)  # it does cache
    # the cached run's stats are its own: no note of the training calls before it
    assert hyca.stats(pipe)[0].forecast > 0 and not any("inference only" in n for n in hyca.stats(pipe)[0].notes)


def _sigmas():
    from tiny import sigmas

    return sigmas(STEPS)[:STEPS]


def test_a_forward_with_gradients_in_eval_mode_passes_through():
    """Gradients through the model (e.g. gradient-based guidance) in eval mode: computed in
    full, equal to the unpatched model's, and the gradients too."""
    unpatched = tiny_flux()
    patched = fresh_copy(unpatched)
    hyca.enable(patched, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    inputs = Inputs()
    for model in (patched, unpatched):
        model.eval()
    results = []
    for model in (patched, unpatched):
        x = inputs.noise.clone().requires_grad_(True)
        outputs = []
        for t in TRAINING_TIMESTEPS[:5]:
            out = inputs.call(model, x, torch.tensor(t))
            out.sum().backward()
            outputs.append(out.detach())
        results.append((outputs, x.grad.clone()))
    (got, got_grad), (want, want_grad) = results
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_grad, want_grad)
    stats = hyca.stats(patched)[0]
    assert (stats.computed, stats.forecast) == (5, 0)  # the five forwards with gradients, in full


def test_each_pipeline_call_in_training_mode_reports_its_own_calls():
    """Two pipeline calls with the model in training mode: hyca.stats gives the latest
    call's transformer calls (STEPS, one branch), not the sum over both calls."""
    pipe = tiny_pipeline(tiny_flux())
    hyca.enable(pipe, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    pipe.transformer.train()
    with torch.no_grad():
        validation_images(pipe)
        validation_images(pipe)
    stats = hyca.stats(pipe)[0]
    assert (stats.computed, stats.forecast) == (STEPS, 0) and any("training mode" in n for n in stats.notes)
    # with true CFG each step calls the transformer per branch: still STEPS, of the branch called last
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        pipe(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
             negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
             negative_pooled_prompt_embeds=torch.randn(1, 24, generator=g), true_cfg_scale=3.0, height=64, width=64,
             num_inference_steps=STEPS, output_type="latent")
    stats = hyca.stats(pipe)[0]
    assert (stats.branch, stats.computed) == ("uncond", STEPS)
    hyca.disable(pipe)
