#!/usr/bin/env bash
# One-table check of the GPU code paths (bf16 vs fp32, torch.compile vs eager, one-GPU DDP with
# NCCL, TRADES images/s of ResNet-18 and WRN-34-10 on CIFAR-shaped synthetic tensors, AutoAttack
# throughput); under 5 minutes on one GPU. Without CUDA it exits with code 2; --cpu runs a tiny
# CPU version of every row (a check of the script, not a measurement).
#   benchmarks/gpu_check.sh [--cpu] [--batch-size 128] [--steps 10] [--json OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:${PYTHONPATH}}"
exec python benchmarks/gpu_check.py "$@"
