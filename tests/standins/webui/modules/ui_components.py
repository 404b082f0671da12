"""Stand-in of ``modules/ui_components.py`` ``InputAccordion`` (AUTOMATIC1111 v1.10.1 82a973c, also
in Forge dfdcbab): a hidden ``gr.Checkbox`` holding the value, with a ``gr.Accordion`` opened by it;
``with InputAccordion(...) as acc:`` fills the accordion; ``extra()`` is a column in its
header. The real one passes ``_js`` for gradio 3; gradio 4+ spells it ``js``."""

from __future__ import annotations

import gradio as gr


class InputAccordion(gr.Checkbox):
    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        kwargs_checkbox = {**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False}
        super().__init__(value, **kwargs_checkbox)
        self.change(fn=None, js='function(checked){ inputAccordionChecked("' + self.accordion_id + '", checked); }',
                    inputs=[self])
        kwargs_accordion = {**kwargs, "elem_id": self.accordion_id, "label": kwargs.get("label", "Accordion"),
                            "elem_classes": ["input-accordion"], "open": value}
        self.accordion = gr.Accordion(**kwargs_accordion)

    def extra(self):
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
