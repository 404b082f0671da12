"""Keeping HyCa's block hooks in their blocks' forward chains: installing and removing
them without disturbing hooks others added (accelerate's offloading, diffusers' own), and
putting back any that another library unwrapped (see :mod:`.hooks`)."""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Callable

import torch

from . import compat
from .block import BLOCK_HOOK, HyCaBlockHook
from .outputs import SKIP_HOOK

logger = logging.getLogger("hyca")
ROOT_ATTRIBUTE = "_hyca"


class HookChain:
    """The installation half of :class:`~.root.HyCaRoot`: its torch hooks on the
    transformer (and output head) and its diffusers hook on every block."""

    def install(self, transformer: torch.nn.Module) -> None:
        for hook, block in zip(self.block_hooks, self.blocks):
            self._register_block(hook, block)
        self._install_root(transformer)
        compat.registry(transformer).register_hook(self.skip_hook, SKIP_HOOK)  # see .outputs
        self._skip_wrapper = transformer.__dict__.get("forward")
        setattr(transformer, ROOT_ATTRIBUTE, self)
        if not hasattr(type(transformer), compat.RESET_METHOD):
            # Transformers without diffusers' CacheMixin (SD3, Lumina2, Z-Image, HiDream, Sana):
            # a pipeline's maybe_free_model_hooks() resets components that have this method.
            setattr(transformer, compat.RESET_METHOD, self._pipeline_cleanup)
        compat.refresh_children(transformer)

    def _install_root(self, transformer: torch.nn.Module) -> None:
        self._handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         transformer.register_forward_hook(self._post)]
        if self.head is not None:  # a request's profile may forecast the head's input
            self._handles.append(self.head.register_forward_pre_hook(self._head_pre, with_kwargs=True))

    def _register_block(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        registry = compat.registry(block)
        registry.register_hook(hook, BLOCK_HOOK)
        _mark(hook)
        wrapper = block.__dict__.get("forward")
        if hook.index < len(self._wrappers):
            self._wrappers[hook.index], self._seen[hook.index] = wrapper, wrapper
        else:
            self._wrappers.append(wrapper)
            self._seen.append(wrapper)

    def uninstall(self, transformer: torch.nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for hook, block in zip(self.block_hooks, self.blocks):
            self._unregister_block(hook, block)
        self.skip_hook.inert = not _take_out(transformer, SKIP_HOOK, self.skip_hook, self._skip_wrapper)
        if transformer.__dict__.get(compat.RESET_METHOD) == self._pipeline_cleanup:
            delattr(transformer, compat.RESET_METHOD)
        if transformer.__dict__.get(ROOT_ATTRIBUTE) is self:
            delattr(transformer, ROOT_ATTRIBUTE)
        self.default.reset()
        compat.refresh_children(transformer)

    def _unregister_block(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        hook.inert = not _take_out(block, BLOCK_HOOK, hook, self._wrappers[hook.index])

    # --- keeping the hooks in place -------------------------------------------------------

    def check_hooks(self, transformer: torch.nn.Module) -> None:
        """Before the blocks run: every block hook still in its block's forward chain,
        put back where something unwrapped it. Cheap when nothing changed."""
        if (len(self._handles) != 2 + (self.head is not None) or self._handles[0].id not in transformer._forward_pre_hooks
                or self._handles[1].id not in transformer._forward_hooks):
            for handle in self._handles:
                handle.remove()
            self._install_root(transformer)
        forwards = [block.__dict__.get("forward") for block in self.blocks]
        ours = [hook.fn_ref.forward for hook in self.block_hooks]
        if (len(self._seen_ours) == len(ours) and all(map(operator.is_, forwards, self._seen))
                and all(map(operator.is_, ours, self._seen_ours))):
            return  # every block's chain as HyCa last found it whole: one identity check per block
        for i, (hook, block) in enumerate(zip(self.block_hooks, self.blocks)):
            current = block.__dict__.get("forward")
            if current is self._seen[i] and _is_ours(hook):
                continue
            self._repair(hook, block)
            self._seen[i] = block.__dict__.get("forward")
        self._seen_ours = [hook.fn_ref.forward if _is_ours(hook) else None for hook in self.block_hooks]

    def _repair(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        registry = compat.registry(block)
        if registry.get_hook(BLOCK_HOOK) is not hook:
            if BLOCK_HOOK in registry.hooks:
                compat.forget(registry, BLOCK_HOOK)
            self._register_block(hook, block)
            logger.info("HyCa: hook of block %d was replaced; registered again", hook.index)
            return
        if not _is_ours(hook):
            # diffusers' remove_hook of a hook below HyCa's rewired HyCa's forward to the one below
            hook.fn_ref.original_forward = hook.fn_ref.forward
            hook.fn_ref.forward = _bound_new_forward(hook, block)
        if not _reaches(block, self._wrappers[hook.index]):
            # e.g. accelerate's hooks were applied before HyCa and removed since: the block's
            # forward was restored to what it was before HyCa wrapped it
            compat.forget(registry, BLOCK_HOOK)
            self._register_block(hook, block)
            logger.info("HyCa: hook of block %d had been unwrapped by another library; registered again", hook.index)

    def live(self, transformer: torch.nn.Module) -> bool:
        """Are HyCa's hooks in place (after putting back any that were unwrapped)?"""
        if self.lost is not None or not self._handles:
            return False
        try:
            self.check_hooks(transformer)
        except Exception as error:  # never claim caching that cannot happen
            self.lost = f"its hooks could not be put back ({error})"
            return False
        return not any(hook.inert for hook in self.block_hooks)



def _take_out(module: torch.nn.Module, name: str, hook: Any, wrapper: Any) -> bool:
    """Take HyCa's hook ``name`` out of ``module``'s forward chain without disturbing hooks
    others added after it (accelerate's offloading wraps the module from outside the
    diffusers registry, and diffusers' ``remove_hook`` would drop it). ``wrapper``: the
    forward diffusers made for the hook. False where it must stay in the chain (wrapped by
    something HyCa cannot rewire): the caller makes it do nothing."""
    registry = compat.registry_of(module)
    if registry is None or registry.get_hook(name) is not hook:
        return False
    order = compat.hook_order(registry)
    index = order.index(name)
    below = hook.fn_ref.original_forward
    if index < len(order) - 1 or module.__dict__.get("forward") is wrapper:
        registry.remove_hook(name, recurse=False)  # diffusers rewires the chain itself
        return True
    if module.__dict__.get("_old_forward") is wrapper:  # accelerate wrapped HyCa's wrapper
        module._old_forward = below
        compat.forget(registry, name)
        return True
    if not _reaches(module, wrapper):  # already out of the chain
        compat.forget(registry, name)
        return True
    return False


def _mark(hook: HyCaBlockHook) -> None:
    """Tag the forward diffusers built from ``hook.new_forward`` so the chain check can
    tell it from one that replaced it."""
    hook.fn_ref.forward.__dict__["_hyca"] = hook


def _is_ours(hook: HyCaBlockHook) -> bool:
    return getattr(hook.fn_ref.forward, "__dict__", {}).get("_hyca") is hook


def _bound_new_forward(hook: HyCaBlockHook, block: torch.nn.Module) -> Callable:
    forward = functools.update_wrapper(functools.partial(hook.new_forward, block), hook.new_forward)
    forward.__dict__["_hyca"] = hook
    return forward


def _reaches(module: torch.nn.Module, target: Any) -> bool:
    """Does calling ``module`` go through ``target``? Follows the wrappers diffusers and
    accelerate put on ``forward`` (each keeps the one it wraps as ``__wrapped__``;
    accelerate's calls ``module._old_forward``)."""
    current = module.__dict__.get("forward")
    for _ in range(64):
        if current is None:
            return False
        if current is target:
            return True
        func = getattr(current, "func", None)
        if getattr(func, "__module__", "").startswith("accelerate") and "_old_forward" in module.__dict__:
            following = module.__dict__["_old_forward"]
            current = None if following is current else following
            continue
        current = getattr(current, "__wrapped__", None)
    return False
