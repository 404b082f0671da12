"""``python -m hyca.bench.wall_share``: the shares against the formula, and the two verdicts."""

from __future__ import annotations

import json

from hyca.bench import wall_share


def _row(family: str, setting: str, steps: int, wall: float, flops: float) -> dict:
    return {"family": family, "setting": setting, "steps": steps, "wall_speedup": wall, "flops_speedup": flops}


def test_shares_and_verdicts(tmp_path, capsys):
    rows = [_row("HyCa", "N=4", 50, 2.4, 3.2), _row("FORA (ours)", "N=4", 50, 2.5, 3.2),
            _row("diffusers TaylorSeer", "N=4, order 1, lite", 50, 2.5, 3.28),
            _row("HyCa", "N=7", 50, 3.6, 4.8), _row("FORA (ours)", "N=7", 50, 3.0, 4.8),
            _row("diffusers TaylorSeer", "N=7, order 1, lite", 50, 4.0, 4.87)]
    assert wall_share.shares(rows, 50, 4) == [100 * 2.4 / 3.2, 100 * 2.5 / 3.2, 100 * 2.5 / 3.28]
    path = tmp_path / "run-x.json"
    path.write_text(json.dumps({"rows": rows}))
    wall_share.main([str(path)])
    lines = capsys.readouterr().out.splitlines()
    # N=4: 75.0% < FORA's 78.1%, and >= 0.95 x 76.2%; N=7: 75.0% >= FORA's 62.5%, < 0.95 x 82.1%
    assert lines[2] == "| 50, N=4 | run-x | 75.0% | 78.1% | 76.2% | no | yes (72.4) |"
    assert lines[3] == "| 50, N=7 | run-x | 75.0% | 62.5% | 82.1% | yes | no (78.0) |"
