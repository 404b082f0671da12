"""The diffusers private API HyCa relies on (``hyca/adapters/diffusers/compat.py``) exists
and behaves as HyCa assumes, on freshly built real diffusers objects: a release that
renames a field fails here, by name."""

from __future__ import annotations

import diffusers.hooks.hooks as diffusers_hooks
import torch

from hyca.adapters.diffusers import compat
from hyca.adapters.diffusers.scopes import HostState

from tiny import tiny_flux, tiny_pipeline


class Recorder(compat.ModelHook):
    """A stateful hook holding a ``StateManager``, as diffusers' own caches do."""

    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.states = compat.StateManager(HostState)
        self.resets = 0

    def reset_state(self, module):
        self.resets += 1
        return module


def test_a_registry_has_the_fields_hyca_reads():
    block = tiny_flux().transformer_blocks[0]
    assert compat.registry_of(block) is None
    made = compat.registry(block)
    assert getattr(block, compat.REGISTRY_ATTRIBUTE) is made and compat.registry_of(block) is made
    made.register_hook(Recorder(), "recorder")
    for name in compat.REGISTRY_FIELDS:
        assert hasattr(made, name), name
    assert compat.hook_order(made) == ["recorder"] and len(made._fn_refs) == 1
    reference = made._fn_refs[0]
    assert isinstance(reference, compat.HookFunctionReference)
    assert hasattr(reference, "forward") and hasattr(reference, "original_forward")
    compat.forget(made, "recorder")
    assert compat.hook_order(made) == [] and made._fn_refs == [] and "recorder" not in made.hooks


def test_a_state_manager_has_the_fields_hyca_overrides():
    manager = compat.StateManager(HostState)
    for name in compat.STATE_MANAGER_FIELDS:
        assert name in vars(manager), name
    assert manager._context is None and manager._state_cache == {}


def test_cache_context_reaches_the_state_manager_of_a_stateful_hook():
    model = tiny_flux()
    hook = Recorder()
    compat.registry(model.transformer_blocks[0]).register_hook(hook, "recorder")
    compat.refresh_children(model)
    assert hasattr(diffusers_hooks, "_set_cache_context")
    with model.cache_context("cond"):
        assert hook.states._context.name == "cond"
    assert hook.states._context is None


def test_a_pipeline_call_ends_with_the_reset_method():
    model = tiny_flux()
    assert hasattr(type(model), compat.RESET_METHOD)
    hook = Recorder()
    compat.registry(model.transformer_blocks[0]).register_hook(hook, "recorder")
    pipe = tiny_pipeline(model)
    g = torch.Generator().manual_seed(0)
    pipe(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
         height=32, width=32, num_inference_steps=2, output_type="latent")
    assert hook.resets >= 1  # maybe_free_model_hooks -> _reset_stateful_cache -> each stateful hook
