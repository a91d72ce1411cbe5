#!/usr/bin/python3
"""PyTorch reference values for the AdamW optimizer (torch.optim.AdamW), float64.

Writes adamw.txt into this directory: two parameters shaped like a LoRA adapter (A (3, 5), B (4, 3)),
updated for 6 steps from fixed random gradients, with lr 1e-2 for steps 1-3 and 3e-3 for steps 4-6
(a schedule, set through the param group as a scheduler would), betas (0.9, 0.999), eps 1e-8,
weight_decay 0.05.

Records: A0, B0 (initial values), gA<t>, gB<t> (the gradient of step t = 1..6), A<t>, B<t> (the values
after step t).

Run from anywhere:  /usr/bin/python3 tests/reference/generate_adamw.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refio import Writer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    torch.manual_seed(7)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = Writer(os.path.join(HERE, "adamw.txt"), __doc__.strip().splitlines()[0])
    w.add("A0", a)
    w.add("B0", b)
    opt = torch.optim.AdamW([a, b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    for t in range(1, 7):
        if t == 4:
            for group in opt.param_groups:
                group["lr"] = 3e-3
        ga = torch.randn(3, 5, dtype=torch.float64) * (0.1 * t)
        gb = torch.randn(4, 3, dtype=torch.float64) * (0.1 * t)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        w.add("gA%d" % t, ga)
        w.add("gB%d" % t, gb)
        w.add("A%d" % t, a)
        w.add("B%d" % t, b)
    w.close()


if __name__ == "__main__":
    main()
