"""PyTorch autograd references for GLoRA (tests/test_glora.cpp), for every configuration of one rank.

Run with /usr/bin/python3 (torch 1.13) from this directory:  /usr/bin/python3 generate_glora.py

The layer follows the official GLoRA code: each support tensor is read from one store by its kind
(prepare_path), then
    W_eff = W0 + W0 * A + B
    b_eff = b0 + b0 * D + E + (W0 @ C).squeeze()      (without a bias: E + (W0 @ C).squeeze())
    y     = x @ W_eff.T + b_eff
and the loss sum(y * dy) is differentiated by autograd.

Shapes: O = 5, I = 4, maximum rank R = 3, lora rank r = 2 (so the third column/row of every factor is
stored but never read), batch 3. Every value of the store, the layer and the inputs is a nonzero
multiple of 1/2 in [-2, 2]: every term of every formula matters, the results are exact in float and
double, and they print in few digits, which keeps the files small.

Files (one per bias mode): glora_bias.txt, glora_nobias.txt. Each holds the inputs (x, w0, b0, dy and
the store Ad, Au, Bd, Bu, Cd, Cu, D, E) and, stacked over the 432 configurations in the order of
enumerate_glora_configs(make_glora_space(2)) (A slowest, E fastest; A, B: lora_2, vector, scalar, none;
C: lora_2, vector, none; D, E: vector, scalar, none):
    kinds (432, 5)      per support tensor: r for lora_r, -1 vector, -2 scalar, 0 none
    y (432, 3, 5), dx (432, 3, 4), gAd, gAu, gBd, gBu, gCd, gCu, gD, gE (432, store shape),
    w_eff (432, 5, 4), b_eff (432, 5)
Gradients autograd does not reach (a tensor the configuration does not read) are written as zeros.
"""

import itertools

import torch

from refio import Writer

O, I, R, RANK, N = 5, 4, 3, 2, 3

AB = [("lora", RANK), ("vector", 0), ("scalar", 0), ("none", 0)]
C_KINDS = [("lora", RANK), ("vector", 0), ("none", 0)]
DE = [("vector", 0), ("scalar", 0), ("none", 0)]


def code(kind):
    name, r = kind
    return {"lora": r, "vector": -1, "scalar": -2, "none": 0}[name]


def halves(gen, *shape):
    """Nonzero multiples of 1/2 in [-2, 2]."""
    v = torch.randint(1, 5, shape, generator=gen).to(torch.float64) / 2
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return v * sign


def prepare_path(kind, xd, xu=None):
    """The official code's prepare_path: how a support tensor reads the store."""
    name, r = kind
    if xu is not None:
        if name == "lora":
            return xd[:, :r] @ xu[:r, :]
        if name == "vector":
            return xd[:, 0].unsqueeze(1)
        if name == "scalar":
            return xd[0, 0]
        return torch.zeros(xd.shape[0], xu.shape[1], dtype=xd.dtype)
    if name == "vector":
        return xd
    if name == "scalar":
        return xd[0]
    return torch.zeros(1, dtype=xd.dtype)


def generate(with_bias, path):
    gen = torch.Generator().manual_seed(20240505)
    x = halves(gen, N, I)
    w0 = halves(gen, O, I)
    b0 = halves(gen, O)
    dy = halves(gen, N, O)
    store = {
        "Ad": halves(gen, O, R),
        "Au": halves(gen, R, I),
        "Bd": halves(gen, O, R),
        "Bu": halves(gen, R, I),
        "Cd": halves(gen, I, R),
        "Cu": halves(gen, R, 1),
        "D": halves(gen, O),
        "E": halves(gen, O),
    }

    w = Writer(path, "GLoRA references by PyTorch %s autograd, %s bias; see generate_glora.py"
               % (torch.__version__, "with" if with_bias else "without"))
    w.add("x", x)
    w.add("w0", w0)
    if with_bias:
        w.add("b0", b0)
    w.add("dy", dy)
    for name, t in store.items():
        w.add(name, t)

    out = {k: [] for k in ["kinds", "y", "dx", "w_eff", "b_eff"] + ["g" + n for n in store]}
    for ka, kb, kc, kd, ke in itertools.product(AB, AB, C_KINDS, DE, DE):
        p = {n: t.clone().requires_grad_(True) for n, t in store.items()}
        xx = x.clone().requires_grad_(True)
        A = prepare_path(ka, p["Ad"], p["Au"])
        B = prepare_path(kb, p["Bd"], p["Bu"])
        C = prepare_path(kc, p["Cd"], p["Cu"])
        D = prepare_path(kd, p["D"])
        E = prepare_path(ke, p["E"])
        w_eff = w0 + w0 * A + B
        if with_bias:
            b_eff = b0 + b0 * D + E
        else:
            b_eff = E
        b_eff = b_eff + torch.matmul(w0, C).squeeze()
        b_eff = b_eff.expand(O)
        y = torch.nn.functional.linear(xx, w_eff, b_eff)
        (y * dy).sum().backward()
        out["kinds"].append(torch.tensor([code(k) for k in (ka, kb, kc, kd, ke)], dtype=torch.float64))
        out["y"].append(y.detach())
        out["dx"].append(xx.grad)
        out["w_eff"].append(w_eff.detach().expand(O, I))
        out["b_eff"].append(b_eff.detach())
        for n, t in p.items():
            out["g" + n].append(t.grad if t.grad is not None else torch.zeros_like(t))
    for k, v in out.items():
        w.add(k, torch.stack(v))
    w.close()


if __name__ == "__main__":
    generate(True, "glora_bias.txt")
    generate(False, "glora_nobias.txt")
