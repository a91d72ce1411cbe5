#!/usr/bin/python3
"""GLoRA and FLoRA adapters on disk, written from PyTorch tensors with the published layouts.

Writes, under peft/ (run from tests/reference/; the base weights are generate_peft_files.py's
peft/base_model.safetensors):

  peft/glora_<case>/adapter_model.safetensors  the PEFT-style GLoRA code's state-dict keys
                                               base_model.model.<module>.glora_Ad (O, R), glora_Au (R, I),
                                               glora_Bd (O, R), glora_Bu (R, I), glora_Cd (I, R),
                                               glora_Cu (R, 1), glora_D (O), glora_E (O), with I the weight's
                                               fan-in; "__metadata__": {"format": "pt"}
  peft/glora_<case>/adapter_config.json        "peft_type": "GLORA", "r", "target_modules", ... and
                                               "eval_config" {module: configuration}, as text
                                               ("A=lora_3,B=vector,...") or the code's own dictionary
                                               ({"A": "LoRA_3", "D": "constant", ...})
  peft/flora_<case>/adapter_model.safetensors  the official FLoRA code's state-dict keys
                                               <module>.flora_layer.param_G (r_in, r_out, r_k...) and
                                               .param_<n> (dims[n], r_n), dims = (in, out, k...)
  peft/flora_<case>/adapter_config.json        "peft_type": "FLORA", "scale", "target_modules"
  adapter_files.txt                            (refio) per case and module: GLoRA w_eff / b_eff (the
                                               merged layer), FLoRA delta_weight (official orientation
                                               (out, in, k...)); and merged/<case>/<tensor>, every floating
                                               base tensor after the merge, plus the bias a GLoRA merge
                                               adds to a layer without one.

Cases:
  glora_f32          F32, R = 4, target_modules a list (the code's rule: the module name ends with an
                     entry), every module with a fixed eval_config (one in the dictionary form); two linear
                     layers without a bias (k_proj gains one: E + W0·C; down_proj's C and E are none, so it
                     does not) and a conv weight (6, 3, 3, 3) seen as (6, 27).
  glora_f64_supernet F64, R = 2, target_modules a regular expression, one module without eval_config (a
                     supernet layer: it loads, but cannot be merged).
  flora_f32          F32, scale 4, linear (N = 2) and conv (N = 4, 3x3 and 1x1) modules.
  flora_bf16         the flora_f32 tensors stored as BF16 (references computed from the rounded values).
  flora_f32_missing_param  flora_f32 without model.conv1's param_2 (loading must name it).

GLoRA follows the code's prepare_path (lora_r: Xd[:, :r] @ Xu[:r]; vector: Xd[:, 0] as a column; D, E
vector: the whole store; constant: Xd[0, 0] / Xd[0]; none: zero) and its layer
    W_eff = W0 + W0 * A + B,   b_eff = b0 + b0 * D + E + (W0 @ C).squeeze()   (no bias: E + (W0 @ C).squeeze())
with the prompt term from the original W0 (one fork's merge reads the already-updated weight; that
is a bug there, not the method). FLoRA follows the official forward: param_G contracted with param_0,
param_1, ... by torch.tensordot (leading mode each time), the first two modes transposed, times scale.
Everything is computed in float64 from the stored (rounded) values.

  /usr/bin/python3 generate_adapter_files.py                   regenerate everything
  /usr/bin/python3 generate_adapter_files.py --check DIR CASE  check a directory the library saved
                                                               against CASE with these conventions
"""

import json
import math
import os
import re
import sys

import torch

from generate_peft_files import MODULES, OUT, DTYPES, base_tensors, read_safetensors, write_safetensors
from refio import Writer

HERE = os.path.dirname(os.path.abspath(__file__))

BIASES = {"model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj.bias", "model.conv1": "model.conv1.bias"}
GLORA_NAMES = ["glora_Ad", "glora_Au", "glora_Bd", "glora_Bu", "glora_Cd", "glora_Cu", "glora_D", "glora_E"]


# --------------------------------------------------------------------------------------------------
# GLoRA

def glora_prepare(kind, xd, xu=None):
    """How a support tensor reads the store (the code's prepare_path, with its kind names)."""
    if xu is not None:
        if kind.startswith("LoRA_"):
            r = int(kind.split("_")[1])
            return xd[:, :r] @ xu[:r, :]
        if kind == "vector":
            return xd[:, 0].unsqueeze(1)
        if kind == "constant":
            return xd[0, 0]
        assert kind == "none", kind
        return torch.zeros(xd.shape[0], xu.shape[1], dtype=xd.dtype)
    if kind == "vector":
        return xd
    if kind == "constant":
        return xd[0]
    assert kind == "none", kind
    return torch.zeros(1, dtype=xd.dtype)


def glora_merge(store, config, w0, b0):
    """(W_eff, b_eff) of a layer; w0 of any rank is seen as (O, fan-in)."""
    w = w0.reshape(w0.shape[0], -1)
    a = glora_prepare(config["A"], store["glora_Ad"], store["glora_Au"])
    b = glora_prepare(config["B"], store["glora_Bd"], store["glora_Bu"])
    c = glora_prepare(config["C"], store["glora_Cd"], store["glora_Cu"])
    d = glora_prepare(config["D"], store["glora_D"])
    e = glora_prepare(config["E"], store["glora_E"])
    w_eff = w + w * a + b
    prompt = (w @ c).squeeze(1)
    b_eff = (b0 + b0 * d + e + prompt) if b0 is not None else (e + prompt)
    b_eff = b_eff.expand(w.shape[0]).clone()
    return w_eff.reshape(w0.shape), b_eff


def text_form(config):
    """The library's text form of the code's configuration dictionary."""
    def word(kind):
        if kind.startswith("LoRA_"):
            return "lora_" + kind.split("_")[1]
        return {"constant": "scalar"}.get(kind, kind)
    return ",".join("%s=%s" % (k, word(config[k])) for k in "ABCDE")


def from_text(text):
    """The code's dictionary of a text form."""
    out = {}
    for field in text.split(","):
        k, v = field.split("=")
        out[k] = "LoRA_" + v[5:] if v.startswith("lora_") else {"scalar": "constant"}.get(v, v)
    return out


def glora_targets(config, module):
    t = config["target_modules"]
    if isinstance(t, str):
        return re.fullmatch(t, module) is not None
    return any(module.endswith(x) for x in t)


def glora_config_json(r, target_modules, eval_config):
    # GLoraConfig's fields (PeftConfig's and r, target_modules), plus the library's eval_config.
    return {
        "base_model_name_or_path": "tiny-test-model",
        "bias": "none",
        "eval_config": eval_config,
        "inference_mode": True,
        "modules_to_save": None,
        "peft_type": "GLORA",
        "r": r,
        "revision": None,
        "target_modules": target_modules,
        "task_type": None,
    }


def glora_cases():
    """{case: (config json, {module: store in float64}, {module: code config or None}, dtype)}."""
    cases = {}
    gen = torch.Generator().manual_seed(61)
    layers = {
        "model.layers.0.self_attn.q_proj": {"A": "LoRA_3", "B": "vector", "C": "LoRA_2", "D": "constant", "E": "vector"},
        "model.layers.0.self_attn.k_proj": {"A": "constant", "B": "LoRA_4", "C": "vector", "D": "vector", "E": "constant"},
        "model.layers.0.mlp.down_proj": {"A": "vector", "B": "none", "C": "none", "D": "none", "E": "none"},
        "model.conv1": {"A": "LoRA_4", "B": "LoRA_2", "C": "vector", "D": "vector", "E": "vector"},
    }
    stores = {m: glora_store(MODULES[m], 4, gen, torch.float32) for m in layers}
    eval_config = {m: text_form(c) for m, c in layers.items()}
    eval_config["model.layers.0.self_attn.k_proj"] = layers["model.layers.0.self_attn.k_proj"]  # dictionary form
    config = glora_config_json(4, ["layers.0.self_attn.q_proj", "k_proj", "down_proj", "conv1"], eval_config)
    cases["glora_f32"] = (config, stores, layers, "F32")

    gen = torch.Generator().manual_seed(62)
    layers = {
        "model.layers.0.self_attn.v_proj": {"A": "LoRA_2", "B": "constant", "C": "LoRA_1", "D": "vector", "E": "none"},
        "model.layers.1.self_attn.v_proj": None,
    }
    stores = {m: glora_store(MODULES[m], 2, gen, torch.float64) for m in layers}
    config = glora_config_json(2, r".*\.v_proj", {"model.layers.0.self_attn.v_proj": text_form(layers[
        "model.layers.0.self_attn.v_proj"])})
    cases["glora_f64_supernet"] = (config, stores, layers, "F64")
    return cases


def glora_store(weight_shape, r, gen, dtype):
    o, i = weight_shape[0], math.prod(weight_shape[1:])
    shapes = {"glora_Ad": (o, r), "glora_Au": (r, i), "glora_Bd": (o, r), "glora_Bu": (r, i),
              "glora_Cd": (i, r), "glora_Cu": (r, 1), "glora_D": (o,), "glora_E": (o,)}
    # Trained values: every entry nonzero, of a scale where each term matters.
    return {k: (0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(torch.float64)
            for k, s in shapes.items()}


# --------------------------------------------------------------------------------------------------
# FLoRA

def flora_delta(param_g, params, scale):
    """The official forward: contract the core's leading mode with each factor, transpose modes 0, 1."""
    dt = torch.tensordot(param_g, params[0], dims=[[0], [1]])
    for p in params[1:]:
        dt = torch.tensordot(dt, p, dims=[[0], [1]])
    if dt.dim() > 1:
        dt = dt.transpose(0, 1)
    return scale * dt


def flora_cases():
    """{case: (config json, {module: (param_G, [param_n])} in float64, dtype)}."""
    ranks = {  # module: official-order ranks (r_in, r_out, r_k...)
        "model.layers.0.self_attn.q_proj": (3, 2),
        "model.layers.0.mlp.down_proj": (4, 3),
        "model.conv1": (2, 3, 2, 2),
        "model.proj_1x1": (2, 2, 1, 1),
    }
    gen = torch.Generator().manual_seed(63)
    tensors = {}
    for m, r in ranks.items():
        shape = MODULES[m]
        dims = (shape[1], shape[0]) + tuple(shape[2:])
        g = torch.randn(r, generator=gen, dtype=torch.float64)
        ps = [torch.randn(d, rn, generator=gen, dtype=torch.float64) / math.sqrt(2.0 * rn) for d, rn in zip(dims, r)]
        tensors[m] = (g, ps)
    config = {"peft_type": "FLORA", "scale": 4, "target_modules": sorted(ranks)}
    cases = {}
    for case, dt in (("flora_f32", "F32"), ("flora_bf16", "BF16")):
        tdt = DTYPES[dt][0]
        rounded = {m: (g.to(tdt).to(torch.float64), [p.to(tdt).to(torch.float64) for p in ps])
                   for m, (g, ps) in tensors.items()}
        cases[case] = (config, rounded, dt)
    return cases


# --------------------------------------------------------------------------------------------------

def write_dir(d, files, config):
    os.makedirs(d, exist_ok=True)
    write_safetensors(os.path.join(d, "adapter_model.safetensors"), files, {"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def generate():
    base = base_tensors()
    w = Writer(os.path.join(HERE, "adapter_files.txt"),
               "written by generate_adapter_files.py: GLoRA merged layers and FLoRA delta weights (float64) of the\n"
               "adapters in peft/glora_* and peft/flora_*, and the merged base tensors")

    for case, (config, stores, layers, dt) in glora_cases().items():
        files = {"base_model.model." + m + "." + k: (v, dt) for m, s in stores.items() for k, v in s.items()}
        d = os.path.join(OUT, case)
        write_dir(d, files, config)
        back, _, meta = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
        assert meta == {"format": "pt"}
        assert all(torch.equal(back[k], v.to(torch.float64)) for k, (v, _) in files.items())
        merged = dict(base)
        for m, store in stores.items():
            assert glora_targets(config, m), m
            if layers[m] is None:
                continue
            b0 = base.get(BIASES.get(m, ""))
            w_eff, b_eff = glora_merge(store, layers[m], base[m + ".weight"], b0)
            w.add(case + "/" + m + "/w_eff", w_eff)
            w.add(case + "/" + m + "/b_eff", b_eff)
            merged[m + ".weight"] = w_eff
            if b0 is not None or layers[m]["C"] != "none" or layers[m]["E"] != "none":
                merged[m + ".bias"] = b_eff
        if all(c is not None for c in layers.values()):
            for k, v in merged.items():
                w.add("merged/" + case + "/" + k, v)

    cases = flora_cases()
    for case, (config, tensors, dt) in cases.items():
        files = {}
        for m, (g, ps) in tensors.items():
            files[m + ".flora_layer.param_G"] = (g, dt)
            for n, p in enumerate(ps):
                files[m + ".flora_layer.param_%d" % n] = (p, dt)
        d = os.path.join(OUT, case)
        write_dir(d, files, config)
        back, _, _ = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
        assert all(torch.equal(back[k], v) for k, (v, _) in files.items())
        merged = dict(base)
        for m, (g, ps) in tensors.items():
            dw = flora_delta(g, ps, float(config["scale"]))
            assert tuple(dw.shape) == MODULES[m], (m, dw.shape)
            # The same ΔW as one einsum over the official modes, then the first two exchanged.
            core = "abcde"[:g.dim()]
            out = "pqrst"[:g.dim()]
            spec = core + "," + ",".join(out[n] + core[n] for n in range(g.dim())) + "->" + out
            ours = torch.einsum(spec, g, *ps).transpose(0, 1) * float(config["scale"])
            assert torch.allclose(dw, ours, rtol=0, atol=1e-12), m
            w.add(case + "/" + m + "/delta_weight", dw)
            merged[m + ".weight"] = merged[m + ".weight"] + dw
        for k, v in merged.items():
            w.add("merged/" + case + "/" + k, v)
    w.close()

    # flora_f32 without model.conv1's param_2.
    config, tensors, dt = cases["flora_f32"]
    files = {}
    for m, (g, ps) in tensors.items():
        files[m + ".flora_layer.param_G"] = (g, dt)
        for n, p in enumerate(ps):
            if not (m == "model.conv1" and n == 2):
                files[m + ".flora_layer.param_%d" % n] = (p, dt)
    write_dir(os.path.join(OUT, "flora_f32_missing_param"), files, config)


# --------------------------------------------------------------------------------------------------

def check(directory, case):
    """Checks an adapter directory the library saved against `case`, with the conventions above."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    tensors, dtypes, meta = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    tensors = {k: v.to(torch.float64) for k, v in tensors.items()}
    assert meta.get("format") == "pt", meta
    if case.startswith("glora"):
        config, stores, layers, dt = glora_cases()[case]
        assert saved["peft_type"] == "GLORA" and saved["r"] == config["r"] and saved["bias"] == "none", saved
        expected = set()
        for m, store in stores.items():
            assert glora_targets(saved, m), m
            for k, v in store.items():
                key = "base_model.model." + m + "." + k
                expected.add(key)
                assert dtypes[key] == dt, (key, dtypes[key])
                assert torch.equal(tensors[key], v), key
            got = saved["eval_config"].get(m)
            if layers[m] is None:
                assert got is None, (m, got)
            else:
                got = from_text(got) if isinstance(got, str) else got
                assert got == layers[m], (m, got, layers[m])
                # The saved store and configuration merge as the reference does.
                store_back = {k: tensors["base_model.model." + m + "." + k] for k in GLORA_NAMES}
                w0 = base_tensors()[m + ".weight"]
                b0 = base_tensors().get(BIASES.get(m, ""))
                for a, b in zip(glora_merge(store_back, got, w0, b0), glora_merge(store, layers[m], w0, b0)):
                    assert torch.equal(a, b), m
        assert set(tensors) == expected, sorted(set(tensors) ^ expected)
        print("%s: %d GLoRA modules match case %s" % (directory, len(stores), case))
        return
    config, modules, dt = flora_cases()[case]
    assert saved["peft_type"] == "FLORA" and saved["scale"] == config["scale"], saved
    assert sorted(saved["target_modules"]) == sorted(modules), saved["target_modules"]
    expected = set()
    for m, (g, ps) in modules.items():
        keys = [m + ".flora_layer.param_G"] + [m + ".flora_layer.param_%d" % n for n in range(len(ps))]
        expected |= set(keys)
        for key, want in zip(keys, [g] + ps):
            assert dtypes[key] == dt, (key, dtypes[key])
            assert tuple(tensors[key].shape) == tuple(want.shape) and torch.equal(tensors[key], want), key
        dw = flora_delta(tensors[keys[0]], [tensors[k] for k in keys[1:]], float(saved["scale"]))
        assert torch.equal(dw, flora_delta(g, ps, float(config["scale"]))), m
    assert set(tensors) == expected, sorted(set(tensors) ^ expected)
    print("%s: %d FLoRA modules match case %s in the official mode order" % (directory, len(modules), case))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    else:
        generate()
