"""Goldens for flux-dit and flux-kernels: tiny random FluxTransformer2DModel runs (diffusers),
per-module captures, the same weights in BFL's single-file layout (made by inverting diffusers'
converter and checked through that converter), and manifests of the real FLUX.1-dev/schnell
tensor names and shapes in both layouts (built on PyTorch's meta device: no memory, no download).

BFL's `rope` (src/flux/math.py, f32 angles at HEAD) is restated below for the f32-angle golden.

Usage: python gen_dit.py --out flux-dit/tests/golden
"""

import inspect
import json
import math
import os
import shutil

import torch

import common

TINY = dict(
    patch_size=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    axes_dims_rope=(2, 2, 4),
)
MODELS = {
    # name: constructor arguments, inputs
    "dev": dict(
        cfg=dict(TINY, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2, guidance_embeds=True),
        batch=2, grid=(3, 5), txt_len=7, timesteps=[1.0, 0.75], guidance=[3.5, 4.0], shards=True,
    ),
    "schnell": dict(
        cfg=dict(TINY, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1, guidance_embeds=False),
        batch=1, grid=(2, 4), txt_len=5, timesteps=[0.6], guidance=None, shards=False,
    ),
}


# ---- diffusers ↔ BFL key mapping (our inverse of diffusers' converter) -------------------------
def to_bfl(sd, num_layers, num_single):
    """diffusers state dict -> BFL state dict (spec §3.3, reversed)."""
    sd = dict(sd)
    out = {}

    def mv(dst, src):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")

    mv("img_in", "x_embedder")
    mv("txt_in", "context_embedder")
    mv("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    mv("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    mv("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    mv("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    mv("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    mv("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    for i in range(num_layers):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        mv(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        mv(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        for p in ("weight", "bias"):
            out[f"{d}.img_attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}.attn.to_{x}.{p}") for x in "qkv"])
            out[f"{d}.txt_attn.qkv.{p}"] = torch.cat([sd.pop(f"{b}.attn.add_{x}_proj.{p}") for x in "qkv"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd.pop(f"{b}.attn.norm_q.weight")
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd.pop(f"{b}.attn.norm_k.weight")
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{b}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{b}.attn.norm_added_k.weight")
        mv(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        mv(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
        mv(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        mv(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        mv(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        mv(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
    for j in range(num_single):
        b, s = f"single_transformer_blocks.{j}", f"single_blocks.{j}"
        mv(f"{s}.modulation.lin", f"{b}.norm.linear")
        for p in ("weight", "bias"):
            parts = [sd.pop(f"{b}.attn.to_{x}.{p}") for x in "qkv"] + [sd.pop(f"{b}.proj_mlp.{p}")]
            out[f"{s}.linear1.{p}"] = torch.cat(parts)
        mv(f"{s}.linear2", f"{b}.proj_out")
        out[f"{s}.norm.query_norm.scale"] = sd.pop(f"{b}.attn.norm_q.weight")
        out[f"{s}.norm.key_norm.scale"] = sd.pop(f"{b}.attn.norm_k.weight")
    mv("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    if sd:
        raise RuntimeError(f"unmapped diffusers keys: {sorted(sd)}")
    return out


def diffusers_converter(inner_dim):
    """diffusers' own convert_flux_transformer_checkpoint_to_diffusers. Its source hard-codes
    `inner_dim = 3072`; for tiny models we run that same source with the tiny width."""
    from diffusers.loaders import single_file_utils as sfu

    fn = sfu.convert_flux_transformer_checkpoint_to_diffusers
    if inner_dim == 3072:
        return fn, False
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1, "converter source changed; review the patch"
    src = src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    scope = dict(vars(sfu))
    exec(compile(src, sfu.__file__, "exec"), scope)
    return scope[fn.__name__], True


def check_through_converter(bfl_sd, diffusers_sd, inner_dim, compare_values):
    convert, patched = diffusers_converter(inner_dim)
    converted = convert({k: v for k, v in bfl_sd.items()})
    if sorted(converted) != sorted(diffusers_sd):
        missing = set(diffusers_sd) - set(converted)
        extra = set(converted) - set(diffusers_sd)
        raise RuntimeError(f"converter mismatch: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    for k, v in diffusers_sd.items():
        if converted[k].shape != v.shape:
            raise RuntimeError(f"converter shape mismatch at {k}: {converted[k].shape} vs {v.shape}")
        if compare_values and not torch.equal(converted[k], v):
            raise RuntimeError(f"converter value mismatch at {k}")
    return "diffusers convert_flux_transformer_checkpoint_to_diffusers" + (
        f" (its hard-coded inner_dim 3072 replaced by {inner_dim})" if patched else ""
    )


# ---- BFL rope, restated (f32 angles as at HEAD) ------------------------------------------------
def bfl_rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=pos.dtype, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos, omega)
    return torch.cos(out).float(), torch.sin(out).float()


def bfl_embed_nd(ids, axes_dim, theta):
    cs = [bfl_rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])]
    return torch.cat([c for c, _ in cs], dim=-1), torch.cat([s for _, s in cs], dim=-1)


def randomize(model, seed):
    """Every weight random and O(1)-scaled, norm scales around 1, so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1 and ("norm" in name and "linear" not in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_ids(grid, txt_len):
    gh, gw = grid
    img_ids = torch.zeros(gh, gw, 3)
    img_ids[..., 1] = torch.arange(gh)[:, None]
    img_ids[..., 2] = torch.arange(gw)[None, :]
    return img_ids.reshape(gh * gw, 3), torch.zeros(txt_len, 3)


def run_model(name, spec, out):
    from diffusers import FluxTransformer2DModel

    common.setup(0)
    cfg = spec["cfg"]
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, seed=1 if name == "dev" else 2)
    b, (gh, gw), lt = spec["batch"], spec["grid"], spec["txt_len"]
    g = torch.Generator().manual_seed(3)
    inp = {
        "img": torch.randn(b, gh * gw, cfg["in_channels"], generator=g),
        "txt": torch.randn(b, lt, cfg["joint_attention_dim"], generator=g),
        "y": torch.randn(b, cfg["pooled_projection_dim"], generator=g),
        "timesteps": torch.tensor(spec["timesteps"], dtype=torch.float32),
    }
    inp["img_ids"], inp["txt_ids"] = make_ids((gh, gw), lt)
    if spec["guidance"] is not None:
        inp["guidance"] = torch.tensor(spec["guidance"], dtype=torch.float32)

    captures = {}

    def hook(tag):
        def fn(module, args, kwargs, output):
            captures[tag] = (args, kwargs, output)

        return fn

    handles = [
        model.time_text_embed.register_forward_hook(hook("vec"), with_kwargs=True),
        model.pos_embed.register_forward_hook(hook("pe"), with_kwargs=True),
        model.transformer_blocks[0].register_forward_hook(hook("double0"), with_kwargs=True),
        model.single_transformer_blocks[0].register_forward_hook(hook("single0"), with_kwargs=True),
        model.norm_out.register_forward_hook(hook("norm_out"), with_kwargs=True),
    ]

    def call(m, dtype):
        return m(
            hidden_states=inp["img"].to(dtype),
            encoder_hidden_states=inp["txt"].to(dtype),
            pooled_projections=inp["y"].to(dtype),
            timestep=inp["timesteps"].to(dtype),
            img_ids=inp["img_ids"],
            txt_ids=inp["txt_ids"],
            guidance=inp.get("guidance"),
            return_dict=False,
        )[0]

    with torch.no_grad():
        out_f32 = call(model, torch.float32)
    for h in handles:
        h.remove()
    tensors = {f"input/{k}": v for k, v in inp.items()}
    tensors["output/f32"] = out_f32
    # per-module captures (f32)
    tensors["module/vec"] = captures["vec"][2]
    cos, sin = captures["pe"][2]
    tensors["module/pe_cos"] = cos[:, ::2].float()
    tensors["module/pe_sin"] = sin[:, ::2].float()
    a, kw, o = captures["double0"]
    tensors["module/double0_in_img"] = kw["hidden_states"]
    tensors["module/double0_in_txt"] = kw["encoder_hidden_states"]
    tensors["module/double0_out_txt"], tensors["module/double0_out_img"] = o
    a, kw, o = captures["single0"]
    tensors["module/single0_in"] = torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], dim=1)
    tensors["module/single0_out"] = torch.cat([o[0], o[1]], dim=1)
    a, kw, o = captures["norm_out"]
    tensors["module/last_in"] = a[0] if a else kw["hidden_states"]
    with torch.no_grad():
        tensors["module/last_out"] = model.proj_out(o)
    # bf16: weights and activations bf16, timesteps as a bf16 tensor (the pipeline's dtype).
    m16 = FluxTransformer2DModel(**cfg).eval()
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    with torch.no_grad():
        tensors["output/bf16"] = call(m16, torch.bfloat16)

    # weights: diffusers folder (sharded for dev), BFL single file checked through the converter
    folder = os.path.join(out, f"{name}_diffusers")
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, max_shard_size="60KB" if spec["shards"] else "100MB")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"])
    inner = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    checked = check_through_converter(bfl, sd, inner, compare_values=True)
    meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "layout": "bfl", "bfl_checked_through": checked, "seed": 1}
    common.save(out, f"{name}_bfl", bfl, meta)
    meta = {
        "config": meta["config"],
        "grid": [gh, gw],
        "rope_angles": "f64 (diffusers)",
        "tolerance": {"f32": "abs=1e-5,rel=1e-5", "bf16": "cosine>=0.999"},
        "seed": 3,
    }
    common.save(out, name, tensors, meta)
    return model


def gen_modules(out):
    """The timestep embedding (the shared ops have their own goldens in flux-kernels)."""
    from diffusers.models.embeddings import get_timestep_embedding

    common.setup(0)
    t = torch.tensor([0.0, 0.25, 0.75, 1.0, 3.5, 0.904530767], dtype=torch.float32)
    tensors = {"temb/t": t}
    tensors["temb/f32"] = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    t16 = t.to(torch.bfloat16) * 1000  # bf16 op, as in the transformer
    tensors["temb/bf16_scaled"] = t16.float()
    tensors["temb/bf16"] = get_timestep_embedding(t16, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    meta = {"tolerance": "abs=1e-4 (sinusoid), 2.5e-4 at t' = 3504"}
    common.save(out, "modules", tensors, meta)


def gen_manifests(out):
    """Names and shapes of the real transformers, both layouts, from the meta device."""
    from diffusers import FluxTransformer2DModel

    mdir = os.path.join(os.path.dirname(out.rstrip("/")), "manifests")
    os.makedirs(mdir, exist_ok=True)
    for name, guidance in [("dev", True), ("schnell", False)]:
        with torch.device("meta"):
            model = FluxTransformer2DModel(guidance_embeds=guidance)
        sd = dict(model.state_dict())
        bfl = to_bfl(sd, 19, 38)
        checked = check_through_converter(bfl, sd, 3072, compare_values=False)
        for layout, d in [("diffusers", sd), ("bfl", bfl)]:
            fields = {
                "model": f"FLUX.1-{name}",
                "layout": layout,
                "source": "diffusers FluxTransformer2DModel on the meta device"
                + ("" if layout == "diffusers" else f"; BFL names by our inverse mapping, checked through {checked}"),
            }
            common.write_manifest(mdir, f"{name}_{layout}", fields, d)


# Block linears of the quantized golden and the type of each: every GGUF block type at least
# once, larger layers in fewer bits (keeps the file small); top-level layers as city96 keeps
# them (F16/BF16/F32, some quantized as candle's tensor-tools does), 1-D tensors F32.
QUANT_TYPES = {
    "double_blocks.0.img_mod.lin": "Q2_K",
    "double_blocks.0.txt_mod.lin": "Q3_K",
    "double_blocks.0.img_attn.qkv": "Q8_0",
    "double_blocks.0.txt_attn.qkv": "Q5_K",
    "double_blocks.0.img_attn.proj": "BF16",
    "double_blocks.0.txt_attn.proj": "F16",
    "double_blocks.0.img_mlp.0": "Q6_K",
    "double_blocks.0.txt_mlp.0": "Q4_1",
    "double_blocks.0.img_mlp.2": "Q5_1",
    "double_blocks.0.txt_mlp.2": "Q2_K",
    "single_blocks.0.linear1": "Q4_K",
    "single_blocks.0.linear2": "Q5_0",
    "single_blocks.0.modulation.lin": "Q4_0",
    "img_in": "F16",
    "txt_in": "BF16",
    "vector_in.in_layer": "F32",
    "time_in.in_layer": "Q8_0",
    "time_in.out_layer": "Q4_K",
    "vector_in.out_layer": "Q4_0",
    "guidance_in.in_layer": "Q8_0",
    "guidance_in.out_layer": "Q6_K",
    "final_layer.linear": "BF16",
    "final_layer.adaLN_modulation.1": "Q5_K",
}


def gen_quant(out):
    """A FLUX-shaped transformer (heads of 128, so k-quants apply: width 256, 1 double + 1
    single block, dev) written as a city96-style GGUF with a different type per layer; the
    expected output is diffusers' FluxTransformer2DModel run on the weights as `gguf` decodes
    them (so a quantized path adds no error of its own). Also the same decoded weights as an
    fp8 (e4m3, ComfyUI scaled) safetensors with its own expected output."""
    import numpy as np

    import quant_ref
    from diffusers import FluxTransformer2DModel

    common.setup(0)
    cfg = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
               attention_head_dim=128, num_attention_heads=2, joint_attention_dim=32,
               pooled_projection_dim=32, axes_dims_rope=(16, 56, 56), guidance_embeds=True)
    model = FluxTransformer2DModel(**cfg).eval()
    randomize(model, seed=21)
    bfl = to_bfl({k: v.detach().clone() for k, v in model.state_dict().items()}, 1, 1)
    rng = np.random.default_rng(22)
    tensors, decoded = [], {}
    for k in sorted(bfl):
        v = bfl[k].float().numpy()
        stem = k.rsplit(".", 1)[0]
        tname = QUANT_TYPES.get(stem, "F32") if k.endswith(".weight") and v.ndim == 2 else "F32"
        if v.ndim == 1:
            v2 = v.reshape(1, -1)
        else:
            v2 = v
        raw, dec = quant_ref.encode(tname, v2, rng=rng, scale=float(np.abs(v2).mean()))
        tensors.append((k, tname, raw, list(v.shape)))
        decoded[k] = torch.from_numpy(dec.reshape(v.shape).copy())
    path = os.path.join(out, "quant_dev.gguf")
    quant_ref.write(path, tensors, arch="flux", kv={"general.quantization_version": 2, "general.file_type": 15})
    print(f"wrote {os.path.relpath(path)} ({len(tensors)} tensors, {os.path.getsize(path)} bytes)")
    # the reference model on the decoded weights: BFL -> diffusers through diffusers' converter
    convert, _ = diffusers_converter(256)
    sd = convert({k: v.clone() for k, v in decoded.items()})
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(23)
    b, (gh, gw), lt = 1, (2, 3), 4
    inp = {
        "img": torch.randn(b, gh * gw, 64, generator=g),
        "txt": torch.randn(b, lt, 32, generator=g),
        "y": torch.randn(b, 32, generator=g),
        "timesteps": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
    }
    inp["img_ids"], inp["txt_ids"] = make_ids((gh, gw), lt)

    def call():
        with torch.no_grad():
            return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"],
                         pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"],
                         txt_ids=inp["txt_ids"], guidance=inp["guidance"], return_dict=False)[0]

    t = {f"input/{k}": v for k, v in inp.items()}
    t["output/gguf"] = call()
    # fp8 on the tiny dev model (fp8 has no block constraint): every 2-D weight as e4m3 with a
    # per-tensor scale (ComfyUI's scaled fp8), the rest f32, keys prefixed as in all-in-one files
    tcfg = MODELS["dev"]["cfg"]
    tiny = FluxTransformer2DModel(**tcfg).eval()
    randomize(tiny, seed=1)
    tbfl = to_bfl({k: v.detach().clone() for k, v in tiny.state_dict().items()}, 2, 2)
    fp8, dec8 = {}, {}
    for k, v in tbfl.items():
        if v.ndim == 2:
            s = v.abs().max().clamp(min=1e-12) / 448.0
            q = (v / s).to(torch.float8_e4m3fn)
            fp8[k] = q
            fp8[k[: -len("weight")] + "scale_weight"] = s.reshape(())
            dec8[k] = q.float() * s
        else:
            fp8[k] = v
            dec8[k] = v
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    from safetensors.torch import save_file

    fp8_path = os.path.join(out, "tiny_dev_fp8.safetensors")
    save_file({("model.diffusion_model." + k): v.contiguous() for k, v in sorted(fp8.items())}, fp8_path)
    print(f"wrote {os.path.relpath(fp8_path)} ({len(fp8)} tensors, {os.path.getsize(fp8_path)} bytes)")
    tconvert, _ = diffusers_converter(16)
    tiny.load_state_dict(tconvert({k: v.clone() for k, v in dec8.items()}))
    with torch.no_grad():
        t["fp8/img"] = torch.randn(1, 6, tcfg["in_channels"], generator=g)
        t["fp8/txt"] = torch.randn(1, 3, tcfg["joint_attention_dim"], generator=g)
        t["fp8/y"] = torch.randn(1, tcfg["pooled_projection_dim"], generator=g)
        ii, ti = make_ids((2, 3), 3)
        t["fp8/img_ids"], t["fp8/txt_ids"] = ii, ti
        t["fp8/output"] = tiny(hidden_states=t["fp8/img"], encoder_hidden_states=t["fp8/txt"],
                               pooled_projections=t["fp8/y"], timestep=torch.tensor([0.5]), img_ids=ii,
                               txt_ids=ti, guidance=torch.tensor([4.0]), return_dict=False)[0]
    meta = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "types": QUANT_TYPES, "seed": 21,
            "fp8": "tiny dev model, e4m3fn, per-tensor scale_weight, model.diffusion_model. prefix, t=0.5, guidance 4",
            "tolerance": {"f32": "abs=1e-5,rel=1e-5"}}
    common.save(out, "quant_dev", t, meta)


def main():
    args = common.parse_args(__doc__)
    for name, spec in MODELS.items():
        run_model(name, spec, args.out)
    gen_modules(args.out)
    gen_manifests(args.out)
    gen_quant(args.out)


if __name__ == "__main__":
    main()
