"""``python -m hyca``: make, inspect, compare and share profiles.

Subcommands: ``probe`` (run a model once and save its profile), ``show`` (summarise a
profile file), ``compare`` (adjusted Rand index between two profiles), ``push`` / ``pull``
(Hugging Face Hub). Exit codes: 0 success, 2 usage error (argparse), 1 a one-line error
for anything the user can fix (bad profile file, Hub failure, missing model).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .profiles import fingerprint as fpmod
from .profiles.hub import HubError, pull_profile, push_profile
from .profiles.io import ProfileError, load_profile, save_profile
from .profiles.names import profile_filename
from .profiles.profile import Profile


class CLIError(RuntimeError):
    """A user-fixable problem outside profiles and the Hub (e.g. a model that will not load)."""


# --- probe ------------------------------------------------------------------------------

def _is_reference(model: str) -> bool:
    """``reference``, or a folder holding a saved reference pipeline (e.g. a retrained one)."""
    import json

    index = Path(model) / "model_index.json"
    if model == "reference":
        return True
    try:
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == "ReferencePipeline"
    except (OSError, ValueError):
        return False


def _load_pipeline(model: str, dtype: str | None, device: str | None) -> Any:
    """The shipped reference model (``reference`` or its folder) or any diffusers pipeline path / repo id."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 halves memory on GPUs; CPUs (and the small reference model) run float32.
    dtype = dtype or ("bfloat16" if device.startswith("cuda") and model != "reference" else "float32")
    if _is_reference(model):
        try:
            from .reference import load_pipeline
        except ImportError as err:
            raise CLIError(f"the reference model is not available in this install ({err}); "
                           "pass --model <diffusers path or repo id>") from None
        try:
            pipe = load_pipeline(None if model == "reference" else model, dtype=getattr(torch, dtype))
        except FileNotFoundError as err:
            raise CLIError(str(err)) from None
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot load a diffusers pipeline from {model!r}: {str(err).splitlines()[0]}") from None
    return pipe.to(device)


def _check_probe_args(args: argparse.Namespace) -> None:
    """What can be told wrong before a model is loaded and a probe run."""
    import torch

    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} must be a positive number of pixels, got {getattr(args, name)}")
    if args.clusters is not None and args.clusters < 1:
        raise CLIError(f"--clusters must be at least 1 (clusters per block), got {args.clusters}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise CLIError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise CLIError(f"--guidance-scale must be >= 0 (1 = no guidance), got {args.guidance_scale}")
    if args.shift is not None and not args.shift > 0:
        raise CLIError(f"--shift must be positive, got {args.shift}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise CLIError(f"--device {args.device!r} is not a torch device ({str(err).splitlines()[0]})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if args.output is not None and not (Path(args.output).is_dir() or args.output.endswith(("/", "\\"))):
        folder = Path(args.output).parent
        if not folder.is_dir():
            raise CLIError(f"-o {args.output}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise CLIError(f"-o {args.output}: the folder {folder} is not writable")
        if Path(args.output).suffix != ".safetensors":  # the lookups and `hyca show` find *.safetensors only
            stem = Path(args.output).stem.removesuffix(".safetensors")
            raise CLIError(f"-o {args.output}: a profile file is a .safetensors file; name it "
                           f"{stem}.safetensors, or give a folder")
    if args.candidates is not None or args.singles is not None:
        from .probing import check_options

        try:
            check_options({"candidates": args.candidates, "singles": args.singles})
        except ValueError as err:
            raise CLIError(f"--candidates / --singles: {err}") from None
    if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        raise CLIError(f"--model {args.model}: no such folder")
    if args.height is not None and args.width is not None:  # before loading: a size no model here can serve
        _check_size(args.height, args.width, 1, args.device)
    _check_schedule(args)


def _check_schedule(args: argparse.Namespace) -> None:
    """A schedule the probe cannot serve, said before the model loads: one that forecasts
    no step (nothing to compare), or whose N does not fit in the run (after the warm-up at
    most the last step computed, the rest forecast). Defaults: :func:`hyca.probe`'s."""
    import inspect

    from .adapters.diffusers.probe import probe
    from .engine.schedule import Schedule

    own = inspect.signature(probe).parameters
    steps, interval, warmup = (getattr(args, k) if getattr(args, k) is not None else own[k].default
                               for k in ("steps", "interval", "warmup"))
    if steps < 1:
        raise CLIError(f"--steps must be a positive number of sampling steps, got {steps}")
    try:
        schedule = Schedule(interval=interval, warmup=warmup)
    except ValueError as err:
        raise CLIError(f"--interval/--warmup: {err}") from None
    if all(schedule.plan(steps)):
        raise CLIError(f"--steps {steps} with --interval {interval} and --warmup {warmup} computes every step, so "
                       "nothing is forecast and there is nothing to probe: use more steps, a shorter warm-up or "
                       "an interval above 1")
    beyond = schedule.interval_beyond(steps)
    if beyond is not None:
        raise CLIError(f"--interval {interval} with --steps {steps}: {beyond}")


def _check_size(height: int, width: int, multiple: int, device: str | None) -> None:
    """The app's limits (``hyca.app.models.size_problem``: ``$HYCA_MAX_PIXELS``, the model's
    multiple) as a one-line :class:`CLIError`."""
    from .app.models import size_problem

    why = size_problem(height, width, multiple, device)
    if why is not None:
        raise CLIError(f"--height/--width {why}")


def _probe_size(pipe: Any, args: argparse.Namespace) -> tuple[int, int]:
    """The size the probe will run at: the arguments, else the pipeline's own defaults, else 256."""
    own = dict(getattr(pipe, "hyca_probe_defaults", None) or {})
    return tuple(getattr(args, k) if getattr(args, k) is not None else own.get(k, 256) for k in ("height", "width"))


def _cmd_probe(args: argparse.Namespace) -> int:
    try:
        from .adapters.diffusers.fingerprint import fingerprint as diffusers_fingerprint
        from .adapters.diffusers.probe import probe
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        hint = f"; pip install {'scikit-learn' if missing.startswith('sklearn') else missing}" if missing else ""
        raise CLIError(f"the probe is not available in this install ({err}){hint}") from None
    _check_probe_args(args)
    pipe = _load_pipeline(args.model, args.dtype, args.device)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise CLIError(f"{type(pipe).__name__} has no transformer: HyCa accelerates diffusion transformers")
    try:  # before the probe: an unsupported model should fail at once, not after a run
        fp = diffusers_fingerprint(transformer)
    except TypeError as err:
        raise CLIError(str(err)) from None
    from .app.models import size_multiple

    _check_size(*_probe_size(pipe, args), size_multiple(pipe), str(pipe.device))
    extra: dict[str, Any] = {}  # the reference pipeline names its own probe defaults (hyca_probe_defaults)
    if args.guidance_scale is not None:
        from .adapters.diffusers.settings import guidance_argument

        extra.update(guidance_argument(pipe, args.guidance_scale))
    if args.shift is not None:
        if getattr(pipe.scheduler.config, "shift", None) is None:
            raise CLIError(f"{type(pipe.scheduler).__name__} has no shift setting")
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
    settings = {k: getattr(args, k) for k in ("prompt", "height", "width", "steps", "interval", "warmup", "clusters",
                                              "seed", "positions", "selection", "candidates", "singles", "target")
                if getattr(args, k) is not None}
    try:
        profile = probe(pipe, shared=args.shared, progress=True, **settings, **extra)
    except (ValueError, RuntimeError) as err:  # e.g. a prompt the model cannot read, an odd schedule
        raise CLIError(f"the probe failed: {str(err).splitlines()[0]}") from None
    # a folder (or the cache) gets the name lookup tries first for these settings
    from .profiles.settings import RunSettings

    chosen = RunSettings.of_profile(profile.metadata)
    name = profile_filename(fp, chosen.interval, chosen)
    if args.output is None:
        from .profiles.sources import default_cache_dir

        out = default_cache_dir() / name
    elif Path(args.output).is_dir() or args.output.endswith(("/", "\\")):
        out = Path(args.output) / name
    else:
        out = Path(args.output)
    try:
        save_profile(profile, out, fp)
    except OSError as err:
        raise CLIError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"saved profile to {out}")
    print(summary(load_profile(out), out))
    return 0


# --- show / compare ---------------------------------------------------------------------------

def _schedule_field(meta: dict, name: str) -> str:
    """A profile's ``interval`` / ``warmup``: its own field, else the one in ``chosen_for``
    (a profile saved without the field), else "not recorded"."""
    value = meta.get(name)
    if value is None:
        value = (meta.get("chosen_for") or {}).get(name) if isinstance(meta.get("chosen_for"), dict) else None
    return "not recorded" if value is None else str(value)


def _solver_counts(profile: Profile) -> list[str]:
    """``name: clusters (share of dims)`` per solver, most dims first."""
    from .math.solvers import pool

    dims = Counter(profile.dim_solvers().flatten().tolist())
    clusters = Counter(profile.solvers.flatten().tolist())
    total = profile.labels.numel()
    return [f"{pool()[i].name}: {_count(clusters[i], 'cluster')}, {100 * n / total:.1f}% of dims" for i, n in dims.most_common()]


def summary(profile: Profile, path: str | Path | None = None) -> str:
    """What ``show`` prints: model, shape, solvers, schedule, probe settings, provenance."""
    meta = profile.metadata
    fp = meta.get("fingerprint") or {}
    shared = bool((profile.labels == profile.labels[:1]).all()) and profile.num_blocks > 1
    probe = meta.get("probe") or {}
    lines = [
        *([f"file:      {path}"] if path is not None else []),
        f"model:     {fpmod.describe(fp) if fp else 'not recorded'}",
        f"blocks:    {', '.join(f'{k} x{v}' for k, v in fp.get('blocks', {}).items()) or '?'}",
        (f"shape:     output head's input, {profile.dim} dims, {_count(profile.num_clusters, 'cluster')}"
         if meta.get("target") == "output" else
         f"shape:     model output, {profile.dim} channels, {_count(profile.num_clusters, 'cluster')}"
         if meta.get("target") == "model_output" else
         f"shape:     {profile.num_blocks} blocks x {profile.dim} dims, {_count(profile.num_clusters, 'cluster')} per block")
        + f"{' (one labelling shared by all blocks)' if shared else ''}",
        "solvers:   " + "\n           ".join(_solver_counts(profile)),
        f"schedule:  chosen for interval N={_schedule_field(meta, 'interval')}, "
        f"warm-up {_schedule_field(meta, 'warmup')}"
        + (f", first computed step {meta['first_interval']} after warm-up" if meta.get("first_interval") else "")
        + (", last step forecast" if meta.get("skip_last") else ""),
        *(["guard:     off at the settings it was chosen for (the closed loop kept it without the guard)"]
          if meta.get("guard") is False else []),
        f"run:       chosen for {_chosen_for(meta)}",
        *([f"choice:    {_closed_loop(meta)}"] if _closed_loop(meta) else []),
        f"probe:     {', '.join(f'{k}={v}' for k, v in probe.items() if v is not None) or 'not recorded'}",
        f"created:   {meta.get('created', '?')} by hyca {meta.get('hyca_version', '?')} "
        f"(format {meta.get('format_version', '?')}, solver pool {meta.get('pool_version', '?')})",
    ]
    return "\n".join(lines)


def _closed_loop(meta: dict[str, Any]) -> str:
    """``<candidate>, the nearest of <n> cached runs (<fidelity> dB)``, or ``""`` when
    the profile records no closed-loop choice."""
    report = (meta.get("selection") or {}).get("closed_loop") or {}
    chosen, trials = report.get("chosen"), report.get("trials") or []
    if not chosen:
        return ""
    db = next((t.get("fidelity_db") for t in trials if t.get("name") == chosen), None)
    return f"{chosen}, the nearest of {len(trials)} cached runs" + (f" ({db:.1f} dB)" if db is not None else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _chosen_for(meta: dict[str, Any]) -> str:
    from .profiles.settings import RunSettings

    try:
        return RunSettings.of_profile(meta).describe()
    except ValueError as err:
        return f"unreadable ({err})"


def _cmd_show(args: argparse.Namespace) -> int:
    print(summary(load_profile(args.file), args.file))
    return 0


def _block_names(fp: dict[str, Any], count: int) -> list[str]:
    names = [f"{attr}.{i}" for attr, n in fp.get("blocks", {}).items() for i in range(int(n))]
    return names if len(names) == count else [f"block {i}" for i in range(count)]


def _cmd_compare(args: argparse.Namespace) -> int:
    from .profiles.compare import compare_profiles

    a, b = load_profile(args.a), load_profile(args.b)
    result = compare_profiles(a, b)
    names = _block_names(a.metadata.get("fingerprint") or {}, a.num_blocks)
    width = max(len(n) for n in names)
    print(f"a: {args.a}\nb: {args.b}")
    print(f"{'block':<{width}}  ARI")
    for name, ari in zip(names, result.ari_per_block):
        print(f"{name:<{width}}  {ari:6.3f}")
    same = {True: "yes", False: "NO: the ARI compares different models", None: "unknown"}[result.same_model]
    print(f"overall ARI (mean over {a.num_blocks} blocks): {result.ari_overall:.3f}")
    print(f"solver agreement: {100 * result.solver_agreement:.1f}% of dims use the same solver")
    print(f"same model: {same}")
    return 0


# --- Hub ------------------------------------------------------------------------------------

def _cmd_push(args: argparse.Namespace) -> int:
    url = push_profile(args.file, args.repo, token=args.token, private=args.private, path_in_repo=args.path_in_repo,
                       commit_message=args.message, endpoint=args.endpoint)
    print(f"uploaded {args.file} to {url}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    path = pull_profile(args.repo, args.file, output_dir=args.output, revision=args.revision, token=args.token,
                        endpoint=args.endpoint, cache_dir=args.cache_dir)
    print(f"downloaded {args.repo}/{args.file} to {path}")
    return 0


# --- parser ---------------------------------------------------------------------------------

def _add_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help='diffusers pipeline path or Hub repo id; "reference" (or a saved reference folder) '
                        "for the shipped reference model")
    for name, kind, what, default in [  # the defaults are hyca.probe's (the reference model names its own)
        ("prompt", str, "caption of the probing run, sampled under 4 noises",
         "four generic captions; the reference model's own four"),
        ("height", int, "image height in pixels", "256; the reference model 32"),
        ("width", int, "image width in pixels", "256; the reference model 32"), ("steps", int, "sampling steps", "28"),
        ("interval", int, "interval N it will run at", "5"), ("warmup", int, "fully computed warm-up steps", "3"),
        ("clusters", int, "clusters per block", "4"), ("seed", int, "random seed", "0"),
    ]:
        p.add_argument(f"--{name}", type=kind, help=f"{what} (default: {default})")
    p.add_argument("--positions", choices=["step", "sigma"], help="axis the solvers extrapolate along (default: step)")
    p.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance scale you sample with (true_cfg_scale for FLUX / Qwen-Image); "
                        "with guidance both branches are recorded and the guided output is scored (default: "
                        "the pipeline's own)")
    p.add_argument("--shift", type=float,
                   help="scheduler shift you sample with (flow-matching schedulers; default: the scheduler's own)")
    p.add_argument("--selection", choices=["closed-loop", "eq5"],
                   help="closed-loop (default): validated on cached runs of the probe's prompt; eq5: the paper's "
                        "open-loop choice alone")
    p.add_argument("--candidates", type=_names, metavar="NAMES",
                   help="comma-separated solver names to choose from, e.g. reuse,taylor-1,taylor-2 "
                        "(default: the whole pool; a wrong name is refused with the list of known ones)")
    p.add_argument("--singles", type=_names, metavar="NAMES",
                   help="comma-separated candidates the closed loop also tries alone, every cluster on one "
                        "solver (default: reuse,taylor-1,taylor-2,am2,bdf2; with --candidates: every candidate)")
    p.add_argument("--target", choices=["residual", "output", "model_output"],
                   help="what the profile forecasts (default: the closed loop chooses between the blocks' "
                        "residuals and the model output; output: the output head's input, tried only when named)")
    p.add_argument("--shared", action="store_true", help="one labelling for all blocks")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 for diffusers models on a GPU, else float32)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("-o", "--output", help="profile file, or folder to write <Class>-<hash>-n<N>-<settings>.safetensors "
                   "into (default: the local cache, where hyca finds it)")


def _names(text: str) -> list[str]:
    """``--candidates`` / ``--singles``: a comma-separated list of solver names, checked now."""
    from .math.solvers import get_solver

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more solver names separated by commas, e.g. reuse,taylor-1")
    for name in names:
        try:
            get_solver(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def _add_hub_auth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--endpoint", help="Hub endpoint, e.g. a mirror (default: HF_ENDPOINT or huggingface.co)")


def _add_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="profile file to upload (validated first)")
    p.add_argument("--repo", required=True, help="Hub repo id, e.g. your-name/hyca-profiles (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--path-in-repo", help="file name in the repo (default: the file's own name when it starts with "
                                          "<Class>-<config hash>, as a probed file's does with its settings, e.g. "
                                          "-n4-w3-s28-g1-sh1; else <Class>-<config hash>.safetensors)")
    p.add_argument("--message", help="commit message")
    _add_hub_auth(p)


def _add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, help="Hub repo id")
    p.add_argument("--file", required=True, help="file name in the repo")
    p.add_argument("-o", "--output", help="folder to copy it to (default: leave it in the Hub cache)")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--cache-dir", help="Hub cache folder (default: huggingface_hub's, e.g. ~/.cache/huggingface)")
    _add_hub_auth(p)


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="first profile file")
    p.add_argument("b", help="second profile file")


#: name -> (help, add arguments, run). Other subcommands register here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "probe": ("run a model once, choose solvers, save the profile", _add_probe, _cmd_probe),
    "show": ("summarise a profile file", lambda p: p.add_argument("file", help="profile file"), _cmd_show),
    "compare": ("adjusted Rand index between two profiles of one model", _add_compare, _cmd_compare),
    "push": ("upload a profile to the Hugging Face Hub", _add_push, _cmd_push),
    "pull": ("download a profile from the Hugging Face Hub", _add_pull, _cmd_pull),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hyca", description="HyCa profiles: probe, inspect and share.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit with 2
    try:
        return args.run(args)
    except (ProfileError, HubError, CLIError) as err:
        print(f"hyca {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hyca {args.command}: interrupted", file=sys.stderr)
        return 130
