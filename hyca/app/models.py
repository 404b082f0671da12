"""Which models the app offers, whether each can run here, and the loaded ones.

The shipped reference model is the default: it is in the repository, needs no network
and runs on a CPU in seconds. The real diffusers models load from a local folder or the
Hugging Face Hub cache; before loading, :func:`check` says in plain words why one cannot
run here (no weights and offline, no GPU, not enough memory) instead of letting a load
fail halfway. Loaded pipelines are shared by all sessions, each with a lock: whoever
holds it may enable HyCa, generate and disable again, so one session's hooks never
reach another's run.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.diffusers.families import FAMILIES

REFERENCE = "reference"
LORA_STYLES = ("outline", "pastel")
GB = 1024 ** 3
# Loading needs some room beyond the weights (activations, the VAE decode, fragmentation).
HEADROOM = 1.2
# Below this size a model is quick enough on a CPU (the reference model, small test models).
CPU_OK_BYTES = 2 * GB


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model menu. ``gigabytes``: the whole pipeline in ``dtype`` as
    published (used when no copy is on disk to measure); ``transformer``: the
    ``FAMILIES`` class HyCa hooks into."""

    key: str
    label: str
    repo_id: str | None
    transformer: str
    gigabytes: float
    steps: int
    height: int
    width: int
    guidance: float | None = None
    dtype: str = "bfloat16"
    notes: str = ""


CHOICES: tuple[ModelChoice, ...] = (
    ModelChoice(REFERENCE, "HyCa reference model (shipped, 32x32, CPU)", None, "FluxTransformer2DModel",
                0.1, 28, 32, 32, dtype="float32",
                notes="a small FLUX-architecture model trained on simple shapes; runs anywhere"),
    ModelChoice("flux-schnell", "FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", "FluxTransformer2DModel",
                33.5, 4, 1024, 1024, guidance=0.0, notes="4-step distilled; HyCa uses N=2 there"),
    ModelChoice("flux-dev", "FLUX.1-dev (gated: accept the licence on the Hub)", "black-forest-labs/FLUX.1-dev",
                "FluxTransformer2DModel", 33.5, 50, 1024, 1024, guidance=3.5),
    # Qwen-Image takes true_cfg_scale (with a negative prompt), not guidance_scale: keep its defaults.
    ModelChoice("qwen-image", "Qwen-Image", "Qwen/Qwen-Image", "QwenImageTransformer2DModel",
                57.7, 50, 1024, 1024),
    ModelChoice("sd35-medium", "Stable Diffusion 3.5 Medium (gated)", "stabilityai/stable-diffusion-3.5-medium",
                "SD3Transformer2DModel", 16.0, 40, 1024, 1024, guidance=4.5),
    ModelChoice("chroma", "Chroma1-HD", "lodestones/Chroma1-HD", "ChromaTransformer2DModel",
                27.5, 40, 1024, 1024, guidance=3.0),
    ModelChoice("lumina2", "Lumina-Image-2.0", "Alpha-VLLM/Lumina-Image-2.0", "Lumina2Transformer2DModel",
                10.5, 50, 1024, 1024, guidance=4.0),
    ModelChoice("cogview4", "CogView4-6B", "THUDM/CogView4-6B", "CogView4Transformer2DModel",
                30.0, 50, 1024, 1024, guidance=3.5),
    ModelChoice("sana", "Sana 1600M 1024px", "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
                "SanaTransformer2DModel", 8.5, 20, 1024, 1024, guidance=4.5),
)


def choices() -> tuple[ModelChoice, ...]:
    """The menu: only models whose transformer family HyCa's diffusers adapter supports."""
    return tuple(c for c in CHOICES if c.transformer in FAMILIES)


def choice(key: str) -> ModelChoice:
    for c in CHOICES:
        if c.key == key:
            return c
    raise KeyError(f"unknown model {key!r}; choose one of {[c.key for c in choices()]}")


DEFAULT_PROMPT = "a large red circle at the center on a white background"


def reference_prompt_hint() -> str:
    """The caption grammar the reference model was trained on, from its own data module."""
    from ..reference import data

    def one_of(names) -> str:
        return "{" + "|".join(names) + "}"

    return (f"The reference model knows captions like: a {one_of(data.SIZE_NAMES)} {one_of(data.COLOUR_NAMES)} "
            f"{one_of(data.SHAPES)} at the {one_of(data.POSITION_NAMES)} on a {one_of(data.BACKGROUND_NAMES)} "
            f"(or 'X and Y') background")


def custom_choice(path_or_repo: str) -> ModelChoice:
    """A model the user named: a local diffusers folder or a Hub repo id, family found on load."""
    return ModelChoice(f"custom:{path_or_repo}", path_or_repo, path_or_repo, "?", 0.0, 28, 512, 512)


# --- can it run here? -------------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    """What the machine offers, gathered by :func:`gather_facts` (kept apart so the
    decision in :func:`decide` is a pure function of them)."""

    local_folder: str | None  # a diffusers folder on disk holding the model
    on_disk_bytes: int | None  # size of the weights found on disk
    offline: bool
    gpu_free_bytes: int | None  # None: no GPU
    ram_available_bytes: int
    #: a folder given by path that is not a saved diffusers pipeline (no ``model_index.json``)
    not_a_pipeline: str | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str
    device: str = "cpu"
    offload: bool = False  # diffusers' model CPU offload: parts move to the GPU in turn


def estimated_bytes(c: ModelChoice, facts: Facts) -> int:
    return facts.on_disk_bytes if facts.on_disk_bytes else int(c.gigabytes * GB)


def decide(c: ModelChoice, facts: Facts) -> Verdict:
    """Whether ``c`` can run with ``facts``, where, and a sentence a user can act on."""
    if c.key == REFERENCE:
        if facts.local_folder is None:
            return Verdict(False, "The shipped reference model is missing (models/reference). Run from a source "
                                  "checkout of hyca, or retrain it with `python -m hyca.reference.train`.")
        return Verdict(True, "the shipped reference model runs on the CPU.")
    if facts.not_a_pipeline is not None:
        return Verdict(False, f"{facts.not_a_pipeline}: not a saved diffusers pipeline (it has no model_index.json). "
                              "Enter the folder that pipe.save_pretrained(...) wrote, or a Hub repo id such as "
                              "owner/name.")
    if facts.local_folder is None and c.repo_id.startswith(("/", ".", "~")):  # a path, not a Hub id
        return Verdict(False, f"{c.repo_id}: no such folder. Enter the folder of a saved diffusers pipeline "
                              "(it holds model_index.json) or a Hub repo id such as owner/name.")
    if facts.local_folder is None and not _repo_id(c.repo_id):
        return Verdict(False, f"{c.repo_id!r} is neither a folder nor a Hugging Face repo id (owner/name, letters, "
                              "digits, '-', '_', '.'). Enter the folder of a saved diffusers pipeline or a repo id.")
    need = estimated_bytes(c, facts)
    size = f"about {need / GB:.1f} GB" if need else "of unknown size"
    if facts.local_folder is None and facts.offline:
        return Verdict(False, f"{c.label} is not available: its weights ({size}) are not in the Hugging Face "
                              f"cache and the app is offline (HF_HUB_OFFLINE=1). Download them once with "
                              f"`hf download {c.repo_id}` on a connected machine, or enter a local folder.")
    if facts.gpu_free_bytes is None and 0 < need <= CPU_OK_BYTES and facts.ram_available_bytes >= need * HEADROOM:
        return Verdict(True, f"{c.label}: {size}, small enough to run on the CPU.")
    if facts.gpu_free_bytes is None:
        return Verdict(False, f"{c.label} needs a GPU: it is {size} and on a CPU one image would take many "
                              f"minutes. Run the app on a GPU machine (or a GPU Space); the reference model "
                              f"shows HyCa on a CPU.")
    if facts.gpu_free_bytes >= need * HEADROOM:
        where = "loaded from disk" if facts.local_folder else "downloaded from the Hub on first use"
        return Verdict(True, f"{c.label}: {size}, fits in GPU memory ({facts.gpu_free_bytes / GB:.0f} GB free); "
                             f"{where}.", device="cuda")
    if facts.ram_available_bytes >= need * HEADROOM:
        return Verdict(True, f"{c.label}: {size} does not fit in GPU memory ({facts.gpu_free_bytes / GB:.0f} GB "
                             f"free); using model CPU offload (slower: parts move to the GPU in turn).",
                       device="cuda", offload=True)
    return Verdict(False, f"{c.label} does not fit: it needs {size}, the GPU has "
                          f"{facts.gpu_free_bytes / GB:.0f} GB free and the machine "
                          f"{facts.ram_available_bytes / GB:.0f} GB of RAM. Use a larger GPU or a smaller model.")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def reference_folder() -> Path | None:
    """The shipped reference model, unless ``$HYCA_REFERENCE_MODEL`` names another folder."""
    override = os.environ.get("HYCA_REFERENCE_MODEL")
    if override:
        folder = Path(override)
    else:
        from ..reference import shipped_path

        folder = shipped_path()
    return folder if (folder / "model_index.json").is_file() else None


def cached_snapshot(repo_id: str) -> Path | None:
    """The Hub cache's copy of a diffusers repo (one with ``model_index.json``), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def gather_facts(c: ModelChoice) -> Facts:
    from ..profiles.hub import hub_offline

    if c.key == REFERENCE:
        folder = reference_folder()
    elif c.repo_id and Path(c.repo_id).expanduser().is_dir():
        folder = Path(c.repo_id).expanduser()
        if not (folder / "model_index.json").is_file():  # a folder, but not a pipeline: sized and loaded, nothing
            return Facts(local_folder=None, on_disk_bytes=None, offline=hub_offline(), gpu_free_bytes=None,
                         ram_available_bytes=0, not_a_pipeline=str(folder))
    else:
        try:
            folder = cached_snapshot(c.repo_id) if c.repo_id else None
        except Exception:  # an invalid repo id for the Hub: treated as "not cached"
            folder = None
    gpu = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    return Facts(local_folder=str(folder) if folder else None,
                 on_disk_bytes=_folder_bytes(folder) if folder else None,
                 offline=hub_offline(), gpu_free_bytes=gpu, ram_available_bytes=_ram_available())


def _ram_available() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional; /proc/meminfo is enough on Linux
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def check(c: ModelChoice) -> Verdict:
    return decide(c, gather_facts(c))


# --- image sizes it can serve ------------------------------------------------------------------

#: Default largest image, in pixels, when ``$HYCA_MAX_PIXELS`` is not set. On a CPU: 256 x 256,
#: 64 times the area the reference model is trained at (32 x 32); attention cost grows with
#: the square of the token count. On a GPU: 2048 x 2048, four times the area
#: of the menu's 1024 x 1024 models; 4096 x 4096 is 65,536 tokens of 16 x 16 pixels, four
#: times as many, so sixteen times the attention of 2048 x 2048.
CPU_MAX_PIXELS = 256 * 256
GPU_MAX_PIXELS = 2048 * 2048


def max_pixels(device: str | None = None) -> int:
    """The largest ``height * width`` the app and the CLI run: ``$HYCA_MAX_PIXELS`` (a whole
    number of pixels, e.g. ``1048576`` for 1024 x 1024), else :data:`GPU_MAX_PIXELS` on a
    CUDA device and :data:`CPU_MAX_PIXELS` elsewhere (``device`` None: CUDA if available).

    Raises:
        ValueError: ``$HYCA_MAX_PIXELS`` is not a positive whole number.
    """
    value = os.environ.get("HYCA_MAX_PIXELS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"HYCA_MAX_PIXELS must be a positive whole number of pixels, got {value!r}")
        return int(value)
    on_gpu = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    return GPU_MAX_PIXELS if on_gpu else CPU_MAX_PIXELS


def size_multiple(pipe: Any) -> int:
    """Pixels per side of one transformer token, which height and width must be multiples of:
    the reference model's patch (it works in pixel space), else the VAE's down-sampling
    (``vae_scale_factor``) times the patch the latents are cut into: 2 x 2 for pipelines that
    pack latents themselves (FLUX, Chroma, Qwen-Image: ``_pack_latents``), the transformer's
    ``patch_size`` otherwise (SD3, Sana, Lumina2, ...)."""
    transformer = getattr(pipe, "transformer", None)
    if "Reference" in type(pipe).__name__:
        from ..reference.model import patch_of

        return int(patch_of(transformer))
    vae = getattr(pipe, "vae_scale_factor", None)
    vae = vae if isinstance(vae, int) and vae > 0 else 8
    if hasattr(pipe, "_pack_latents"):
        return vae * 2
    patch = getattr(getattr(transformer, "config", None), "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return vae * int(patch)


def size_problem(height: int, width: int, multiple: int = 1, device: str | None = None) -> str | None:
    """None if a ``height`` x ``width`` image (pixels) can be served here, else one line that
    says which limit it breaks and what to do."""
    if height < 1 or width < 1:
        return f"{height}x{width}: height and width must be positive numbers of pixels"
    if height % multiple or width % multiple:
        fit = f"{max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)}"
        return f"{height}x{width}: this model needs height and width in multiples of {multiple} pixels (e.g. {fit})"
    try:
        limit = max_pixels(device)
    except ValueError as err:  # a malformed HYCA_MAX_PIXELS is the problem to report
        return str(err)
    if height * width > limit:
        return (f"{height}x{width} is {height * width:,} pixels, more than this machine serves ({limit:,}); "
                f"choose a smaller size, or raise the limit with HYCA_MAX_PIXELS={height * width} "
                f"if the memory is there")
    return None


# --- loading and sharing -----------------------------------------------------------------------

@dataclass
class LoadedModel:
    choice: ModelChoice
    pipe: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    loras: tuple[str, ...] = ()
    size: tuple[int, int] = (0, 0)  # (height, width) generated at
    warm: bool = False  # one untimed call made, so timings exclude one-off start-up costs
    compared: int = 0  # side-by-side requests served: the timed order alternates between them

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer


class ModelError(RuntimeError):
    """The chosen model cannot be used here; the message says why and what to do."""


def _load_reference(folder: str) -> tuple[Any, tuple[str, ...]]:
    from ..reference import load_pipeline

    pipe = load_pipeline(folder)
    loras = []
    lora_dir = Path(folder) / "loras"
    for style in LORA_STYLES:
        weights = lora_dir / f"{style}.safetensors"
        if weights.is_file():
            pipe.load_lora_weights(str(lora_dir), weight_name=weights.name, adapter_name=style)
            loras.append(style)
    if loras:
        pipe.disable_lora()
    return pipe, tuple(loras)


def _is_reference_folder(folder: str | None) -> bool:
    """A folder saved from hyca's ReferencePipeline (diffusers cannot find that class by itself)."""
    if folder is None:
        return False
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return index.get("_class_name") == "ReferencePipeline"


def _load_diffusers(c: ModelChoice, verdict: Verdict, folder: str | None) -> Any:
    from diffusers import DiffusionPipeline

    source = folder or c.repo_id
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=getattr(torch, c.dtype))
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load {c.label} from {source}: {str(err).splitlines()[0]}") from None
    transformer = getattr(pipe, "transformer", None)
    if transformer is None or type(transformer).__name__ not in FAMILIES:
        found = type(transformer).__name__ if transformer is not None else "no transformer"
        raise ModelError(f"{c.label} has {found}; HyCa supports {', '.join(sorted(FAMILIES))}")
    if verdict.offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(verdict.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(c: ModelChoice, pipe: Any) -> tuple[int, int]:
    """(height, width): the menu's, else the size the pipeline generates by default."""
    if not c.key.startswith("custom:"):
        return c.height, c.width
    if "Reference" in type(pipe).__name__:
        from ..reference import data

        return data.SIZE, data.SIZE
    sample, scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(scale, int):
        return sample * scale, sample * scale
    return c.height, c.width


class ModelStore:
    """Loaded pipelines shared by all sessions; at most ``keep`` besides the reference model."""

    def __init__(self, keep: int = 1) -> None:
        self.keep = keep
        self._models: dict[str, LoadedModel] = {}
        self._loading = threading.Lock()

    def get(self, c: ModelChoice) -> LoadedModel:
        """The loaded model, loading it first if needed; raises :class:`ModelError` with the reason."""
        with self._loading:
            if c.key in self._models:
                return self._models[c.key]
            facts = gather_facts(c)
            verdict = decide(c, facts)
            if not verdict.ok:
                raise ModelError(verdict.message)
            self._evict_for(c)
            if c.key == REFERENCE or _is_reference_folder(facts.local_folder):
                pipe, loras = _load_reference(facts.local_folder)
            else:
                pipe, loras = _load_diffusers(c, verdict, facts.local_folder), ()
            loaded = LoadedModel(c, pipe, loras=loras, size=native_size(c, pipe))
            self._models[c.key] = loaded
            return loaded

    def _evict_for(self, c: ModelChoice) -> None:
        others = [k for k in self._models if k != REFERENCE]
        while c.key != REFERENCE and len(others) >= self.keep:
            key = others.pop(0)
            with self._models[key].lock:  # wait for its running generation to finish
                del self._models[key]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


STORE = ModelStore()


def configure_cpu_threads() -> int:
    """On a machine without a GPU, use ``$HYCA_APP_THREADS`` threads (default 1) for torch.

    The reference model's operations are tiny (32x32 pixels): several OpenMP threads
    mostly wait for each other, which on a shared CPU (a free Space, a busy laptop) makes a
    generation many times slower (measured in docs/app.md, "Settings"). A larger model on a
    CPU may want more: set the variable."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("HYCA_APP_THREADS", "1"))))
    return torch.get_num_threads()


def _repo_id(text: str) -> bool:
    """Whether ``text`` is a valid Hugging Face repo id (huggingface_hub's own rule)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True

