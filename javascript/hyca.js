// Hover help for HyCa's controls, in the style of the WebUI's own hints.js:
// titles keyed by element id (both tabs), applied on every UI update.
(function () {
    const titles = {
        enabled: "Hybrid feature caching: skip the transformer on most steps and forecast its blocks' output from the steps it did compute. Off = the model runs exactly as without the extension.",
        interval: "N: one step in N is computed, the others forecast. Higher N = faster but further from the uncached image; N=1 computes every step. Around 4-6 keeps FLUX and Qwen-Image near-lossless.",
        warmup: "Steps computed before any forecasting starts. Early steps set the composition, so a few uncached steps protect structure; more warm-up = slower but safer.",
        compute_last: "Always compute the final step: errors left on it cannot be corrected by a later step.",
        hires: "Use HyCa on the hires-fix second pass too. Turn off if the hires pass (or ADetailer-style refiners) shows artefacts.",
        lora_reuse: "On: the base model's profile serves every LoRA set (fast). Off: each new LoRA set is probed once and the console and infotext report how much its clusters agree with the base profile (ARI; 1 = identical).",
        profile: "Which profile forecasts each block dimension: automatic = shipped, cached or Hub profile, else probe this model on the first generation (computed in full) and cache the result. TaylorSeer / FORA = one method for every dimension.",
        cache_dtype: "Precision of the cached block outputs: model = as the model computes; bfloat16 / float16 halve the cache memory of a float32 model (forecasts are still summed in float32).",
        hub_repo: "Optional Hugging Face repo id (user/repo) to fetch a profile for this model from.",
        speedup: "Target speed-up: HyCa picks N for each pass so that the blocks run this many times less often (with the warm-up as set); 0 = use N as set. The console says which N it picked.",
        guard: "Guard: every computed step checks what each solver would have forecast for it; a solver that did worse than a lower order (TaylorSeer-1, reuse) at two such checks in a row is switched to it, and back when it wins again. No extra model call. Off = the paper's behaviour.",
    };

    function applyTitles() {
        for (const tab of ["txt2img", "img2img"]) {
            for (const [name, text] of Object.entries(titles)) {
                const element = gradioApp().getElementById(`hyca_${tab}_${name}`);
                if (!element || element.title === text) continue;
                element.title = text;
                const label = element.querySelector("label, span, input, textarea");
                if (label && !label.title) label.title = text;
            }
        }
    }

    onUiUpdate(applyTitles);
})();
