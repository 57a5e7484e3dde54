"""GGUF helpers of the golden generators, on ggml's own Python package (`gguf`).

`gguf` writes the files and its numpy dequantization is the reference our decoding must equal
bit for bit. It quantizes only the 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and F16/BF16;
k-quant tensors (Q2_K … Q6_K) are made of random block bytes with chosen scales, which is just
as good a test of decoding and of a model run on the decoded weights.
"""

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants

TYPES = {t.name: t for t in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]}
QUANTIZABLE = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"}

# byte offsets of the f16 scale fields (d, and dmin or m where the type has one) in a block
SCALE_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
# typical |value| of a k-quant block per unit of its f16 scale with random quants and 6/8-bit
# sub-scales (so `encode` can aim random blocks at a weight's magnitude)
SPREAD = {"Q2_K": 11.0, "Q3_K": 32.0, "Q4_K": 240.0, "Q5_K": 480.0, "Q6_K": 1000.0}
# scales every block format must survive: zeros of both signs, a subnormal, the f16 maximum
EDGE_SCALES = [0.0, -0.0, 2.0**-24, 65504.0, -2.5, 1e-3]


def random_blocks(name, rows, cols, rng, scale, edge=False):
    """Random block bytes for a (rows, cols) tensor of k-quant/legacy type `name`; scale fields
    drawn around `scale` (or cycling through EDGE_SCALES when `edge`)."""
    block, size = GGML_QUANT_SIZES[TYPES[name]]
    assert cols % block == 0
    n = rows * cols // block
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for j, off in enumerate(SCALE_FIELDS[name]):
        if edge:
            vals = np.array([EDGE_SCALES[(i + j) % len(EDGE_SCALES)] for i in range(n)], dtype=np.float16)
        else:
            vals = (scale * rng.uniform(0.5, 1.5, size=n)).astype(np.float16)
        b[:, off:off + 2] = vals.view(np.uint8).reshape(n, 2)
    return b.reshape(rows, cols // block * size)


def encode(name, values, rng=None, scale=None):
    """(bytes as uint8 (rows, row_bytes), decoded float32 (rows, cols)) of a 2-D f32 array in
    type `name`: quantized by `gguf` where it can, otherwise random blocks whose values are
    about `scale` in size."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    t = TYPES[name]
    if name == "F32":
        raw = values.view(np.uint8).reshape(values.shape[0], -1)
    elif name in QUANTIZABLE:
        raw = quants.quantize(values, t)
    else:
        raw = random_blocks(name, values.shape[0], values.shape[1], rng, scale / SPREAD[name])
    return raw, decode(name, raw)


def decode(name, raw):
    return quants.dequantize(raw, TYPES[name]).astype(np.float32)


def write(path, tensors, kv=None, arch=None):
    """A GGUF v3 file: `tensors` is a list of (name, type name, uint8 bytes, torch shape);
    `kv` extra metadata {key: str|int}. With `arch=None` the file has no metadata at all (as
    stable-diffusion.cpp's converter writes)."""
    w = GGUFWriter(path, arch or "none")
    if arch is None:
        w.kv_data = [{}]  # no general.architecture: sd.cpp's files carry no metadata
    for k, v in (kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_uint32(k, v)
    for name, tname, raw, shape in tensors:
        raw = np.ascontiguousarray(raw).reshape(list(shape[:-1]) + [-1])  # bytes, torch order
        w.add_tensor(name, raw, raw_shape=list(raw.shape), raw_dtype=TYPES[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
