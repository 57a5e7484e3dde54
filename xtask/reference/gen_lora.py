"""Goldens for LoRA / LyCORIS adapters on the tiny dev transformer (flux-dit/tests/golden/dev_*).

One set of random factors is written in every layout users have (FLUX_TASKS §11.1): kohya
(dense fused and split-qkv block-sparse, alpha != rank, alpha 0), ComfyUI (lora_down and
lora_A), diffusers/PEFT (alpha keys, lora_adapter_metadata, none), OneTrainer, XLabs, LyCORIS
LoKr (factorised and full) and LoHa, DoRA (both axes), full .diff/.diff_b, fal Kontext,
DiffSynth and a BFL control LoRA (lora_B biases, replaced QK-norm scales, img_in widened to 2x
the input channels). For each file the expected merged BFL weights at strength 0.8 come from the
formulas below (FLUX_TASKS §11.2-11.5, restated here, not taken from any loader); for the
formats diffusers converts (PEFT, OneTrainer, XLabs, kohya; the parts they leave out are named
in the record) diffusers' own load_lora_weights + fuse_lora is run and must agree with them, and
its fused weights are what is stored. A forward output of the diffusers-fused model on
dev.safetensors' inputs is stored for the PEFT file with metadata (every module of it
cross-checked).

Usage: python gen_lora.py --out flux-dit/tests/golden
"""

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

import common
from gen_dit import to_bfl

M = 0.8  # strength of every single-file expectation
H, MLP, IN = 16, 64, 16  # tiny dev: hidden, MLP width, input channels
DEPTH, SINGLE = 2, 2
g = torch.Generator().manual_seed(11)


def rnd(*shape, s=0.5):
    return torch.randn(*shape, generator=g) * s


def bfl_linears(sd):
    return sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2)


# diffusers module -> (BFL layer, first row, rows, swap halves): spec §11.2
def diffusers_modules():
    out = {
        "x_embedder": ("img_in", 0, H, False),
        "context_embedder": ("txt_in", 0, H, False),
        "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, H, False),
        "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0, H, False),
        "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0, H, False),
        "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0, H, False),
        "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0, H, False),
        "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0, H, False),
        "proj_out": ("final_layer.linear", 0, IN, False),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, 2 * H, True),
    }
    for i in range(DEPTH):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for k, x in enumerate("qkv"):
            out[f"{b}.attn.to_{x}"] = (f"{d}.img_attn.qkv", k * H, H, False)
            out[f"{b}.attn.add_{x}_proj"] = (f"{d}.txt_attn.qkv", k * H, H, False)
        out[f"{b}.attn.to_out.0"] = (f"{d}.img_attn.proj", 0, H, False)
        out[f"{b}.attn.to_add_out"] = (f"{d}.txt_attn.proj", 0, H, False)
        out[f"{b}.ff.net.0.proj"] = (f"{d}.img_mlp.0", 0, MLP, False)
        out[f"{b}.ff.net.2"] = (f"{d}.img_mlp.2", 0, H, False)
        out[f"{b}.ff_context.net.0.proj"] = (f"{d}.txt_mlp.0", 0, MLP, False)
        out[f"{b}.ff_context.net.2"] = (f"{d}.txt_mlp.2", 0, H, False)
        out[f"{b}.norm1.linear"] = (f"{d}.img_mod.lin", 0, 6 * H, False)
        out[f"{b}.norm1_context.linear"] = (f"{d}.txt_mod.lin", 0, 6 * H, False)
    for j in range(SINGLE):
        b, s = f"single_transformer_blocks.{j}", f"single_blocks.{j}"
        for k, x in enumerate("qkv"):
            out[f"{b}.attn.to_{x}"] = (f"{s}.linear1", k * H, H, False)
        out[f"{b}.proj_mlp"] = (f"{s}.linear1", 3 * H, MLP, False)
        out[f"{b}.proj_out"] = (f"{s}.linear2", 0, H, False)
        out[f"{b}.norm.linear"] = (f"{s}.modulation.lin", 0, 3 * H, False)
    return out


class Expect:
    """The merged BFL state dict, built by the documented formulas."""

    def __init__(self, base):
        self.base = base
        self.sd = {k: v.clone().float() for k, v in base.items()}

    def add(self, layer, delta, row0=0, swap=False, bias=None, dora=None, scale=1.0, m=M):
        w = self.sd[f"{layer}.weight"]
        if delta.shape[1] > w.shape[1]:  # a control LoRA widens img_in: zero columns first
            w = torch.cat([w, torch.zeros(w.shape[0], delta.shape[1] - w.shape[1])], 1)
        if swap:
            w = torch.cat(w.chunk(2, 0)[::-1])
        rows = delta.shape[0]
        sub = w[row0 : row0 + rows]
        if dora is None:
            new = sub + m * scale * delta
        else:
            wc = sub + scale * delta
            if dora.shape == (rows, 1):
                norm = sub.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
            else:
                norm = wc.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps
            wc = wc * (dora / norm)
            new = sub + m * (wc - sub)
        w = torch.cat([w[:row0], new, w[row0 + rows :]])
        if swap:
            w = torch.cat(w.chunk(2, 0)[::-1])
        self.sd[f"{layer}.weight"] = w
        if bias is not None:
            b = self.sd[f"{layer}.bias"]
            if swap:
                b = torch.cat(b.chunk(2)[::-1])
            b = torch.cat([b[:row0], b[row0 : row0 + rows] + m * scale * bias, b[row0 + rows :]])
            if swap:
                b = torch.cat(b.chunk(2)[::-1])
            self.sd[f"{layer}.bias"] = b

    def changed(self):
        return {
            k: v
            for k, v in self.sd.items()
            if k not in self.base or v.shape != self.base[k].shape or not torch.equal(v, self.base[k].float())
        }


def under(name):
    return name.replace(".", "_")


def shape_of(base, layer):
    return tuple(base[f"{layer}.weight"].shape)


def lora_pair(out, inp, r):
    return rnd(r, inp), rnd(out, r)


# ---- the formats -------------------------------------------------------------------------------
def kohya(base, e, prefix="lora_unet_"):
    t = {}
    for layer in bfl_linears(base):
        out, inp = shape_of(base, layer)
        key = prefix + under(layer)
        if layer == "double_blocks.1.img_attn.qkv":
            # sd-scripts split_qkv: three rank-2 parts saved fused, up block-sparse, alpha as is
            downs = [rnd(2, inp) for _ in range(3)]
            ups = [rnd(H, 2) for _ in range(3)]
            down = torch.cat(downs)
            up = torch.block_diag(*ups)
            alpha = 2.0
        else:
            down, up = lora_pair(out, inp, 4)
            alpha = 0.0 if layer == "single_blocks.0.linear2" else 2.0
        t[f"{key}.lora_down.weight"] = down
        t[f"{key}.lora_up.weight"] = up
        t[f"{key}.alpha"] = torch.tensor(alpha)
        rank = down.shape[0]
        scale = 1.0 if alpha == 0 else alpha / rank  # sd-scripts: alpha 0 means alpha = rank
        e.add(layer, up @ down, scale=scale)
    return t


COMFY_LAYERS = [
    "img_in",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.0",
    "single_blocks.1.linear1",
    "final_layer.adaLN_modulation.1",
]


def comfy(base, e, naming):
    t = {}
    for layer in COMFY_LAYERS:
        out, inp = shape_of(base, layer)
        down, up = lora_pair(out, inp, 4)
        key = f"diffusion_model.{layer}"
        if naming == "down":
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
            t[f"{key}.alpha"] = torch.tensor(8.0)
            e.add(layer, up @ down, scale=2.0)
        else:
            t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = down, up
            e.add(layer, up @ down)
    return t


def peft(base, e, alphas, prefix="transformer.", modules=None):
    """diffusers names; `alphas`: 'keys' (…alpha tensors), a metadata dict, or None."""
    t = {}
    meta = None
    mods = diffusers_modules()
    names = modules or sorted(mods)
    for k, name in enumerate(names):
        layer, row0, rows, swap = mods[name]
        inp = shape_of(base, layer)[1]
        r = [2, 3, 4][k % 3] if alphas != "meta" else 4
        down, up = lora_pair(rows, inp, r)
        t[f"{prefix}{name}.lora_A.weight"] = down
        t[f"{prefix}{name}.lora_B.weight"] = up
        if alphas == "keys":
            a = float(k % 5 + 1)
            t[f"{prefix}{name}.alpha"] = torch.tensor(a)
            scale = a / r
        elif alphas == "meta":
            scale = (2.0 if name == "single_transformer_blocks.1.proj_out" else 8.0) / 4
        else:
            scale = 1.0
        e.add(layer, up @ down, row0=row0, swap=swap, scale=scale)
    if alphas == "meta":
        meta = {
            "r": 4,
            "lora_alpha": 8,
            "alpha_pattern": {"single_transformer_blocks.1.proj_out": 2},
            "target_modules": sorted(names),
        }
        # a pipeline's save_lora_weights prefixes each field with its component
        meta = {f"transformer.{k}": v for k, v in meta.items()}
    return t, meta


def onetrainer(base, e):
    t = {}
    mods = diffusers_modules()
    for k, name in enumerate(sorted(mods)):
        if k % 2:
            continue
        layer, row0, rows, swap = mods[name]
        inp = shape_of(base, layer)[1]
        down, up = lora_pair(rows, inp, 4)
        key = "lora_transformer_" + under(name)
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
        t[f"{key}.alpha"] = torch.tensor(3.0)
        e.add(layer, up @ down, row0=row0, swap=swap, scale=3.0 / 4)
    return t


def xlabs(base, e):
    t = {}
    for i in range(DEPTH):
        for x, layer in [
            ("qkv_lora1", "img_attn.qkv"),
            ("qkv_lora2", "txt_attn.qkv"),
            ("proj_lora1", "img_attn.proj"),
            ("proj_lora2", "txt_attn.proj"),
        ]:
            out, inp = shape_of(base, f"double_blocks.{i}.{layer}")
            down, up = lora_pair(out, inp, 4)
            t[f"double_blocks.{i}.processor.{x}.down.weight"] = down
            t[f"double_blocks.{i}.processor.{x}.up.weight"] = up
            e.add(f"double_blocks.{i}.{layer}", up @ down)
    for j in range(SINGLE):
        down, up = lora_pair(3 * H, H, 4)
        t[f"single_blocks.{j}.processor.qkv_lora.down.weight"] = down
        t[f"single_blocks.{j}.processor.qkv_lora.up.weight"] = up
        e.add(f"single_blocks.{j}.linear1", up @ down)
        down, up = lora_pair(H, H + MLP, 4)
        t[f"single_blocks.{j}.processor.proj_lora.down.weight"] = down
        t[f"single_blocks.{j}.processor.proj_lora.up.weight"] = up
        e.add(f"single_blocks.{j}.linear2", up @ down)
    return t


def lokr(base, e):
    t = {}
    mods = diffusers_modules()
    # factorised w2 with alpha: scale alpha / rank(w2)
    name = "transformer_blocks.0.attn.to_q"  # (16, 16) = kron((4, 4), (4, 4))
    layer, row0, rows, swap = mods[name]
    w1 = rnd(4, 4)
    w2a, w2b = rnd(4, 2), rnd(2, 4)
    key = "lycoris_" + under(name)
    t[f"{key}.lokr_w1"], t[f"{key}.lokr_w2_a"], t[f"{key}.lokr_w2_b"] = w1, w2a, w2b
    t[f"{key}.alpha"] = torch.tensor(1.0)
    e.add(layer, torch.kron(w1, w2a @ w2b), row0=row0, scale=1.0 / 2)
    # both factorised on the MLP (64, 16) = kron((8, 4), (8, 4))
    name = "transformer_blocks.1.ff.net.0.proj"
    layer, row0, rows, swap = mods[name]
    w1a, w1b, w2a, w2b = rnd(8, 2), rnd(2, 4), rnd(8, 3), rnd(3, 4)
    key = "lycoris_" + under(name)
    t.update({f"{key}.lokr_w1_a": w1a, f"{key}.lokr_w1_b": w1b, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b})
    t[f"{key}.alpha"] = torch.tensor(6.0)
    e.add(layer, torch.kron(w1a @ w1b, w2a @ w2b), row0=row0, scale=6.0 / 3)
    # both full: scale 1 (alpha ignored)
    name = "single_transformer_blocks.0.proj_out"  # (16, 80) = kron((2, 8), (8, 10))
    layer, row0, rows, swap = mods[name]
    w1, w2 = rnd(2, 8), rnd(8, 10)
    key = "lycoris_" + under(name)
    t[f"{key}.lokr_w1"], t[f"{key}.lokr_w2"] = w1, w2
    t[f"{key}.alpha"] = torch.tensor(4.0)
    e.add(layer, torch.kron(w1, w2), row0=row0, scale=1.0)
    return t


def loha(base, e):
    t = {}
    mods = diffusers_modules()
    for name in ["transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.1.proj_mlp", "norm_out.linear"]:
        layer, row0, rows, swap = mods[name]
        inp = shape_of(base, layer)[1]
        a1, b1, a2, b2 = rnd(rows, 3), rnd(3, inp), rnd(rows, 3), rnd(3, inp)
        key = "lycoris_" + under(name)
        t.update({f"{key}.hada_w1_a": a1, f"{key}.hada_w1_b": b1, f"{key}.hada_w2_a": a2, f"{key}.hada_w2_b": b2})
        t[f"{key}.alpha"] = torch.tensor(1.5)
        e.add(layer, (a1 @ b1) * (a2 @ b2), row0=row0, swap=swap, scale=1.5 / 3)
    return t


def dora(base, e):
    t = {}
    for layer, axis in [("double_blocks.0.img_mlp.0", "in"), ("single_blocks.1.linear2", "out")]:
        out, inp = shape_of(base, layer)
        down, up = lora_pair(out, inp, 4)
        w = base[f"{layer}.weight"].float()
        ds = (w.norm(dim=0, keepdim=True) if axis == "in" else w.norm(dim=1, keepdim=True)) * (1 + rnd(*(
            (1, inp) if axis == "in" else (out, 1)), s=0.1))
        key = "lora_unet_" + under(layer)
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
        t[f"{key}.alpha"] = torch.tensor(4.0)
        t[f"{key}.dora_scale"] = ds
        e.add(layer, up @ down, dora=ds, scale=1.0)
    return t


def diff(base, e):
    t = {}
    for layer in ["double_blocks.1.txt_attn.proj", "vector_in.in_layer"]:
        out, inp = shape_of(base, layer)
        d, db = rnd(out, inp, s=0.05), rnd(out, s=0.05)
        t[f"diffusion_model.{layer}.diff"], t[f"diffusion_model.{layer}.diff_b"] = d, db
        e.add(layer, d, bias=db)
    return t


def fal(base, e):
    t = {}
    for layer in ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.proj", "single_blocks.0.linear1"]:
        out, inp = shape_of(base, layer)
        down, up = lora_pair(out, inp, 4)
        t[f"base_model.model.{layer}.lora_A.weight"], t[f"base_model.model.{layer}.lora_B.weight"] = down, up
        e.add(layer, up @ down)
    return t


def bfl_control(base, e):
    t = {}
    for layer in bfl_linears(base):
        out, inp = shape_of(base, layer)
        if layer == "img_in":
            inp = 2 * IN
        down, up = lora_pair(out, inp, 4)
        b = rnd(out, s=0.1)
        t[f"{layer}.lora_A.weight"], t[f"{layer}.lora_B.weight"], t[f"{layer}.lora_B.bias"] = down, up, b
        e.add(layer, up @ down, bias=b)
    for k in sorted(base):
        if k.endswith("_norm.scale"):
            v = 1.0 + rnd(*base[k].shape, s=0.2)
            t[k] = v
            e.sd[k] = v.clone()  # replaced, not scaled by the strength
    return t


# ---- diffusers cross-check ---------------------------------------------------------------------
def diffusers_fused_pipe(model_dir, lora_sd, meta, tmp, text_encoder=None):
    """A FluxPipeline of the tiny transformer (and `text_encoder`) with `lora_sd` loaded by
    diffusers' load_lora_weights and fused at strength M, the LoRA layers then unloaded."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(model_dir).float().eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    path = os.path.join(tmp, "lora.safetensors")
    save_file({k: v.contiguous() for k, v in lora_sd.items()}, path, metadata=meta)
    pipe.load_lora_weights(path, adapter_name="x")
    components = ["transformer"] + (["text_encoder"] if text_encoder is not None else [])
    pipe.fuse_lora(lora_scale=M, components=components)
    pipe.unload_lora_weights()
    os.remove(path)
    return pipe


def diffusers_fused(model_dir, lora_sd, meta, tmp):
    pipe = diffusers_fused_pipe(model_dir, lora_sd, meta, tmp)
    return pipe.transformer, to_bfl(pipe.transformer.state_dict(), DEPTH, SINGLE)


def main():
    args = common.parse_args(__doc__)
    common.setup(0)
    out = os.path.join(args.out, "lora")
    os.makedirs(out, exist_ok=True)
    # the tiny dev model's committed goldens (gen_dit.py), whatever --out is
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "flux-dit", "tests", "golden")
    base = load_file(os.path.join(src, "dev_bfl.safetensors"))
    base = {k: v.float() for k, v in base.items()}
    model_dir = os.path.join(src, "dev_diffusers")
    tmp = os.path.join(out, ".tmp")
    os.makedirs(tmp, exist_ok=True)

    expected = {}
    record = {"strength": M, "formats": {}}
    formats = [
        ("kohya", lambda e: (kohya(base, e), None)),
        ("comfy_down", lambda e: (comfy(base, e, "down"), None)),
        ("comfy_ab", lambda e: (comfy(base, e, "ab"), None)),
        ("peft_alpha", lambda e: peft(base, e, "keys")),
        ("peft_meta", lambda e: peft(base, e, "meta")),
        ("peft_plain", lambda e: peft(base, e, None, modules=sorted(diffusers_modules())[::3])),
        ("diffsynth", lambda e: peft(base, e, None, prefix="", modules=sorted(diffusers_modules())[1::4])),
        ("onetrainer", lambda e: (onetrainer(base, e), None)),
        ("xlabs", lambda e: (xlabs(base, e), None)),
        ("lokr", lambda e: (lokr(base, e), None)),
        ("loha", lambda e: (loha(base, e), None)),
        ("dora", lambda e: (dora(base, e), None)),
        ("diff", lambda e: (diff(base, e), None)),
        ("fal", lambda e: (fal(base, e), None)),
        ("bfl_control", lambda e: (bfl_control(base, e), None)),
    ]
    # diffusers converts these. From the kohya file the cross-check leaves out: single-block
    # linear1 (its split hard-codes FLUX's 3072/12288 widths), the alpha-0 module (diffusers
    # scales it by 0; sd-scripts, which writes such files, by 1) and the embedders and last
    # layer (diffusers 0.42.1 converts them to keys without `transformer.`, then drops them).
    # (fal's converter hard-codes FLUX's 3072 width and every one of its layers: formulas only.)
    cross = {"kohya", "peft_alpha", "peft_meta", "peft_plain", "onetrainer", "xlabs"}
    inputs = load_file(os.path.join(src, "dev.safetensors"))
    for name, make in formats:
        e = Expect(base)
        sd, meta = make(e)
        meta_s = {"lora_adapter_metadata": json.dumps(meta)} if meta else None
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"{name}.safetensors"), metadata=meta_s)
        changed = e.changed()
        info = {"tensors": len(sd), "changed": len(changed), "source": "formulas (FLUX_TASKS §11)"}
        if name in cross:
            sub = dict(sd)
            skip = set()
            if name == "kohya":
                # kept: the blocks' modules but single-block linear1 and the alpha-0 module
                def kept(k):
                    return k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) and not (
                        "_linear1." in k or k.startswith("lora_unet_single_blocks_0_linear2.")
                    )

                sub = {k: v for k, v in sd.items() if kept(k)}
                skip = {f"{layer}.weight" for layer in bfl_linears(base) if not kept("lora_unet_" + under(layer) + ".")}
            if name == "onetrainer":
                # diffusers' OneTrainer converter maps only the blocks' attention modules (and the
                # top-level ones); a block's MLP, modulation or proj_mlp becomes a bare block key
                mods = diffusers_modules()

                def kept(stem):
                    return "blocks_" not in stem or "_attn_" in stem

                stems = {k.split(".")[0] for k in sd}
                sub = {k: v for k, v in sd.items() if kept(k.split(".")[0])}
                skip = {
                    f"{mods[n][0]}.weight"
                    for n in mods
                    if "lora_transformer_" + under(n) in stems and not kept("lora_transformer_" + under(n))
                }
            if name == "peft_alpha":
                # PEFT matches alpha patterns by dotted suffix and takes the first match, so the
                # top-level `proj_out`'s alpha also scales every single block's `proj_out`; the
                # file gives each its own alpha, which is what the formulas (and we) use.
                skip = {f"single_blocks.{j}.linear2.weight" for j in range(SINGLE)}
            model, fused = diffusers_fused(model_dir, sub, meta_s, tmp)
            worst = 0.0
            for k, v in changed.items():
                if k in skip:
                    continue
                d = (fused[k] - v).abs().max().item()
                if d > 1e-5:
                    ratio = ((fused[k] - base[k]).norm() / (v - base[k]).norm()).item()
                    print(f"  {name}: {k} differs by {d} (delta ratio {ratio})")
                worst = max(worst, d)
                changed[k] = fused[k].clone()  # diffusers' own numbers where it has them
            assert worst < 1e-5, f"{name}: diffusers fuse_lora differs from the formulas by {worst}"
            info["source"] = "diffusers load_lora_weights + fuse_lora" + (
                " but single-block linear2 (formulas: PEFT gives them the top-level proj_out's alpha)"
                if name == "peft_alpha"
                else " for attention and top-level modules (formulas for the blocks' others, which diffusers' "
                "OneTrainer converter mis-maps)"
                if name == "onetrainer"
                else " for the blocks' modules; formulas for single-block linear1, the alpha-0 module and the "
                "embedders/last layer, which diffusers 0.42.1 drops (their converted keys lack `transformer.`)"
                if skip
                else ""
            )
            info["diffusers_vs_formulas_max_abs"] = worst
            if name == "peft_meta":
                img_ids, txt_ids = inputs["input/img_ids"], inputs["input/txt_ids"]
                with torch.no_grad():
                    o = model(
                        hidden_states=inputs["input/img"],
                        encoder_hidden_states=inputs["input/txt"],
                        pooled_projections=inputs["input/y"],
                        timestep=inputs["input/timesteps"],
                        img_ids=img_ids,
                        txt_ids=txt_ids,
                        guidance=inputs["input/guidance"],
                        return_dict=False,
                    )[0]
                expected["forward/peft_meta"] = o
        for k, v in changed.items():
            expected[f"{name}/{k}"] = v
        record["formats"][name] = info
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    common.save(out, "expected", expected, record)


if __name__ == "__main__":
    main()
