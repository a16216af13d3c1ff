"""Dr-Fairness on mnist5k-groups (the bench_drfairness.py setting: MLP-256, 5 epochs): EqOdds and
the final λ of each label's minority group, for samplers given as uniform, kK or kK@LR.

    python benchmarks/diagnosis/drfairness_runs.py QUALITY SEEDS VARIANTS
    python benchmarks/diagnosis/drfairness_runs.py 1.0 0,1,2 uniform,k20,k1,k20@0.005
"""
import sys, json, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.trainer import Trainer

quality = float(sys.argv[1]); seeds = [int(s) for s in sys.argv[2].split(",")]
variants = sys.argv[3].split(",")
bundle = load_data(DataConfig(name="mnist5k-groups", params={"generated": "auto", "quality": quality, "per_cell": 400}))
def sampler(v):
    if v == "uniform": return {"name": "uniform"}
    k, lr = v.split("@") if "@" in v else (v, "0.02")
    return {"name": "drfairness", "fairness": "eqodds", "k": float(k[1:]), "lr": float(lr), "probe": 128}
for seed in seeds:
    for v in variants:
        cfg = load_config(recipe="mnist5k-groups-uniform", overrides=[f"seed={seed}", "train.epochs=5", "attack.eps=0", "validation.every=0", "logging.progress=false"])
        cfg.method.sampler = sampler(v)
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(cfg, Path(tmp), data=bundle, quiet=True)
            tr.fit(); s = tr.final_eval(attacks=["clean"], progress=False)
        g = s["groups"]["attacks"]["clean"]
        sm = tr.sampler
        out = {"q": quality, "seed": seed, "v": v, "acc": round(s["attacks"]["clean"]["avg"], 4), "eqodds": round(g["eqodds_diff"], 4), "worst_cell": round(g["worst_label_group"], 4)}
        if hasattr(sm, "lam"):
            mino = sm.real_counts.argmin(1)
            out["lam_min"] = [round(float(sm.lam[y, mino[y]]), 3) for y in range(sm.C)]
            out["lam_min_init"] = [round(float(sm.natural_lambda()[y, mino[y]]), 3) for y in range(sm.C)]
            out["mu"] = [[round(float(v), 3) for v in row] for row in sm.mu]
        print(json.dumps(out), flush=True)
