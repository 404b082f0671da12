"""Each pipeline call is a request: its settings are read from the call, its profile is
chosen for them, and its run state is its own.

``pipe(...)`` looks ``__call__`` up on ``type(pipe)``, so patching the instance would not
see a call. ``hyca.enable`` therefore gives the pipeline a subclass of its own class
(made once per class) whose ``__call__`` opens a :class:`~.scopes.Request` and calls the
pipeline's own; ``hyca.disable`` gives the original class back. The subclass has the
original's name, module, qualified name and (through ``__wrapped__``) call signature, so
``repr``, ``save_pretrained`` (``_class_name``), ``from_pipe``, ``components`` and
``isinstance`` see the pipeline as before.

Before the first step the request reads the call's ``num_inference_steps`` (or the length
of its ``sigmas`` / ``timesteps``), its classifier-free guidance (:func:`.settings.guidance_of`),
its ``sigmas`` and the scheduler's shift, and picks the profile for those settings: the
one ``hyca.enable`` chose when it was chosen for them; else, for ``profile="auto"``, a
profile chosen for exactly these settings (ranked lookup in the profile folders) or one
probed once for them and saved to the cache; remembered per settings. Explicit profiles
(a file, a :class:`~hyca.profiles.Profile`, a solver name) are used as given; the engine
says what differs from the settings they were chosen for.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ...engine.cache import HybridCache
from ...engine.schedule import Schedule
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings, differences
from ...profiles.io import ProfileError
from ..samplers import Renoising, expect_renoising, profile_for_renoising, replaces_noise, scheduler_renoising
from . import hooks, parallel, sharing
from .scopes import REQUEST, Request
from .settings import guidance_of, schedule_shift

logger = logging.getLogger("hyca")

WRAPS = "_hyca_wraps"  # on a request subclass: the pipeline class it stands for
CONTROLLER = "_hyca_requests"  # in an enabled pipeline's __dict__: its :class:`Requests`
_SUBCLASSES: dict[type, type] = {}
_SUBCLASSES_LOCK = threading.Lock()


@dataclass
class Chooser:
    """For one transformer of an enabled pipeline: what ``hyca.enable`` was given, and the
    profiles chosen so far per run settings."""

    attribute: str
    spec: Any  # the ``profile`` argument for this transformer: "auto", a file, a Profile, a solver name
    template: HybridCache  # the engine ``hyca.enable`` made (and returned)
    schedule: Schedule  # HyCa's schedule as given (each profile may set its own start)
    options: RunSettings  # interval, warm-up, last step, positions axis as given
    #: the first-use probe for given settings, run with the pipeline making the call (None: the enabled one)
    probe: Callable[[RunSettings, Any], Callable[[], Profile] | None]
    resolve: Callable[[torch.nn.Module, Callable[[], Profile] | None, RunSettings], Profile]
    chosen: dict[RunSettings, Profile] = field(default_factory=dict)
    #: settings whose first-use probe failed: what their runs say (they use ``template``'s profile)
    failed: dict[RunSettings, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    enabled_on: Any = None  # weak reference to the transformer hyca.enable hooked (set by intercept)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy of an enabled pipeline: a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def hooked(self) -> torch.nn.Module | None:
        """The transformer ``hyca.enable`` hooked for this chooser, while it exists."""
        return self.enabled_on() if self.enabled_on is not None else None

    def engine_for(self, transformer: torch.nn.Module, run: RunSettings, pipe: Any = None) -> HybridCache:
        """A fresh engine for one request at ``run`` (see the module doc); ``pipe``: the
        pipeline making the call, which a first-use probe samples with. (Not the pipeline this
        chooser was enabled with: with several enabled pipelines around one transformer that one
        may be sampling in another thread, waiting for this lock, and would never be free.)"""
        with self.lock:  # two requests at new settings: one probe, not two at once on one transformer
            profile = self.chosen.get(run)
            if profile is None and transformer.training:  # runs uncached (the root hook says so): choose later
                profile = self.template.profile
            elif profile is None:
                profile = self.chosen[run] = self._choose(transformer, run, pipe)
        engine = self.engine_of(profile)
        if run in self.failed:
            engine.run_notes = (self.failed[run],)
        return engine

    def known(self, transformer: torch.nn.Module, run: RunSettings) -> Profile | None:
        """The profile made for ``run`` without probing (a call that cannot probe: another
        pipeline's, already sampling): chosen before in this process, ``hyca.enable``'s, or
        a profile file chosen for exactly these settings; ``None`` when only a probe would
        give one."""
        from .api import AUTO

        profile = self.chosen.get(run)
        if profile is not None or self.spec != AUTO:
            return profile if profile is not None else self.template.profile
        if not differences(RunSettings.of_profile(self.template.profile.metadata), run, own_sigmas=True):
            return self.template.profile
        if not self.lock.acquire(blocking=False):  # a probe holds it: never wait inside a run under way
            return None
        try:
            found = self.resolve(transformer, None, run)
        except ProfileError:
            return None
        finally:
            self.lock.release()
        if differences(RunSettings.of_profile(found.metadata), run, own_sigmas=True):
            return None
        self.chosen.setdefault(run, found)
        return found

    def engine_of(self, profile: Profile) -> HybridCache:
        """A fresh engine for one run on ``profile``."""
        if profile is self.template.profile:
            return hooks.fresh_engine(self.template)
        template = self.template
        made = HybridCache(profile, self.schedule, template.positions, template.cache_dtype,
                           guard=template.guard_option, compare_settings=template.compare_settings,
                           off_settings=template.off_settings)
        made._told = template._told  # logged once per enabled model, noted in each run's stats
        return made

    def _choose(self, transformer: torch.nn.Module, run: RunSettings, pipe: Any = None) -> Profile:
        from .api import AUTO

        chosen_for = RunSettings.of_profile(self.template.profile.metadata)
        if self.spec != AUTO or not differences(chosen_for, run, own_sigmas=True):
            return self.template.profile
        if run.steps is not None and all(self.schedule.plan(run.steps)):
            # nothing to forecast, nothing for a probe to compare: the engine says the run is computed
            return self.template.profile
        if parallel.context_parallel(transformer) is not None:
            # every rank must hold the profile enable agreed on (node-local caches may differ), and
            # no rank can probe: the engine says what differs
            return self.template.profile
        try:  # without a probe (a second expert): the closest profile found
            profile = self.resolve(transformer, self.probe(run, pipe), run)
        except ProfileError:
            return self.template.profile
        except Exception as error:  # noqa: BLE001 - a probe that failed must not fail the user's call
            self.failed[run] = (f"the probe for {run.describe()} failed ({type(error).__name__}: {error}); calls at "
                                f"these settings use {self.template.profile.source or 'the profile hyca.enable found'}")
            return self.template.profile  # (said by each of their runs: engine_for)
        if profile.source != self.template.profile.source:  # once per settings: chosen[run] remembers it
            logger.info("HyCa: %s: calls at %s use profile %s (in place of %s, which hyca.enable named)",
                        type(transformer).__name__, run.describe(), profile.source, self.template.profile.source)
        return profile


class Requests:
    """An enabled pipeline's request controller: one :class:`Chooser` per transformer, and
    the pipeline object's one call at a time."""

    def __init__(self, choosers: list[Chooser]) -> None:
        self.choosers = choosers
        self._calling = threading.RLock()  # reentrant: a probe inside a call samples with the same pipeline
        self._said_wait = self._said_replaced = False

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy(pipe): a lock cannot be copied, the copy gets its own
        return {"choosers": self.choosers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["choosers"])

    def _say_replaced(self, pipe: Any, chooser: Chooser, transformer: Any) -> None:
        """Once per pipeline object: its transformer is not the one ``hyca.enable`` hooked."""
        enabled_on = chooser.hooked()
        if transformer is enabled_on or enabled_on is None or self._said_replaced:
            return
        self._said_replaced = True
        logger.warning("HyCa: this call runs %s", replaced_note(pipe, chooser.attribute, enabled_on))

    @contextlib.contextmanager
    def request(self, pipe: Any, call: Callable, args: tuple, kwargs: dict) -> Iterator[None]:
        """The scope of one pipeline call (``call`` is the pipeline class's ``__call__``)."""
        with self._one_call_at_a_time(pipe), self._scope(pipe, call, args, kwargs):
            yield

    @contextlib.contextmanager
    def _one_call_at_a_time(self, pipe: Any) -> Iterator[None]:
        """A call from another thread while this pipeline object samples waits for it (said
        once): the pipeline's scheduler holds the running call's timesteps and step index, so
        two calls at once would break diffusers' loop and give one of them a wrong image."""
        if not self._calling.acquire(blocking=False):
            if not self._said_wait:
                self._said_wait = True
                logger.warning("HyCa: this %s is sampling in another thread; the new call waits for it (a pipeline "
                               "object runs one call at a time: its scheduler holds the call's steps). For requests "
                               "at once, build one pipeline per request around the shared transformer "
                               "(docs/requests.md)", type(pipe).__name__)
            self._calling.acquire()
        try:
            yield
        finally:
            self._calling.release()

    @contextlib.contextmanager
    def _scope(self, pipe: Any, call: Callable, args: tuple, kwargs: dict) -> Iterator[None]:
        engines, settings = {}, {}
        told = None
        for chooser in self.choosers:
            transformer = getattr(pipe, chooser.attribute, None)
            root = hooks.root_hook(transformer) if isinstance(transformer, torch.nn.Module) else None
            if root is not None and root.engine is not chooser.template:
                # enabled again (through this or another pipeline): that enable's settings replaced these
                chooser = _CHOOSERS.get(transformer, chooser)
            if root is None or root.engine is not chooser.template:
                self._say_replaced(pipe, chooser, transformer)
                continue  # HyCa set aside (a probe running) or disabled
            root.forget_uncached()  # this call's uncached calls (training mode) count alone
            told = read_call(pipe, call, args, kwargs) if told is None else told
            if told is None:
                break  # arguments the pipeline itself will refuse
            run = told.merged(chooser.options)
            settings[id(transformer)] = run
            noisy = scheduler_renoising(getattr(pipe, "scheduler", None))
            # a scheduler that replaces the noise computes every step: no profile to choose, nothing to probe
            # (a probe would also draw from the global generator the run's noise comes from)
            engine = (chooser.engine_of(chooser.template.profile) if replaces_noise(noisy)
                      else chooser.engine_for(transformer, run, pipe))
            engines[id(transformer)] = _for_renoising(chooser, transformer, engine, run, noisy) if noisy else engine
        request = Request(engines, settings)
        held = [t for t in (getattr(pipe, c.attribute, None) for c in self.choosers) if isinstance(t, torch.nn.Module)]
        with sharing.sampling(held):  # no probe swaps the hooks while this call samples
            token = REQUEST.set(request)
            try:
                yield
            finally:
                REQUEST.reset(token)
                request.close()


def _for_renoising(chooser: Chooser, transformer: torch.nn.Module, engine: HybridCache, run: RunSettings,
                   reason: Renoising) -> HybridCache:
    """A call whose scheduler adds fresh noise every step (:mod:`..samplers`): a model-output
    or output-head profile gives way to plain reuse of the residuals (said once per model),
    and the run takes the off-settings path from reuse (in its stats), as in the WebUI and
    ComfyUI (bench/results/renoising.md)."""
    from .families import blocks_of, family_of, hidden_size

    kept, note = profile_for_renoising(engine.profile, len(blocks_of(transformer, family_of(transformer))),
                                       hidden_size(transformer), reason)
    if note is not None:
        engine = chooser.engine_of(kept)
        told = _TOLD_RENOISING.setdefault(transformer, set())
        if note not in told:
            told.add(note)
            logger.warning("HyCa: %s", note)
    expect_renoising(engine, run, reason)
    return engine


#: per transformer (weakly: a freed one's id can come back on another), the notes said once
_TOLD_RENOISING: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def read_call(pipe: Any, call: Callable, args: tuple, kwargs: dict) -> RunSettings | None:
    """The settings a call of ``pipe`` runs at, as far as its arguments tell: steps (the
    length of ``sigmas`` or ``timesteps`` when given), classifier-free guidance
    (:func:`.settings.guidance_of`), the sigma schedule when given, the scheduler's fixed
    shift. ``None`` when the arguments do not fit the call (the pipeline raises then)."""
    signature = inspect.signature(call)
    try:
        bound = signature.bind_partial(pipe, *args, **kwargs)
    except TypeError:
        return None
    given = dict(bound.arguments)
    given.pop(next(iter(signature.parameters)), None)  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(given.pop(name, {}))
        elif name not in given and parameter.default is not inspect.Parameter.empty:
            given[name] = parameter.default
    sigmas = _numbers(given.get("sigmas"))
    timesteps = _numbers(given.get("timesteps"))
    steps = given.get("num_inference_steps")
    if sigmas is not None:
        steps = len(sigmas)
    elif timesteps is not None:
        steps = len(timesteps)
    steps = int(steps) if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps >= 1 else None
    return RunSettings(steps=steps, guidance_scale=guidance_of(pipe, given), sigmas=sigmas,
                       shift=schedule_shift(getattr(pipe, "scheduler", None)))


def _numbers(values: Any) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        return tuple(float(v) for v in (values.tolist() if hasattr(values, "tolist") else values))
    except (TypeError, ValueError):
        return None


def request_class(cls: type) -> type:
    """The request subclass of pipeline class ``cls`` (made once)."""
    with _SUBCLASSES_LOCK:
        made = _SUBCLASSES.get(cls)
        if made is not None:
            return made
        own_call = cls.__call__

        @functools.wraps(own_call)
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            controller = self.__dict__.get(CONTROLLER)
            if controller is None:
                return own_call(self, *args, **kwargs)
            with controller.request(self, own_call, args, kwargs):
                return own_call(self, *args, **kwargs)

        made = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "__doc__": cls.__doc__, WRAPS: cls})
        _SUBCLASSES[cls] = made
        return made


def original_class(pipe: Any) -> type:
    """The pipeline's own class, whether HyCa gave it a request subclass or not."""
    return type(pipe).__dict__.get(WRAPS, type(pipe))


def intercept(pipe: Any, choosers: list[Chooser]) -> None:
    """Route ``pipe(...)`` through a request scope (see the module doc)."""
    object.__setattr__(pipe, "__class__", request_class(original_class(pipe)))
    pipe.__dict__[CONTROLLER] = Requests(choosers)
    for chooser in choosers:
        transformer = getattr(pipe, chooser.attribute, None)
        if isinstance(transformer, torch.nn.Module):
            _CHOOSERS[transformer] = chooser
            chooser.enabled_on = weakref.ref(transformer)


#: transformer -> the chooser of the pipeline it was last enabled through (for the calls of
#: other pipelines built around it: :func:`engine_for_other_pipeline`)
_CHOOSERS: "weakref.WeakKeyDictionary[torch.nn.Module, Chooser]" = weakref.WeakKeyDictionary()
_TOLD_OTHER: set[tuple[int, RunSettings]] = set()


def engine_for_other_pipeline(transformer: torch.nn.Module, pipe: Any, steps: int | None, current: Any,
                              ) -> tuple[Any, str | None]:
    """For a run of a pipeline that holds an enabled pipeline's transformer but was not
    itself passed to ``hyca.enable`` (``Cls(**pipe.components)``, ``from_pipe``), at its
    first step: the engine for its settings (steps from its scheduler, guidance from its
    ``__call__``'s arguments, the scheduler's shift; its sigmas are not told apart from the
    default schedule's) and a note when no profile made for them is known (only a probe
    would give one, and a run under way cannot probe). ``current``: the scope's engine,
    kept when its profile is the one. ``(current, None)`` when the transformer was not
    enabled through a pipeline."""
    from .runs import call_arguments

    chooser = _CHOOSERS.get(transformer)
    root = hooks.root_hook(transformer)
    if chooser is None or root is None or root.engine is not chooser.template:
        return current, None
    given = call_arguments(pipe)
    guidance = guidance_of(pipe, {k: v for k, v in given.items() if k != "self"}) if given else None
    run = RunSettings(steps=steps, guidance_scale=guidance,
                      shift=schedule_shift(getattr(pipe, "scheduler", None))).merged(chooser.options)
    profile = chooser.known(transformer, run)
    note = None
    if profile is None:
        profile = chooser.template.profile
        note = (f"{type(pipe).__name__} shares {type(transformer).__name__} with a pipeline HyCa is enabled on but "
                f"was not passed to hyca.enable itself, and no profile made for its settings ({run.describe()}) is "
                "known yet (a run under way cannot probe): it uses the profile hyca.enable chose. Call the enabled "
                "pipeline once at these settings first, or pass this pipeline to hyca.enable too")
        if (id(chooser), run) not in _TOLD_OTHER:
            _TOLD_OTHER.add((id(chooser), run))
            logger.warning("HyCa: %s", note)
    if getattr(current, "profile", None) is profile:
        return current, note
    return chooser.engine_of(profile), note


def enabled_through(pipe: Any) -> bool:
    """Whether ``hyca.enable`` was called on the pipeline ``pipe`` (and not disabled since)."""
    return not isinstance(pipe, torch.nn.Module) and CONTROLLER in getattr(pipe, "__dict__", {})


def replaced(pipe: Any) -> dict[str, torch.nn.Module]:
    """The transformers ``hyca.enable`` hooked through ``pipe`` that the pipeline no longer
    holds (``pipe.transformer = other`` since), still hooked with that enable's settings, by
    the pipeline attribute that held them."""
    controller = getattr(pipe, "__dict__", {}).get(CONTROLLER)
    out = {}
    for chooser in controller.choosers if controller is not None else ():
        enabled_on = chooser.hooked()
        root = hooks.root_hook(enabled_on) if enabled_on is not None else None
        held = getattr(pipe, chooser.attribute, None)
        if root is not None and root.engine is chooser.template and held is not enabled_on:
            out[chooser.attribute] = enabled_on
    return out


def release(pipe: Any) -> None:
    """Undo :func:`intercept`: the pipeline's own class again, nothing of HyCa's left on it."""
    if WRAPS in type(pipe).__dict__:
        object.__setattr__(pipe, "__class__", original_class(pipe))
    pipe.__dict__.pop(CONTROLLER, None)


def replaced_note(pipe: Any, attribute: str, enabled_on: torch.nn.Module) -> str:
    """What a pipeline whose ``attribute`` was replaced after ``hyca.enable`` says (log, stats)."""
    return (f"uncached: {type(pipe).__name__}.{attribute} was replaced after hyca.enable; call hyca.enable on the "
            f"pipeline again to cache the new one (hyca.disable(pipe) also removes HyCa from the "
            f"{type(enabled_on).__name__} it was enabled on)")
