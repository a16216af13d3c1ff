"""The GPU code paths in one table: bf16 vs fp32, torch.compile vs eager, one-GPU DDP with NCCL,
TRADES training images/s of ResNet-18 and WRN-34-10 on CIFAR-shaped synthetic tensors (3×32×32,
10 classes), and AutoAttack throughput. Run by ``benchmarks/gpu_check.sh`` (under 5 minutes on
one GPU). Without CUDA it stops with exit code 2; ``--cpu`` runs a tiny version of every row on
the CPU (a check of the script, not a measurement)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny smoke version on the CPU")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--aa-n", type=int, default=512, help="images for AutoAttack")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def tiny(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes: full on a GPU; a few images of 16×16 and narrow models with --cpu."""
    if args.cpu:
        return {"size": 16, "batch": 8, "steps": 2, "warmup": 1, "aa_n": 8, "attack_steps": 2,
                "resnet18": {"width": 4}, "wrn34_10": {"widen": 1}}
    return {"size": 32, "batch": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "aa_n": args.aa_n, "attack_steps": 10, "resnet18": {}, "wrn34_10": {}}


def synthetic(n: int, size: int) -> Any:
    """CIFAR-shaped random images (uint8) and labels, every split."""
    from robustfair.data import DataBundle
    from robustfair.data.core import ArrayData

    g = torch.Generator().manual_seed(0)

    def split(m: int) -> ArrayData:
        return ArrayData(torch.randint(0, 256, (m, 3, size, size), generator=g,
                                       dtype=torch.uint8), torch.randint(0, 10, (m,), generator=g))

    return DataBundle("synthetic-cifar", split(n), split(16), split(16), 10,
                      (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def trainer(model: str, s: dict[str, Any], device: str, run_dir: str, **train: Any) -> Any:
    from robustfair.config import build_config
    from robustfair.engine.trainer import Trainer

    cfg = build_config({
        "seed": 0, "device": device, "data": {"name": "cifar10"},
        "model": {"name": model, "params": s[model]},
        "method": {"objective": {"name": "trades", "beta": 6.0}},
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": s["attack_steps"]},
        "train": {"epochs": 1, "batch_size": s["batch"], **train},
        "logging": {"progress": False}})
    n = s["batch"] * (s["steps"] + s["warmup"])
    return Trainer(cfg, run_dir, data=synthetic(n, s["size"]), quiet=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(model: str, s: dict[str, Any], device: str, **train: Any) -> dict[str, Any]:
    """TRADES training: images/s over the timed steps, the loss of the last step, set-up time."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tr = trainer(model, s, device, tmp, **train)
        stats = tr._new_stats()
        batches = tr.sampler.epoch_batches(1)
        losses = []
        for k, idx in enumerate(batches[: s["warmup"] + s["steps"]]):
            if k == s["warmup"]:
                sync(tr.device)
                t_start = time.perf_counter()
                warm_s = t_start - t0
            losses.append(float(tr.train_step(idx, stats)))
            tr.global_step += 1
        sync(tr.device)
        secs = time.perf_counter() - t_start
    return {"img_s": s["steps"] * s["batch"] / secs, "loss": losses[-1], "first_s": warm_s,
            "losses": losses}


def autoattack_row(s: dict[str, Any], device: str) -> dict[str, Any]:
    """AutoAttack (standard; APGD-CE + APGD-T with --cpu) on ResNet-18 with random weights and
    BatchNorm statistics of the images, labels = the model's own predictions, so that every
    image is attacked."""
    from robustfair.attacks.autoattack import AutoAttack
    from robustfair.models import build_model

    dev = torch.device(device)
    model = build_model("resnet18", 3, 10, s["size"], (0.5,) * 3, (0.25,) * 3,
                        **s["resnet18"]).to(dev)
    x = torch.rand(s["aa_n"], 3, s["size"], s["size"], device=dev)
    with torch.no_grad():
        model(x)  # BatchNorm running statistics of these images
        model.eval()
        y = model(x).argmax(1)
    atk = AutoAttack(norm="linf", attacks=["apgd-ce", "apgd-t"] if device == "cpu" else None)
    sync(dev)
    t0 = time.perf_counter()
    x_adv = atk(model, x, y, 8 / 255)
    sync(dev)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    return {"img_s": s["aa_n"] / secs, "robust": robust, "seconds": secs}


def ddp_worker(args: argparse.Namespace) -> None:
    """Under torchrun: DDP training steps of ResNet-18 (NCCL on GPUs, gloo with --cpu) and an
    all-reduce check; rank 0 prints one JSON line."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from robustfair.models import build_model

    s = tiny(args)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo" if args.cpu else "nccl"
    dist.init_process_group(backend)
    dev = torch.device("cpu") if args.cpu else torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = DDP(build_model("resnet18", 3, 10, s["size"], (0.5,) * 3, (0.25,) * 3,
                            **s["resnet18"]).to(dev), device_ids=[local] if dev.type == "cuda"
                else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(s["batch"], 3, s["size"], s["size"], device=dev)
    y = torch.randint(0, 10, (s["batch"],), device=dev)
    for k in range(s["warmup"] + s["steps"]):
        if k == s["warmup"]:
            sync(dev)
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(dev)
    secs = time.perf_counter() - t0
    one = torch.ones(1, device=dev)
    dist.all_reduce(one)
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        print(json.dumps({"img_s": world * s["steps"] * s["batch"] / secs, "world": world,
                          "backend": backend, "all_reduce_ok": int(one.item()) == world}))
    dist.destroy_process_group()


def ddp_row(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--ddp-worker"] + (["--cpu"] if args.cpu else []) + \
          ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def rows(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(check, setting, images/s, result) for every row of the table."""
    s = tiny(args)
    dev = "cpu" if args.cpu else "cuda"
    out = []
    fp32 = train_row("resnet18", s, dev)
    out.append(("fp32 eager", "ResNet-18 TRADES", f"{fp32['img_s']:.0f}",
                f"loss {fp32['loss']:.4f}"))
    bf16 = train_row("resnet18", s, dev, precision="bf16", channels_last=True)
    diff = max(abs(a - b) for a, b in zip(bf16["losses"], fp32["losses"], strict=True))
    out.append(("bf16 + channels-last", "ResNet-18 TRADES", f"{bf16['img_s']:.0f}",
                f"max Δloss vs fp32 {diff:.4f} over {len(fp32['losses'])} steps; "
                f"speed-up {bf16['img_s'] / fp32['img_s']:.2f}x"))
    if args.cpu:
        out.append(("compile vs eager", "ResNet-18 TRADES bf16", "-", "skipped with --cpu "
                    "(torch.compile on CPU is tested in the test suite)"))
    else:
        comp = train_row("resnet18", s, dev, precision="bf16", channels_last=True, compile=True)
        diff = max(abs(a - b) for a, b in zip(comp["losses"], bf16["losses"], strict=True))
        out.append(("compile vs eager", "ResNet-18 TRADES bf16", f"{comp['img_s']:.0f}",
                    f"max Δloss vs eager {diff:.4f}; speed-up {comp['img_s'] / bf16['img_s']:.2f}x;"
                    f" set-up + warm-up {comp['first_s']:.0f} s"))
    wrn = train_row("wrn34_10", s, dev, precision="bf16", channels_last=True)
    out.append(("training", "WRN-34-10 TRADES bf16", f"{wrn['img_s']:.0f}",
                f"loss {wrn['loss']:.4f}"))
    ddp = ddp_row(args)
    out.append(("DDP, 1 process", f"ResNet-18 CE, {ddp.get('backend', 'nccl')}",
                f"{ddp['img_s']:.0f}" if "img_s" in ddp else "-",
                f"all-reduce ok: {ddp['all_reduce_ok']}" if "img_s" in ddp else
                f"FAILED: {ddp['error']}"))
    aa = autoattack_row(s, dev)
    out.append(("AutoAttack", "ResNet-18 (random weights), " +
                ("APGD-CE + APGD-T" if args.cpu else "standard"), f"{aa['img_s']:.1f}",
                f"{s['aa_n']} images in {aa['seconds']:.1f} s, robust {100 * aa['robust']:.1f}%"))
    return out


def table(args: argparse.Namespace, data: list[tuple[str, str, str, str]]) -> str:
    s = tiny(args)
    dev = "CPU (--cpu smoke run)" if args.cpu else torch.cuda.get_device_name(0)
    head = ("| check | setting | images/s | result |", "|---|---|---|---|")
    lines = [f"device: {dev}; torch {torch.__version__}; {s['size']}×{s['size']} synthetic "
             f"images, batch {s['batch']}, {s['steps']} timed steps after {s['warmup']}; TRADES "
             f"with {s['attack_steps']} attack steps, linf eps 8/255", "", *head]
    lines += [f"| {' | '.join(r)} |" for r in data]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here; run gpu_check on a machine with a GPU, or add --cpu "
              "for a tiny CPU run of the script itself", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.cpu:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = rows(args)
    print(table(args, data))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": data}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
