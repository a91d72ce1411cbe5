#!/usr/bin/python3
"""PEFT LoRA adapters on disk, written from PyTorch tensors with the formats' published layouts.

Writes, under peft/ (run from tests/reference/):

  peft/<case>/adapter_model.safetensors   keys base_model.model.<module>.lora_A.weight / .lora_B.weight,
                                          PEFT's shapes (linear (r, in) / (out, r); conv2d (r, in, kh, kw) /
                                          (out, r, 1, 1)), "__metadata__": {"format": "pt"}
  peft/<case>/adapter_config.json         PEFT's LoraConfig fields (r, lora_alpha, use_rslora, target_modules,
                                          rank_pattern, alpha_pattern, ...)
  peft/lora_f32_missing_module/          lora_f32 without model.proj_1x1's factors (which its config targets)
  peft/base_model.safetensors             F32 base weights for every module of the cases, plus tensors no
                                          adapter touches (biases, a norm weight, an I64 buffer)
  peft_lora.txt                           (refio) for every case and module: delta_weight, PEFT's
                                          get_delta_weight in float64 from the stored factors; the module's
                                          resolved rank, alpha and scaling; and merged/<case>/<tensor>, the base
                                          weight plus delta_weight, for every floating base tensor.

Cases: lora_f32 (list target_modules, rank_pattern and alpha_pattern with both short and full-name keys),
lora_f64_rslora (F64, use_rslora, target_modules as a regular expression), lora_f16 and lora_bf16 (the
lora_f32 adapter stored in half precision; delta_weight is computed from the rounded values).

The safetensors layout (no `safetensors` package needed): 8 bytes little-endian u64 header length N, N bytes
of UTF-8 JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the data area; offsets are relative to it, tensors row-major little-endian,
laid out by decreasing element size, then by name.

A rank/alpha pattern key k applies to module m when re.match(rf"(.*\\.)?({k})$", m) (PEFT's get_pattern_key,
first key in order wins); a list target_modules selects m when m == t or m ends with "." + t, a string one
when re.fullmatch(target_modules, m).

  /usr/bin/python3 generate_peft_files.py                      regenerate everything
  /usr/bin/python3 generate_peft_files.py --check DIR CASE     check an adapter directory written by the
                                                               library against CASE, with these conventions
                                                               (glora_* and flora_* cases: those of
                                                               generate_adapter_files.py)
"""

import json
import math
import os
import re
import struct
import sys

import torch
import torch.nn.functional as F

from refio import Writer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "peft")

# module -> weight shape
MODULES = {
    "model.layers.0.self_attn.q_proj": (8, 8),
    "model.layers.0.self_attn.k_proj": (8, 8),
    "model.layers.0.self_attn.v_proj": (8, 8),
    "model.layers.0.mlp.down_proj": (8, 12),
    "model.layers.1.self_attn.q_proj": (8, 8),
    "model.layers.1.self_attn.v_proj": (8, 8),
    "model.conv1": (6, 3, 3, 3),
    "model.proj_1x1": (5, 6, 1, 1),
}
# base tensors that no adapter touches
EXTRA = {
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.norm.weight": (8,),
    "model.conv1.bias": (6,),
}

DTYPES = {  # name: (torch dtype, bytes per element)
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
}


def to_bytes(t, dtype_name):
    t = t.detach().contiguous()
    if dtype_name == "F64":
        return t.to(torch.float64).numpy().astype("<f8").tobytes()
    if dtype_name == "F32":
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    if dtype_name == "F16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    if dtype_name == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    if dtype_name == "I64":
        return t.to(torch.int64).numpy().astype("<i8").tobytes()
    raise ValueError(dtype_name)


def from_bytes(b, dtype_name, shape):
    import numpy as np
    if dtype_name == "BF16":
        raw = torch.from_numpy(np.frombuffer(b, dtype="<i2").astype(np.int16).copy())
        return raw.view(torch.bfloat16).to(torch.float64).reshape(shape)
    np_type = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8"}[dtype_name]
    return torch.from_numpy(np.frombuffer(b, dtype=np_type).copy()).reshape(shape)


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: (tensor, dtype name)}"""
    order = sorted(tensors, key=lambda n: (-DTYPES[tensors[n][1]][1], n))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    data = b""
    for name in order:
        t, dt = tensors[name]
        b = to_bytes(t, dt)
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def read_safetensors(path):
    """The published layout, checked: returns ({name: float64 tensor}, {name: dtype}, metadata)."""
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) >= 8, path
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw), "header length past the end of " + path
    assert raw[8:9] == b"{", path

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "duplicate keys in " + path
        return dict(pairs)

    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    pos = 0
    for begin, end, k in spans:
        assert begin == pos, "gap or overlap at " + k
        pos = end
    assert pos == len(data), "data area not covered in " + path
    out, dtypes = {}, {}
    for k, v in header.items():
        begin, end = v["data_offsets"]
        size = DTYPES[v["dtype"]][1] * math.prod(v["shape"])
        assert end - begin == size, k
        out[k] = from_bytes(data[begin:end], v["dtype"], v["shape"])
        dtypes[k] = v["dtype"]
    return out, dtypes, metadata


def pattern_key(keys, module):
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return module


def resolve(config, module):
    r = config["rank_pattern"].get(pattern_key(config["rank_pattern"].keys(), module), config["r"])
    alpha = config["alpha_pattern"].get(pattern_key(config["alpha_pattern"].keys(), module), config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return r, alpha, scaling


def targeted(config, module):
    t = config["target_modules"]
    if isinstance(t, str):
        return re.fullmatch(t, module) is not None
    return any(module == x or module.endswith("." + x) for x in t)


def delta_weight(A, B, scaling, weight_shape):
    """PEFT's get_delta_weight, float64."""
    A, B = A.to(torch.float64), B.to(torch.float64)
    if len(weight_shape) == 2:
        return (B @ A) * scaling
    if weight_shape[2:] == (1, 1):
        return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    dw = F.conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3) * scaling
    assert torch.allclose(dw, (B.flatten(1) @ A.flatten(1)).reshape(weight_shape) * scaling, rtol=0, atol=1e-12)
    return dw


def peft_config(r, alpha, target_modules, rank_pattern, alpha_pattern, use_rslora):
    # The fields PEFT's LoraConfig writes (save_pretrained), in its order.
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-test-model",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": target_modules,
        "task_type": None,
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def make_cases():
    """{case: (config, {module: (A, B)} in float64, storage dtype)}, reproducible."""
    cases = {}
    base_config = peft_config(
        4, 8, sorted(["q_proj", "k_proj", "v_proj", "down_proj", "conv1", "proj_1x1"]),
        {"v_proj": 2, "model.layers.1.self_attn.q_proj": 3}, {"k_proj": 4, "conv1": 12}, False)
    gen = torch.Generator().manual_seed(6)
    factors = {}
    for m, shape in MODULES.items():
        r, _, _ = resolve(base_config, m)
        a_shape = (r,) + shape[1:]
        b_shape = (shape[0], r) + (1,) * (len(shape) - 2)
        factors[m] = (0.3 * torch.randn(a_shape, generator=gen, dtype=torch.float64),
                      0.3 * torch.randn(b_shape, generator=gen, dtype=torch.float64))
    for case, dt in (("lora_f32", "F32"), ("lora_f16", "F16"), ("lora_bf16", "BF16")):
        torch_dt = DTYPES[dt][0]
        stored = {m: (a.to(torch_dt).to(torch.float64), b.to(torch_dt).to(torch.float64)) for m, (a, b) in factors.items()}
        cases[case] = (base_config, stored, dt)

    rs_config = peft_config(3, 5, r".*\.(q_proj|conv1)", {"layers.1.self_attn.q_proj": 2}, {}, True)
    gen = torch.Generator().manual_seed(7)
    stored = {}
    for m, shape in MODULES.items():
        if not targeted(rs_config, m):
            continue
        r, _, _ = resolve(rs_config, m)
        stored[m] = (torch.randn((r,) + shape[1:], generator=gen, dtype=torch.float64),
                     torch.randn((shape[0], r) + (1,) * (len(shape) - 2), generator=gen, dtype=torch.float64))
    cases["lora_f64_rslora"] = (rs_config, stored, "F64")
    return cases


def base_tensors():
    gen = torch.Generator().manual_seed(5)
    base = {}
    for name, shape in list(MODULES.items()) + list(EXTRA.items()):
        key = name if name in EXTRA else name + ".weight"
        base[key] = torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.float32).to(torch.float64)
    return base


def generate():
    os.makedirs(OUT, exist_ok=True)
    cases = make_cases()
    base = base_tensors()
    tensors = {k: (v, "F32") for k, v in base.items()}
    tensors["model.position_ids"] = (torch.arange(12, dtype=torch.int64).reshape(1, 12), "I64")
    write_safetensors(os.path.join(OUT, "base_model.safetensors"), tensors, {"format": "pt"})

    w = Writer(os.path.join(HERE, "peft_lora.txt"),
               "written by generate_peft_files.py: PEFT LoRA delta weights (float64) of the adapters in peft/")
    for case, (config, stored, dt) in cases.items():
        d = os.path.join(OUT, case)
        os.makedirs(d, exist_ok=True)
        files = {}
        for m, (a, b) in stored.items():
            files["base_model.model." + m + ".lora_A.weight"] = (a, dt)
            files["base_model.model." + m + ".lora_B.weight"] = (b, dt)
        write_safetensors(os.path.join(d, "adapter_model.safetensors"), files, {"format": "pt"})
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        # The files read back with the published layout give the same tensors.
        back, _, meta = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
        assert meta == {"format": "pt"}
        merged = dict(base)
        for m, (a, b) in stored.items():
            assert torch.equal(back["base_model.model." + m + ".lora_A.weight"].to(torch.float64), a)
            assert torch.equal(back["base_model.model." + m + ".lora_B.weight"].to(torch.float64), b)
            r, alpha, scaling = resolve(config, m)
            assert targeted(config, m) and a.shape[0] == r
            dw = delta_weight(a, b, scaling, MODULES[m])
            w.add(case + "/" + m + "/rank", torch.tensor(float(r), dtype=torch.float64))
            w.add(case + "/" + m + "/alpha", torch.tensor(float(alpha), dtype=torch.float64))
            w.add(case + "/" + m + "/scaling", torch.tensor(float(scaling), dtype=torch.float64))
            w.add(case + "/" + m + "/delta_weight", dw)
            merged[m + ".weight"] = merged[m + ".weight"] + dw
        for k, v in merged.items():
            w.add("merged/" + case + "/" + k, v)
    w.close()

    # lora_f32 without the factors of one module its target_modules selects (merge_adapter must refuse it).
    config, stored, dt = cases["lora_f32"]
    d = os.path.join(OUT, "lora_f32_missing_module")
    os.makedirs(d, exist_ok=True)
    files = {}
    for m, (a, b) in stored.items():
        if m != "model.proj_1x1":
            files["base_model.model." + m + ".lora_A.weight"] = (a, dt)
            files["base_model.model." + m + ".lora_B.weight"] = (b, dt)
    write_safetensors(os.path.join(d, "adapter_model.safetensors"), files, {"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def check(directory, case):
    """Checks an adapter directory written by the library against `case` with PEFT's conventions."""
    config, stored, dt = make_cases()[case]
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == "LORA" and saved["bias"] == "none" and not saved["fan_in_fan_out"]
    for key in ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern"):
        assert key in saved, key
    tensors, dtypes, meta = read_safetensors(os.path.join(directory, "adapter_model.safetensors"))
    assert meta.get("format") == "pt", meta
    expected_keys = set()
    for m, (a, b) in stored.items():
        ka, kb = "base_model.model." + m + ".lora_A.weight", "base_model.model." + m + ".lora_B.weight"
        expected_keys |= {ka, kb}
        assert dtypes[ka] == dt and dtypes[kb] == dt, (ka, dtypes[ka])
        assert tuple(tensors[ka].shape) == tuple(a.shape) and tuple(tensors[kb].shape) == tuple(b.shape), m
        assert targeted(saved, m), m
        assert resolve(saved, m) == resolve(config, m), (m, resolve(saved, m), resolve(config, m))
        r, alpha, scaling = resolve(saved, m)
        dw = delta_weight(tensors[ka], tensors[kb], scaling, MODULES[m])
        assert torch.equal(dw, delta_weight(a, b, scaling, MODULES[m])), m
    assert set(tensors) == expected_keys, sorted(set(tensors) ^ expected_keys)
    print("%s: %d modules match case %s" % (directory, len(stored), case))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check" and sys.argv[3].startswith(("glora", "flora")):
        import generate_adapter_files  # GLoRA and FLoRA cases: their own conventions
        generate_adapter_files.check(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    else:
        generate()
