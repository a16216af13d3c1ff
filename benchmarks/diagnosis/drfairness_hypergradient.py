"""The Dr-Fairness hypergradient of the minority group's φ on mnist5k-groups, split into its gap
part (k = 0) and its accuracy part (per unit of k), after each of 5 epochs with λ and μ held at
their start values (seed 0, 40 probes per epoch); a negative value raises the minority's share.

    python benchmarks/diagnosis/drfairness_hypergradient.py
"""
import sys, tempfile, json
from pathlib import Path
import torch; torch.set_num_threads(1)
from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.trainer import Trainer
from robustfair.samplers.drfairness import hypergradient

bundle = load_data(DataConfig(name="mnist5k-groups", params={"generated": "auto", "quality": 1.0, "per_cell": 400}))
cfg = load_config(recipe="mnist5k-groups-uniform", overrides=["seed=0", "train.epochs=5", "attack.eps=0", "validation.every=0", "logging.progress=false"])
cfg.method.sampler = {"name": "drfairness", "fairness": "eqodds", "k": 20.0, "lr": 1e-9, "probe": 128}  # λ, μ frozen at the start values
with tempfile.TemporaryDirectory() as tmp:
    tr = Trainer(cfg, Path(tmp), data=bundle, quiet=True)
    sm = tr.sampler
    for epoch in range(1, 6):
        tr.cfg.train.epochs = epoch
        tr.fit()
        layer = __import__("robustfair.samplers.drfairness", fromlist=["x"]).last_linear(tr.model)
        mino = sm.real_counts.argmin(1)
        gaps, accs, gapv = [], [], []
        for t in range(40):
            ir, ig = sm._draw(sm.val, 10_000 + t, 1), sm._draw(sm.gen_val, 10_000 + t, 2)
            with torch.no_grad():
                tr.model.eval()
                real = sm._probe(tr.model, layer, sm.val, ir); gen = sm._probe(tr.model, layer, sm.gen_val, ig)
            g0, _, info = hypergradient(real, gen, sm.lam, sm.mu, "eqodds", 0.0)
            g1, _, _ = hypergradient(real, gen, sm.lam, sm.mu, "eqodds", 1.0)
            idx = torch.arange(sm.C)
            gaps.append(g0[idx, mino]); accs.append((g1 - g0)[idx, mino]); gapv.append(info["gap"])
        G, A = torch.stack(gaps), torch.stack(accs)
        print(json.dumps({"epoch": epoch, "probe_gap_mean": round(sum(gapv)/len(gapv), 4),
            "dphi_minority_gap_term": [f"{v:.2e}" for v in G.mean(0).tolist()],
            "dphi_minority_acc_term_per_k": [f"{v:.2e}" for v in A.mean(0).tolist()],
            "k20_total": [f"{v:.2e}" for v in (G + 20 * A).mean(0).tolist()],
            "frac_probes_k20_pushes_minority_up": [round(float(((G + 20 * A)[:, y] < 0).float().mean()), 2) for y in range(sm.C)],
            "frac_probes_k1_pushes_minority_up": [round(float(((G + A)[:, y] < 0).float().mean()), 2) for y in range(sm.C)]}), flush=True)
