"""Where ResNet18 fine-tuning time goes on a CPU: one SGD step (batch 16, 224x224) in variants.

    .venv/bin/python -m bench.resnet_step                 # NCHW vs channels-last, ~1 min
    .venv/bin/python -m bench.resnet_step --compile       # also torch.compile (~1 min to compile)

Each variant builds torchvision's ResNet18 (2 classes, random init), then times forward +
cross-entropy + backward + SGD(momentum 0.9) on one fixed random batch; the median of
``--steps`` steps after ``--warmup`` is reported as images/s. The data pipeline is left out on
purpose: this is the ceiling a recipe can reach on this machine, and the product's recipe
(channels-last) should be close to it. Same maths in every variant.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch.nn import functional as F

BATCH = 16


def step_images_per_s(channels_last: bool, compile_model: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    x = torch.randn(BATCH, 3, 224, 224)
    y = torch.randint(0, 2, (BATCH,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compile_model else model
    model.train()
    durations = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            durations.append(time.perf_counter() - start)
    return BATCH / statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    args = parser.parse_args()
    variants = [("NCHW (the reference's layout)", False, False), ("channels-last (the product)", True, False)]
    if args.compile:
        variants.append(("channels-last + torch.compile", True, True))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    for name, channels_last, compile_model in variants:
        rate = step_images_per_s(channels_last, compile_model, args.steps, args.warmup)
        print(f"{name:32} {rate:6.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
