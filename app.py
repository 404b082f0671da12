"""HyCa, the Gradio app: full compute and HyCa side by side, and the profile behind it.

``python app.py`` serves it on http://127.0.0.1:7860 (a Hugging Face Space runs this
same file). This file only lays the page out; what the buttons do is in
``hyca.app.handlers``, which uses the same ``hyca.enable`` / probe / profile code as
everything else.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

try:
    import gradio as gr
except ImportError as error:  # the app is an extra: `pip install hyca` alone does not bring gradio
    raise ImportError(f"the HyCa app needs gradio ({error}): pip install \"hyca[app]\" "
                      "(in a source checkout: pip install -e \".[app]\")") from error

import hyca
from hyca.app import handlers as h
from hyca.app.compare import METHODS
from hyca.app.models import (DEFAULT_PROMPT, LORA_STYLES, REFERENCE, choice, choices, configure_cpu_threads,
                             reference_prompt_hint)

INTRO = """# HyCa — hybrid feature caching for diffusion transformers
The same prompt and seed, once with every transformer step computed and once with HyCa, which computes
the blocks every N-th step and *forecasts* them in between with a solver chosen per cluster of feature
dimensions by a one-time probe. FORA (reuse) and TaylorSeer run in the same engine for comparison.
The default model is HyCa's small reference model (32×32 pixels, runs on a CPU); larger diffusers
models load when this machine has their weights and a GPU."""


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show user-fixable errors as a message in the page instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except h.USER_ERRORS as err:
            raise gr.Error(str(err).strip("'\"")) from None

    return wrapper


def with_state(fn: Callable[..., str]) -> Callable[..., tuple[str, Any]]:
    """A handler that changes the session state also returns it, so Gradio keeps the change."""

    @functools.wraps(fn)
    def wrapper(state: Any, *args: Any) -> tuple[str, Any]:
        return fn(state, *args), state

    return wrapper


def reporter(progress: gr.Progress) -> h.Progress:
    return lambda fraction, desc: progress(fraction, desc=desc)


@friendly
def on_generate(state, model, custom, prompt, seed, steps, method, interval, warmup, lora, reuse,
                progress=gr.Progress()):
    r = h.generate(state, model, custom, prompt, seed, steps, method, interval, warmup, lora, reuse,
                   reporter(progress))
    return r.full, r.fast, r.report, r.numbers, state


def show_profile(state, model, custom, by, message=""):
    v = h.view(state, model, custom, by, message)
    return v.picture, v.legend, v.table, v.summary, v.file


@friendly
def on_probe(state, model, custom, prompt, steps, interval, warmup, clusters, lora, by, progress=gr.Progress()):
    message = h.run_probe(state, model, custom, prompt, steps, interval, warmup, clusters, lora, reporter(progress))
    return (*show_profile(state, model, custom, by, message), state)


def on_model(model, custom):
    steps = h.chosen_model(model, custom).steps
    return (h.model_status(model, custom), gr.update(value=steps), *schedule_for(steps))


def schedule_for(steps):
    """N and warm-up HyCa recommends for a run of ``steps`` (hyca.recommended_settings)."""
    settings = hyca.recommended_settings(None, int(steps))
    return gr.update(value=settings["interval"]), gr.update(value=settings["warmup"])


def build() -> gr.Blocks:
    with gr.Blocks(title="HyCa: hybrid feature caching") as demo:
        state = gr.State(h.new_state)
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Dropdown([(c.label, c.key) for c in choices()], value=REFERENCE, label="Model", scale=2)
            custom = gr.Textbox(label="…or a local diffusers folder / Hub repo id", placeholder="optional", scale=2)
        status = gr.Markdown(h.model_status(REFERENCE, ""))
        with gr.Row():
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", info=reference_prompt_hint(), scale=3)
            seed = gr.Number(0, label="Seed", precision=0, minimum=0)
            steps = gr.Slider(4, 100, value=choice(REFERENCE).steps, step=1, label="Steps")
        with gr.Row():
            recommended = hyca.recommended_settings(None, choice(REFERENCE).steps)
            interval = gr.Slider(2, 10, value=recommended["interval"], step=1, label="N (one computed step in N)")
            warmup = gr.Slider(1, 10, value=recommended["warmup"], step=1, label="Warm-up (computed steps first)")
            lora = gr.Dropdown(["none", *LORA_STYLES], value="none", label="LoRA (reference model)")
            reuse = gr.Checkbox(True, label="Reuse the base profile for LoRAs",
                                info="off: probe again with the LoRA and show the ARI against the base profile")
        with gr.Tab("Side by side"):
            with gr.Row():
                method = gr.Radio(list(METHODS), value="HyCa", label="Accelerated with")
                go = gr.Button("Generate both", variant="primary")
            with gr.Row():
                full = gr.Image(label="Full compute", format="png", interactive=False, elem_id="full-image")
                fast = gr.Image(label="Accelerated", format="png", interactive=False, elem_id="fast-image")
            report = gr.Markdown(elem_id="report")
            with gr.Accordion("Numbers (JSON)", open=False):
                numbers = gr.JSON(label="metrics")
        with gr.Tab("Profile"):
            with gr.Row():
                clusters = gr.Slider(1, 8, value=4, step=1, label="Clusters per block")
                probe_btn = gr.Button("Run the probe", variant="primary")
                by = gr.Radio(["cluster", "solver"], value="cluster", label="Colour by")
            picture = gr.Image(label="Blocks (rows) × dimensions (columns)", format="png", interactive=False)
            legend = gr.Markdown()
            summary = gr.Markdown()
            table = gr.Dataframe(headers=["block", "cluster", "dims", "solver", "replay error"], label="Solvers")
            profile_file = gr.File(label="Profile file (download)", interactive=False)
            with gr.Row():
                other = gr.File(label="Another profile (.safetensors)", file_types=[".safetensors"])
                with gr.Column():
                    ari_prev = gr.Button("ARI: current vs previous")
                    ari_file = gr.Button("ARI: current vs this file")
                    use_file = gr.Button("Use this file as the current profile")
            with gr.Row():
                repo = gr.Textbox(label="Hub repo", placeholder="hyca-project/profiles (default) or yours")
                filename = gr.Textbox(label="File name in the repo", placeholder="default: this model's name")
                pull = gr.Button("Load from the Hub")
                push = gr.Button("Push to the Hub")
            message = gr.Markdown()

        model.change(on_model, [model, custom], [status, steps, interval, warmup], api_name=False)
        custom.submit(on_model, [model, custom], [status, steps, interval, warmup], api_name="check_model")
        steps.release(schedule_for, [steps], [interval, warmup], api_name=False)
        view_outputs = [picture, legend, table, summary, profile_file]
        go.click(on_generate, [state, model, custom, prompt, seed, steps, method, interval, warmup, lora, reuse],
                 [full, fast, report, numbers, state], api_name="generate").then(
            show_profile, [state, model, custom, by], view_outputs, api_name=False)
        probe_btn.click(on_probe, [state, model, custom, prompt, steps, interval, warmup, clusters, lora, by],
                        [*view_outputs, state], api_name="probe")
        by.change(show_profile, [state, model, custom, by], view_outputs, api_name=False)
        ari_prev.click(friendly(h.ari_vs_previous), [state, model, custom], message, api_name="ari_previous")
        ari_file.click(friendly(h.ari_vs_file), [state, model, custom, other], message, api_name="ari_file")
        for button, fn, inputs, name in (
            (use_file, h.use_file, [state, model, custom, other], "use_file"),
            (pull, h.pull, [state, model, custom, repo, filename, interval], "pull"),
            (push, h.push, [state, model, custom, repo], "push"),
        ):
            button.click(friendly(with_state(fn)), inputs, [message, state], api_name=name).then(
                show_profile, [state, model, custom, by], view_outputs, api_name=False)
    demo.queue(default_concurrency_limit=4)
    return demo


demo = build()

if __name__ == "__main__":
    configure_cpu_threads()
    demo.launch()
