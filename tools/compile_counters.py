"""Graph breaks, graphs and recompiles of HyCa under torch.compile (docs/compile.md).

    python tools/compile_counters.py inductor hyca-first flux
    python tools/compile_counters.py inductor compile-first flux

Arguments: backend (inductor, eager), order (hyca-first: hyca.enable then
compile_repeated_blocks; compile-first: the other way), a tests/tiny_families.py case (the
test suite's tiny models: why this program is a repository tool, not a module of the package).
Runs 8 steps twice and 5 steps once; prints Dynamo's counters after each run and the
largest difference to eager HyCa.
"""
import sys, warnings, logging
from pathlib import Path
warnings.filterwarnings("ignore")
import torch, torch._dynamo
from torch._dynamo.utils import counters
import hyca
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_families import CASES

backend = sys.argv[1] if len(sys.argv) > 1 else "inductor"
order = sys.argv[2] if len(sys.argv) > 2 else "hyca-first"
name = sys.argv[3] if len(sys.argv) > 3 else "flux"
case = CASES[name]
pipe = case.build()
ref = case.copy_of(pipe)
settings = dict(profile="taylor-1", interval=2, warmup=1)
hyca.enable(ref, **settings)
expected = case.run(ref, 8)
torch._dynamo.reset(); counters.clear()
records = []
class Catch(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
torch._logging.set_logs(recompiles=True)
logging.getLogger("torch._dynamo").addHandler(Catch())
if order == "hyca-first":
    hyca.enable(pipe, **settings)
    pipe.transformer.compile_repeated_blocks(backend=backend)
else:
    pipe.transformer.compile_repeated_blocks(backend=backend)
    hyca.enable(pipe, **settings)
def snap():
    return (sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"],
            sum("Recompiling function" in m for m in records))
out1 = case.run(pipe, 8)
after1 = snap()
out2 = case.run(pipe, 8)
after2 = snap()
out3 = case.run(pipe, 5)
print("graph breaks / unique graphs / recompiles after run 1 (8 steps):", after1, "after run 2:", after2, "after a 5-step run:", snap())
print(f"{name} {backend} {order}: max |diff| vs eager HyCa {float((out2-expected).abs().max()):.2e}")
print("stats:", hyca.stats(pipe)[0].describe())
gb = sum(counters["graph_break"].values())
print("graph breaks:", gb, dict(counters["graph_break"]))
print("unique graphs:", counters["stats"]["unique_graphs"], "frames:", counters["frames"]["total"], "ok:", counters["frames"]["ok"])
print("recompiles:", sum("Recompiling" in m for m in records))
print("graph breaks per block call: by reason", {k.split("function ")[1].split(" at")[0] if "function " in k else k[:60]: v for k, v in counters["graph_break"].items()})
