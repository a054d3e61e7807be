"""Speed and memory of official DARTS' search step (quark0/darts), the peer of tools/benchmark.py.

Imports DARTS' own `cnn/model_search.py` and `cnn/architect.py` from a checkout
(not copied here; PyTorch is not a dependency of this project) and times the
iterations of its `train_search.py` on the CPU: the weight step (forward,
backward, global-norm clip 5, SGD with momentum 0.9 and weight decay 3e-4) and
the first-order architecture step followed by the weight step. DARTS calls
`.cuda()` throughout; here that is the identity. Run it in its own environment:

    python3.11 -m venv /tmp/torch-env && /tmp/torch-env/bin/pip install torch numpy
    git clone https://github.com/quark0/darts /tmp/darts
    /tmp/torch-env/bin/python tools/darts_official_benchmark.py --darts_dir=/tmp/darts/cnn \
        --channels=16 --num_cells=5 --kind=weight

Each kind should run in a process of its own (its peak RSS is the process's).
It prints one JSON line with the keys of tools/benchmark.py's --json_out:
kind, first_call_s, median_ms, images_per_s, peak_rss_mib, and (Linux) rss_anon_mib and
rss_file_mib, the resident pages after the timed steps that are anonymous and that belong to
mapped files (mostly the libraries': tools/resident_memory.py).
"""

import argparse
import json
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from resident_memory import resident_split  # tools/, beside this script
from torch import nn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--darts_dir", required=True, help="DARTS' cnn/ folder.")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--num_cells", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kind", choices=("weight", "first_order"), default="weight")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.Tensor.cuda = lambda self, *_, **__: self  # DARTS assumes a GPU
    nn.Module.cuda = lambda self, *_, **__: self
    sys.path.insert(0, args.darts_dir)
    from architect import Architect  # noqa: PLC0415  (DARTS' own modules)
    from model_search import Network  # noqa: PLC0415

    torch.manual_seed(0)
    criterion = nn.CrossEntropyLoss()
    model = Network(args.channels, 10, args.num_cells, criterion)
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(
        model,
        SimpleNamespace(
            momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3
        ),
    )
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images, labels = torch.randn(shape), torch.randint(0, 10, (args.batch_size,))
    arch_images, arch_labels = torch.randn(shape), torch.randint(0, 10, (args.batch_size,))

    def iteration() -> float:
        started = time.perf_counter()
        if args.kind == "first_order":
            architect.step(images, labels, arch_images, arch_labels, 0.025, optimizer, False)
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        return time.perf_counter() - started

    first = iteration()
    median = statistics.median(iteration() for _ in range(args.steps))
    result = {
        "kind": args.kind,
        "peer": "darts",
        "first_call_s": round(first, 3),
        "median_ms": round(1000 * median, 2),
        "images_per_s": round(args.batch_size / median, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        **resident_split(),  # after the timed steps: anonymous and mapped-file pages
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
