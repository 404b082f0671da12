"""tools/webui_upstream.py itself: the conformance check reads a checkout without importing
it and tells a stand-in that drifted from upstream (here: a synthetic checkout written by
the test, a few lines shaped like the frontend's files) from one that did not."""

import sys
import textwrap

from webui_harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import webui_upstream  # noqa: E402

NEO_FLUX = '''
class DoubleStreamBlock:
    def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                transformer_options={}):
        img += self.img_attn(img)
        txt += self.txt_attn(txt)
        return img, txt


class SingleStreamBlock:
    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
        {single}
        return x
'''


def checkout(tmp_path, single_body):
    root = tmp_path / "neo"
    (root / "backend" / "nn").mkdir(parents=True)
    (root / "backend" / "nn" / "flux.py").write_text(textwrap.dedent(NEO_FLUX).replace("{single}", single_body))
    return root


def rows_for(rows, what):
    return [r for r in rows if what in r]


def test_in_place_blocks_match_the_neo_stand_ins(tmp_path):
    rows, _ = webui_upstream.conformance({"neo": checkout(tmp_path, "x += self.mlp(x)")})
    in_place = [r for r in rows_for(rows, "writes its input in place") if "flux.py" in r]
    assert len(in_place) == 2 and all("| yes | yes | yes |" in r for r in in_place)
    assert all("**NO**" in r for r in rows_for(rows, "| missing |"))  # files the checkout lacks are reported
    signatures = [r for r in rows_for(rows, "Block.forward` parameters") if "flux.py" in r]
    assert signatures and all(r.endswith("| yes |") for r in signatures)


def test_an_upstream_block_that_stops_writing_in_place_is_reported(tmp_path):
    rows, ok = webui_upstream.conformance({"neo": checkout(tmp_path, "x = x + self.mlp(x)")})
    single = [r for r in rows_for(rows, "`SingleStreamBlock.forward` writes its input in place") if "flux.py" in r]
    assert single == [single[0]] and "| no | yes | **NO** |" in single[0]
    assert not ok
