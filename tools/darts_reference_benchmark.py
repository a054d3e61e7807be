"""Weight-step speed of a DARTS-style PyTorch supernet, for a same-machine comparison.

A compact re-statement of DARTS' search network (quark0/darts, model_search.py)
with this project's 7 candidate operations: ReLU-Conv-BN ops with affine-free
BN, pooling followed by BN, factorized reduce, α mixing, SGD with momentum,
weight decay and gradient clipping. It is not part of the package: PyTorch is
not a dependency. Run it in a separate environment:

    python3.11 -m venv /tmp/torch-env && /tmp/torch-env/bin/pip install torch numpy
    /tmp/torch-env/bin/python tools/darts_reference_benchmark.py --channels=8 --num_cells=3

It prints the first step's time, the median ms per weight step, images/s and
the process's peak resident memory, in the format of tools/benchmark.py.
"""

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

PRIMITIVES = (
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
)


def relu_conv_bn(c_in, c_out):
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, affine=False)
    )


def dil_conv(channels, kernel, stride, padding, dilation):
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(
            channels, channels, kernel, stride, padding, dilation, groups=channels, bias=False
        ),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels, affine=False),
    )


def sep_conv(channels, kernel, stride):
    padding = kernel // 2
    return nn.Sequential(
        dil_conv(channels, kernel, stride, padding, 1), dil_conv(channels, kernel, 1, padding, 1)
    )


class FactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, 2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=False)

    def forward(self, x):
        x = F.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def build_op(name, channels, stride):
    if name == "sep_conv_3x3":
        return sep_conv(channels, 3, stride)
    if name == "sep_conv_5x5":
        return sep_conv(channels, 5, stride)
    if name == "dil_conv_3x3":
        return dil_conv(channels, 3, stride, 2, 2)
    if name == "dil_conv_5x5":
        return dil_conv(channels, 5, stride, 4, 2)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(channels, affine=False))
    if name == "avg_pool_3x3":
        pool = nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        return nn.Sequential(pool, nn.BatchNorm2d(channels, affine=False))
    return nn.Identity() if stride == 1 else FactorizedReduce(channels, channels)


class MixedOp(nn.Module):
    def __init__(self, channels, stride):
        super().__init__()
        self.candidates = nn.ModuleList([build_op(p, channels, stride) for p in PRIMITIVES])

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.candidates))


class Cell(nn.Module):
    def __init__(self, nodes, c_prev_prev, c_prev, channels, reduction, reduction_prev):
        super().__init__()
        self.nodes = nodes
        if reduction_prev:
            self.preprocess_0 = FactorizedReduce(c_prev_prev, channels)
        else:
            self.preprocess_0 = relu_conv_bn(c_prev_prev, channels)
        self.preprocess_1 = relu_conv_bn(c_prev, channels)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and source < 2 else 1)
            for node in range(nodes)
            for source in range(2 + node)
        )

    def forward(self, s0, s1, weights):
        states = [self.preprocess_0(s0), self.preprocess_1(s1)]
        offset = 0
        for _ in range(self.nodes):
            states.append(
                sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            )
            offset += len(states) - 1
        return torch.cat(states[-self.nodes :], dim=1)


class Network(nn.Module):
    def __init__(self, channels, num_cells, nodes=4, num_classes=10):
        super().__init__()
        stem = 3 * channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        )
        c_prev_prev, c_prev, current = stem, stem, channels
        self.cells = nn.ModuleList()
        self.reductions = {num_cells // 3, 2 * num_cells // 3}
        reduction_prev = False
        for index in range(num_cells):
            reduction = index in self.reductions
            current *= 2 if reduction else 1
            self.cells.append(Cell(nodes, c_prev_prev, c_prev, current, reduction, reduction_prev))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, nodes * current
        self.classifier = nn.Linear(c_prev, num_classes)
        edges = sum(2 + i for i in range(nodes))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(PRIMITIVES)))

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for index, cell in enumerate(self.cells):
            alpha = self.alpha_reduce if index in self.reductions else self.alpha_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alpha, dim=-1))
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--num_cells", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    network = Network(args.channels, args.num_cells)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    weights = [p for n, p in network.named_parameters() if not n.startswith("alpha")]
    optimizer = torch.optim.SGD(weights, 0.025, momentum=0.9, weight_decay=3e-4)

    def step():
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(network(images), labels).backward()
        nn.utils.clip_grad_norm_(weights, 5.0)
        optimizer.step()
        return time.perf_counter() - started

    first = step()
    median = statistics.median(step() for _ in range(args.steps))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, C={args.channels} "
        f"cells={args.num_cells} B={args.batch_size}: first step {first:.1f} s, "
        f"median {1000 * median:.0f} ms, {args.batch_size / median:.1f} images/s, "
        f"peak RSS {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
