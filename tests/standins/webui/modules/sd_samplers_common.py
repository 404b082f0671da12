"""Stand-in of ``modules/sd_samplers_common.py`` (AUTOMATIC1111 v1.10.1 82a973c, also in Forge dfdcbab):
``setup_img2img_steps`` (how denoising strength cuts the schedule) and
``InterruptedException`` (raised by the sampler callback, caught by the sampler)."""

from modules import shared


class InterruptedException(BaseException):
    pass


def setup_img2img_steps(p, steps=None):
    if shared.opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc
