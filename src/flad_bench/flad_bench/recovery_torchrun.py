"""The torchrun-elastic baseline's training script (run by `torchrun`, one process per emulated vehicle).

The same tiny vision encoder, data-parallel with gloo: each step every rank trains its own synthetic
batch, gradients are all-reduced, AdamW steps. Rank 0 checkpoints every `--ckpt-every` steps (atomic)
and appends "<step> <wall time>" to the progress file after every step; after an elastic restart every
rank reloads the checkpoint -- torchrun's documented recovery model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--encoder", default="tiny")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from flad_core.atomic import atomic_write_bytes
    from flad_core.weights import from_bytes, to_bytes
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
    from flad_vehicle.encoder.synthetic import synthetic_batches

    torch.manual_seed(0)
    model = VisionEncoder(get_config(args.encoder))
    ckpt = Path(args.ckpt)
    start = 0
    if ckpt.exists():
        state = from_bytes(ckpt.read_bytes(), what="checkpoint")
        start = int(state.pop("__step").item())
        model.load_state_dict(state)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(model.param_groups(7.5e-4, 3e-4, 0.05), eps=1e-8)
    batches = synthetic_batches(10_000, 4, seed=1000 + rank)
    with open(args.progress, "a", encoding="utf-8") as prog:
        if rank == 0:
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            prog.write(f"start {start} {time.time():.6f} world={world} restart={restart}\n")
            prog.flush()
        for step in range(start, args.steps):
            batch = batch_to_torch(next(batches))
            opt.zero_grad(set_to_none=False)
            model.forward_train(batch)["loss"].backward()
            # data parallel: one all-reduce of every gradient (what DDP does, in one bucket)
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])
            dist.all_reduce(flat)
            flat /= world
            pos = 0
            for p in params:
                n = p.numel()
                p.grad = flat[pos:pos + n].view_as(p).clone()
                pos += n
            opt.step()
            if rank == 0:
                prog.write(f"step {step + 1} {time.time():.6f} world={world}\n")
                prog.flush()
                if (step + 1) % args.ckpt_every == 0:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    state["__step"] = torch.tensor(step + 1)
                    atomic_write_bytes(ckpt, to_bytes(state))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
