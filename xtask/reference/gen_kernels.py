"""Goldens for flux-kernels: each shared op against PyTorch / diffusers on random inputs.

attention = torch scaled_dot_product_attention (with additive bias, causal mask and custom
scale too); RoPE tables = diffusers FluxPosEmbed (f64 angles) and BFL's `rope` restated (f32
angles, as at HEAD); RoPE application = diffusers apply_rotary_emb; RMSNorm = torch.nn.RMSNorm
as diffusers' QK-norm; LayerNorm = F.layer_norm without affine; GELU = F.gelu(approximate="tanh");
modulate = `(1 + scale) * x + shift` as BFL writes it; fp8 GEMM numerics = torch's e4m3 cast of
per-tensor-scaled activations.

Usage: python gen_kernels.py --out flux-kernels/tests/golden
"""

import torch
import torch.nn.functional as F

import common
from gen_dit import bfl_embed_nd, make_ids


def main():
    args = common.parse_args(__doc__)
    common.setup(0)
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)
    t = {}
    # attention (B, H, L, D)
    q, k, v = r(2, 3, 5, 8), r(2, 3, 7, 8), r(2, 3, 7, 6)
    t["attn/q"], t["attn/k"], t["attn/v"] = q, k, v
    t["attn/plain"] = F.scaled_dot_product_attention(q, k, v)
    bias = r(1, 3, 5, 7)
    t["attn/bias"] = bias
    t["attn/bias_scale1"] = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    kc, vc = r(2, 3, 5, 8), r(2, 3, 5, 6)
    t["attn/kc"], t["attn/vc"] = kc, vc
    t["attn/causal"] = F.scaled_dot_product_attention(q, kc, vc, is_causal=True)
    t["attn/bf16"] = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    # RoPE tables for FLUX-size axes on a 3×5 grid after 4 text tokens, one axis-0 token
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes, theta = [16, 56, 56], 10000
    img_ids, txt_ids = make_ids((3, 5), 4)
    ids = torch.cat([txt_ids, img_ids])
    ids[-1, 0] = 1.0
    t["rope/ids"] = ids
    cos, sin = FluxPosEmbed(theta, axes)(ids)
    t["rope/f64_cos"], t["rope/f64_sin"] = cos[:, ::2].float(), sin[:, ::2].float()
    t["rope/f32_cos"], t["rope/f32_sin"] = bfl_embed_nd(ids, axes, theta)
    x = r(1, 3, ids.shape[0], 128)
    t["rope/x"] = x
    t["rope/x_rotated"] = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)
    # norms and activations
    x = r(2, 5, 16) * 3 + 0.5
    t["norm/x"] = x
    rms = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.copy_(1 + 0.2 * r(16))
        t["norm/rms_scale"] = rms.weight.detach().clone()
        t["norm/rms"] = rms(x)
        t["norm/rms_bf16"] = rms.to(torch.bfloat16)(x.bfloat16())
    t["norm/layer"] = F.layer_norm(x, (16,), eps=1e-6)
    t["norm/layer_bf16"] = F.layer_norm(x.bfloat16(), (16,), eps=1e-6)
    t["act/gelu_tanh"] = F.gelu(x, approximate="tanh")
    t["act/gelu_tanh_bf16"] = F.gelu(x.bfloat16(), approximate="tanh")
    t["act/silu"] = F.silu(x)
    shift, scale = r(2, 1, 16), r(2, 1, 16)
    t["mod/shift"], t["mod/scale"] = shift, scale
    t["mod/out"] = (1 + scale) * x + shift
    meta = {"axes_dim": axes, "theta": theta, "eps": 1e-6, "seed": 5,
            "tolerance": {"f32": "abs=1e-5,rel=1e-5", "bf16": "abs=3e-2,rel=3e-2,cos>=0.999"}}
    common.save(args.out, "ops", t, meta)
    gen_quant(args.out)
    gen_fp8(args.out)


def round_fp8(x):
    """x as an fp8 GEMM's per-tensor e4m3 quantization holds it: scale = max |x| / 448 (1 for
    an all-zero x), x / scale clamped to ±448 and cast (torch rounds half to even), decoded and
    multiplied by the scale again, all in f32."""
    amax = x.abs().max()
    s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
    return (x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s


def gen_fp8(out):
    """fp8 GEMM numerics: the per-tensor e4m3 rounding of activations (exact ties at scale 1,
    and a random tensor with an outlier), and an fp8 linear layer y = round(x)·round(W)ᵀ + b
    computed in f64 from those roundings."""
    g = torch.Generator().manual_seed(13)
    t = {}
    # 448 makes the scale 1; then each of these lies exactly halfway between two e4m3 values
    # (or on one): 1.0625 → 1, 1.1875 → 1.25, 17 → 16, 19 → 20, 2^-10 → 0, 3·2^-10 → 2^-8
    t["fp8/ties"] = torch.tensor([448.0, 1.0625, 1.1875, -1.1875, 17.0, 19.0, -19.0, 2.0**-10,
                                  3 * 2.0**-10, -3 * 2.0**-10, 0.0, -0.0, 1.0, 0.3])
    t["fp8/ties_rounded"] = round_fp8(t["fp8/ties"])
    x = torch.randn(6, 64, generator=g) * 2.7
    x[0, 0] = 40.0
    w = torch.randn(32, 64, generator=g) * 0.05
    b = torch.randn(32, generator=g) * 0.1
    t["fp8/x"], t["fp8/w"], t["fp8/b"] = x, w, b
    t["fp8/x_rounded"] = round_fp8(x)
    t["fp8/linear"] = (round_fp8(x).double() @ round_fp8(w).double().T + b.double()).float()
    meta = {"seed": 13, "tolerance": "rounding bit-exact; linear abs=1e-5,rel=1e-5 (f32 GEMM)"}
    common.save(out, "fp8_gemm", t, meta)


def gen_quant(out):
    """One GGUF file with a (4, 512) tensor of every supported type (random blocks, scales from
    the ordinary to the edges: ±0, an f16 subnormal, 65504) and, beside it, gguf's numpy
    dequantization of each, which our decoding must equal bit for bit. Plus fp8: every byte of
    both formats as torch decodes it."""
    import os

    import numpy as np

    import quant_ref

    rng = np.random.default_rng(11)
    tensors, expected = [], {}
    for name in quant_ref.TYPES:
        for edge in (False, True):
            key = f"{name}{'_edge' if edge else ''}"
            if name in ("F32", "F16", "BF16"):
                if edge:
                    continue
                v = rng.standard_normal((4, 512)).astype(np.float32)
                v[0, :6] = [0.0, -0.0, 65504.0, 2.0**-24, -3.0e38 if name != "F16" else -1.0, 1e-30]
                raw, dec = quant_ref.encode(name, v)
            else:
                raw = quant_ref.random_blocks(name, 4, 512, rng, 0.01, edge=edge)
                dec = quant_ref.decode(name, raw)
            tensors.append((key, name, raw, (4, 512)))
            expected[key] = torch.from_numpy(dec.copy())
    path = os.path.join(out, "quant_blocks.gguf")
    quant_ref.write(path, tensors, kv={"general.name": "flux-rs dequantization golden"}, arch="flux")
    print(f"wrote {os.path.relpath(path)} ({len(tensors)} tensors, {os.path.getsize(path)} bytes)")
    every = torch.arange(256, dtype=torch.uint8)
    expected["fp8/bytes"] = every
    expected["fp8/e4m3"] = every.view(torch.float8_e4m3fn).float()
    expected["fp8/e5m2"] = every.view(torch.float8_e5m2).float()
    import gguf

    meta = {"gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "seed": 11,
            "tolerance": "bit-exact (NaN matches NaN)"}
    common.save(out, "quant_blocks", expected, meta)


if __name__ == "__main__":
    main()
