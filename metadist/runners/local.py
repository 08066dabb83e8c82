"""Meta-training without Ray: one process, or one rank of ``torchrun``.

    torchrun --nproc-per-node=2 -m metadist.worker configs/omniglot_5w1s_maml.yaml \\
        train.steps=100 --run-dir runs/omniglot-ddp
    torchrun --nproc-per-node=2 -m metadist.worker --pretrain \\
        configs/miniimagenet_pretrain_conv4.yaml --run-dir runs/mini-pretrain

Each rank joins the process group torchrun describes (NCCL on CUDA, gloo on CPU), runs
its share of every meta-batch (with ``--pretrain``: of every batch of images) and
all-reduces the gradients; rank 0 tracks the run and writes the checkpoints and the
result. This is the runner for machines with PyTorch but no Ray; ``python -m
metadist.worker`` is its command.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

import torch
import torch._dynamo  # noqa: F401  (before the process group: see main)
import torch.distributed as dist

from metadist.config import check_pretraining, load_config
from metadist.tracking import tracked_run
from metadist.training.loop import train
from metadist.training.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metadist.worker")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--run-dir", help="run directory (the same on every rank)")
    parser.add_argument("--pretrain", action="store_true",
                        help="supervised pre-training (`metadist pretrain`) instead of "
                             "meta-training")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    recipe = pretrain if args.pretrain else train
    if args.pretrain:
        check_pretraining(config)
    rank = int(os.environ.get("RANK", "0"))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        cuda = torch.cuda.is_available() and config.train.device != "cpu"
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            config.train.device = f"cuda:{local}"
        # torch._dynamo is imported above, not lazily by the first optimizer: imported
        # after init_process_group it keeps references to the default group that
        # destroy_process_group cannot drop, so the group outlives main(), and a gloo
        # thread still freeing its last collective during interpreter shutdown aborts the
        # process ("terminate called without an active exception", ~1 run in 20).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    try:
        with tracked_run(config, when=rank == 0) as tracker:
            result = recipe(config, tracker, run_dir=args.run_dir)
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result, indent=2))
    return result
