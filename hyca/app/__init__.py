"""The Gradio app (``app.py``): full compute and HyCa side by side, and the profile panel.

The app only arranges what the rest of hyca does: generation goes through
``hyca.enable`` / ``hyca.disable``, profiles through ``hyca.probing.probe`` and
``hyca.profiles`` (files, Hub, comparison). Modules: ``models`` (model choices, whether
they can load here, loading and per-model locks), ``metrics`` (PSNR, SSIM), ``compare``
(the side-by-side run), ``profile_view`` (the cluster picture and solver table),
``session_profiles`` (which profile a run uses, per session: found, loaded or probed),
``handlers`` (what each button does, with per-session state).
"""
