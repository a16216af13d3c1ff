"""Per-class clean and PGD-20 accuracy and DAFA's class weights W on the chain design (seed 0),
TRADES and TRADES+DAFA, with the configs of benchmarks/effects.py.

    python benchmarks/diagnosis/dafa_per_class.py
"""
import sys, tempfile, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch; torch.set_num_threads(1)
import effects as E
E._register()
eff = E.EFFECTS["dafa"]
for arm in ({}, eff.comparisons[0].method):
    cfg = E.build_config(eff.config, arm, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tr = E.Trainer(cfg, Path(tmp), quiet=True); tr.fit(); s = tr.final_eval(progress=False)
    w = getattr(tr.policy, "weights", None)
    print(json.dumps({"arm": arm.get("method.policy", {}).get("name", "trades"),
        "clean": [round(v, 3) for v in s["attacks"]["clean"]["per_class"]],
        "pgd20": [round(v, 3) for v in s["attacks"]["pgd20"]["per_class"]],
        "W": None if w is None else [round(float(v), 3) for v in w]}), flush=True)
