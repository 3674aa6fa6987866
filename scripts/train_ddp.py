"""Train the pixel-space DDPM of scripts/train_ddpm.py with data parallelism: one process per GPU (or CPU).

    torchrun --nproc_per_node=2 scripts/train_ddp.py --steps 50 --batch-size 32 --preset tiny
    torchrun --nproc_per_node=4 scripts/train_ddp.py                  # 4 GPUs, train_ddpm.py's settings
    python scripts/train_ddp.py --steps 50 --preset tiny              # one process: the same run

--batch-size is the global batch: each of the N processes trains on batch-size / N rows of it, and
DistributedDataParallel averages the gradients, so N processes take the same steps as one process with the
whole batch (course_lib.distributed explains how). Rank 0 prints and writes the training checkpoint
runs/ddpm_emoji32_ddp.train.safetensors; run the same command again to resume from it (with any number of
processes). --export also writes the float16 EMA model file. On GPUs the backend is NCCL, on a CPU gloo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ddpm import NAME, ROOT  # noqa: E402  (train_ddpm puts the repository on sys.path)

from course_lib import distributed  # noqa: E402
from course_lib.data import load_emoji  # noqa: E402
from course_lib.train import TrainConfig, Trainer  # noqa: E402
from course_lib.unet import UNet, get_preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch, over all processes")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--prediction", default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--run-dir", default=str(ROOT / "runs"))
    parser.add_argument("--export", action="store_true", help="also write the float16 EMA model file")
    args = parser.parse_args()

    info = distributed.setup()                      # joins torchrun's process group; a no-op in one process
    backend = torch.distributed.get_backend() if distributed.is_initialized() else "none"
    print(f"rank {info.rank} of {info.world_size} (local rank {info.local_rank}) on {info.device}, "
          f"backend {backend}, {torch.get_num_threads()} CPU threads", flush=True)

    state = Path(args.run_dir) / f"{NAME}_ddp.train.safetensors"
    images = load_emoji(size=32, split="train").images     # every rank holds all the data
    if state.exists():
        trainer = Trainer.resume(state, images, device=info.device, steps=args.steps)
    else:
        torch.manual_seed(args.seed)                # the initial weights; DDP also copies rank 0's to all
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                             schedule=args.schedule, prediction=args.prediction, seed=args.seed)
        trainer = Trainer(UNet(get_preset(args.preset)), images, config, device=info.device)
    if info.is_main:
        print(f"step {trainer.step} of {trainer.config.steps}: global batch {trainer.config.batch_size}, "
              f"{trainer.config.batch_size // info.world_size} per process", flush=True)

    def log(t: Trainer) -> None:                    # trainer.losses is averaged over the ranks: print it once
        if t.is_main:
            recent = t.losses[-args.log_every:]
            print(f"step {t.step}: loss {sum(recent) / len(recent):.4f}", flush=True)

    trainer.train(checkpoint_path=state, checkpoint_every=args.checkpoint_every, callback=log,
                  callback_every=args.log_every, progress=False)
    if info.is_main:
        print(f"wrote {state} at step {trainer.step} ({trainer.seconds:.1f} s of training on rank 0)", flush=True)
    if args.export:
        out = trainer.export(Path(args.run_dir) / f"{NAME}_ddp.safetensors",
                             info={"preset": args.preset, "processes": info.world_size})
        if info.is_main:
            print(f"exported {out}", flush=True)
    distributed.cleanup()


if __name__ == "__main__":
    main()
