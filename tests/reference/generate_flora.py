#!/usr/bin/python3
"""PyTorch reference values for FLoRA (tests/test_flora.cpp).

Run from anywhere with /usr/bin/python3 (torch 1.13); writes flora_*.txt beside this script.

ΔW is computed with the official formulation: the weight's modes ordered (in, out, k...), factors
param_n of shape (dims[n], r_n), core param_G (r_in, r_out, r_k...), the core contracted with
param_0, param_1, ... in turn by torch.tensordot (each product contracts the leading mode, so the
modes come back in order), then the first two modes transposed to (out, in, k...) and the result
multiplied by the scale. Grouped and depthwise convolutions use the weight's own extents,
dims = (in/groups, out, k...). Gradients come from autograd, in float64.

The frozen weight and the weight gradient are not stored; both sides compute them from the flat
row-major index i of the weight:
    W0[i] = 0.1 * cos(0.23 * i + 0.1)        gW[i] = sin(0.37 * i + 0.5)
Each case stores, under its prefix: scale, param_G, param_<n>, dW (scale · expansion), merged
(W0 + dW; not for the 64x32x3x3 conv, to keep the file small) and grad_param_G, grad_param_<n>, the
gradients of L = sum(dW * gW). The linear case also stores an activation-space forward/backward
through the official Linear layer's formula y = F.linear(x, W0, b0) + F.linear(x, dW), with
L = sum(y * dy).
"""

import math
import os

import torch
import torch.nn.functional as F

from refio import Writer

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(20240523)
DT = torch.float64


def probe_w0(shape):
    n = math.prod(shape)
    return (0.1 * torch.cos(0.23 * torch.arange(n, dtype=DT) + 0.1)).reshape(shape)


def probe_gw(shape):
    n = math.prod(shape)
    return torch.sin(0.37 * torch.arange(n, dtype=DT) + 0.5).reshape(shape)


def official_params(dims, r):
    """The official tensors with values drawn as the official init would, but a non-zero core."""
    g = torch.randn(r, dtype=DT).requires_grad_(True)
    ps = []
    for d, rn in zip(dims, r):
        ps.append((torch.randn(d, rn, dtype=DT) / math.sqrt(2.0 * rn)).requires_grad_(True))
    return g, ps


def official_delta(g, ps, scale):
    """The official expansion: contract the core's leading mode with each factor in turn."""
    dt = torch.tensordot(g, ps[0], dims=[[0], [1]])
    for p in ps[1:]:
        dt = torch.tensordot(dt, p, dims=[[0], [1]])
    if dt.dim() > 1:
        dt = dt.transpose(0, 1)
    return scale * dt


def einsum_delta(g, ps, scale):
    """The same in the weight's order (out, in, k...), by einsum: an independent cross-check."""
    letters = "abcde"[: g.dim()]
    upper = "ABCDE"[: g.dim()]
    out_order = [1, 0] + list(range(2, g.dim()))
    terms = [letters] + [upper[n] + letters[n] for n in range(g.dim())]
    result = "".join(upper[n] for n in out_order)
    return scale * torch.einsum(",".join(terms) + "->" + result, g, *ps)


def add_case(w, prefix, weight_shape, official_ranks, scale, store_merged=True):
    """weight_shape is ours (out, in/groups, k...); official_ranks are (r_in, r_out, r_k...)."""
    out_ch, in_ch = weight_shape[0], weight_shape[1]
    dims = [in_ch, out_ch] + list(weight_shape[2:])
    g, ps = official_params(dims, official_ranks)
    dw = official_delta(g, ps, scale)
    assert list(dw.shape) == list(weight_shape)
    assert torch.allclose(dw, einsum_delta(g, ps, scale), rtol=1e-12, atol=1e-14)
    gw = probe_gw(weight_shape)
    (dw * gw).sum().backward()
    w.add(prefix + ".scale", torch.tensor([scale], dtype=DT))
    w.add(prefix + ".param_G", g)
    for n, p in enumerate(ps):
        w.add(prefix + ".param_%d" % n, p)
    w.add(prefix + ".dW", dw)
    if store_merged:
        w.add(prefix + ".merged", probe_w0(weight_shape) + dw)
    w.add(prefix + ".grad_param_G", g.grad)
    for n, p in enumerate(ps):
        w.add(prefix + ".grad_param_%d" % n, p.grad)
    return g, ps, dw.detach()


def linear_file():
    w = Writer(os.path.join(HERE, "flora_linear.txt"), "FLoRA, linear weight (12, 10); see generate_flora.py")
    out_f, in_f, scale = 12, 10, 2.0
    g, ps, dw = add_case(w, "linear", [out_f, in_f], [3, 4], scale)
    # Activation space through the official Linear layer's formula.
    g.grad = None
    for p in ps:
        p.grad = None
    n = 5
    x = torch.randn(n, in_f, dtype=DT).requires_grad_(True)
    b0 = torch.randn(out_f, dtype=DT)
    dy = torch.randn(n, out_f, dtype=DT)
    w0 = probe_w0([out_f, in_f])
    y = F.linear(x, w0, b0) + F.linear(x, official_delta(g, ps, scale))
    (y * dy).sum().backward()
    w.add("linear.x", x)
    w.add("linear.b0", b0)
    w.add("linear.dy", dy)
    w.add("linear.y", y)
    w.add("linear.dx", x.grad)
    w.add("linear.act_grad_param_G", g.grad)
    for k, p in enumerate(ps):
        w.add("linear.act_grad_param_%d" % k, p.grad)
    w.close()


def conv2d_file():
    w = Writer(os.path.join(HERE, "flora_conv2d.txt"),
               "FLoRA, conv2d weight (64, 32, 3, 3), ranks (8, 8, 2, 2); see generate_flora.py")
    add_case(w, "conv2d", [64, 32, 3, 3], [8, 8, 2, 2], 4.0, store_merged=False)
    w.close()


def grouped_file():
    w = Writer(os.path.join(HERE, "flora_grouped.txt"),
               "FLoRA, grouped conv2d (in 16, out 24, groups 4) and depthwise conv2d (16 channels); "
               "see generate_flora.py")
    _, _, dw = add_case(w, "grouped", [24, 4, 3, 3], [3, 6, 2, 3], 1.5)
    # The adapted weight is a valid weight of the grouped layer.
    y = F.conv2d(torch.randn(2, 16, 7, 7, dtype=DT), probe_w0([24, 4, 3, 3]) + dw, groups=4)
    assert list(y.shape) == [2, 24, 5, 5]
    _, _, dw = add_case(w, "depthwise", [16, 1, 3, 3], [1, 4, 2, 2], 1.5)
    y = F.conv2d(torch.randn(2, 16, 7, 7, dtype=DT), probe_w0([16, 1, 3, 3]) + dw, groups=16)
    assert list(y.shape) == [2, 16, 5, 5]
    w.close()


def conv3d_file():
    w = Writer(os.path.join(HERE, "flora_conv3d.txt"),
               "FLoRA, conv3d weight (8, 6, 3, 2, 3) and conv1d weight (10, 4, 5); see generate_flora.py")
    add_case(w, "conv3d", [8, 6, 3, 2, 3], [2, 3, 2, 1, 3], 0.5)
    add_case(w, "conv1d", [10, 4, 5], [2, 3, 2], 3.0)
    w.close()


if __name__ == "__main__":
    linear_file()
    conv2d_file()
    grouped_file()
    conv3d_file()
