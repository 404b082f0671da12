"""``ReferencePipeline``: text-to-image sampling for the shipped reference model.

Laid out like diffusers' ``FluxPipeline`` where HyCa cares: the denoiser is at
``pipe.transformer`` (a stock ``FluxTransformer2DModel``), the scheduler at
``pipe.scheduler``, each model call runs inside ``transformer.cache_context("cond")`` or
``("uncond")``, and ``maybe_free_model_hooks()`` at the end resets stateful hooks so no
cached state outlives a call. LoRAs load through diffusers' FLUX LoRA loader, restricted
to the transformer (the caption encoder takes no LoRA).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import data
from .model import pack, patch_of, unpack, velocity
from .text import CaptionEncoder

DEFAULT_SHIFT = 1.0


class ReferencePipeline(DiffusionPipeline, FluxLoraLoaderMixin):
    _lora_loadable_modules = ["transformer"]
    model_cpu_offload_seq = "text_encoder->transformer"
    #: What HyCa's probe uses unless told otherwise (``hyca.probe`` reads this attribute of
    #: any pipeline): captions this model knows (as many as ``hyca.probing.CALIBRATION_SAMPLES``,
    #: from the training split), its own size, and pixel output (it has no latent space).
    hyca_probe_defaults = dict(
        prompt=["a large red circle at the center on a white background",
                "a small blue square at the top left on a black and white background",
                "a large green triangle at the bottom right on a gray background",
                "a small yellow diamond at the top right on a black background"],
        height=data.SIZE, width=data.SIZE, output_type="pt")

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: CaptionEncoder,
                 scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.text_encoder.encode(prompts)
        return hidden.to(self.transformer.dtype), pooled.to(self.transformer.dtype)

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                  size: tuple[int, int], branch: str) -> torch.Tensor:
        with self.transformer.cache_context(branch):
            return velocity(self.transformer, x, sigma.expand(x.shape[0]).to(x.dtype), hidden, pooled, *size)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """As diffusers pipelines whose ``guidance_scale`` is classifier-free guidance say it."""
        return getattr(self, "_guidance_scale", 1.0) > 1.0

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
                 height: int = data.SIZE, width: int = data.SIZE, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, sigmas: list[float] | None = None):
        """``guidance_scale`` > 1 runs true classifier-free guidance against the empty
        caption (the model was trained with caption dropout). ``seed`` is shorthand for a
        fresh ``torch.Generator().manual_seed(seed)``. ``generator``: one generator for the
        batch's noise, or a list with one per prompt (image ``i`` draws its noise from
        ``generator[i]``, so it is the image that prompt and generator give alone), as in
        diffusers' ``FluxPipeline`` (``randn_tensor``); a list of another length is a
        ``ValueError``. ``sigmas``: a custom sigma schedule (decreasing, in (0, 1]), passed to
        ``scheduler.set_timesteps(sigmas=...)`` as diffusers' ``retrieve_timesteps`` does; the
        step count is then its length and ``num_inference_steps`` is not used. ``output_type``:
        "pil", "np" ((b, H, W, 3) float in [0, 1]) or "pt" ((b, 3, H, W) float in [0, 1])."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        patch = patch_of(self.transformer)
        if height % patch or width % patch:
            raise ValueError(f"height and width must be multiples of {patch}, got {height}x{width}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        if isinstance(generator, list) and len(generator) != len(prompts):  # diffusers' FluxPipeline's check
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {len(prompts)}. Make sure the batch size matches the length "
                             "of the generators.")
        device, dtype = self.transformer.device, self.transformer.dtype
        hidden, pooled = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        self._guidance_scale = guidance_scale  # as diffusers pipelines keep it (HyCa reads the run's scale)
        if guided:
            empty_hidden, empty_pooled = self.encode_prompt([""] * len(prompts))
        shape = (len(prompts), 3, height, width)
        if latents is None:
            latents = pack(randn_tensor(shape, generator=generator), patch)  # per-image noise from a list
        x = latents.to(device=device, dtype=dtype)

        retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas)
        self.scheduler.set_begin_index(0)
        for t in self.progress_bar(self.scheduler.timesteps):
            sigma = (t / 1000).to(dtype)
            v = self._velocity(x, sigma, hidden, pooled, (height, width), "cond")
            if guided:
                v_empty = self._velocity(x, sigma, empty_hidden, empty_pooled, (height, width), "uncond")
                v = v_empty + guidance_scale * (v - v_empty)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        self.maybe_free_model_hooks()

        images = (unpack(x.float(), patch, height, width).clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            out = images.cpu()
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                out = [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in out]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SHIFT)


def shipped_path() -> Path:
    """``models/reference`` in the source checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "models" / "reference"


def load_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ReferencePipeline:
    """The trained reference model, loaded offline from ``path`` (default: the shipped folder)."""
    folder = Path(path) if path is not None else shipped_path()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no reference model at {folder} (model_index.json missing). The weights ship in the "
            f"repository's models/reference folder; run from a source checkout, pass its path "
            f"explicitly, or retrain with `python -m hyca.reference.train --out {folder}`.")
    pipe = ReferencePipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
