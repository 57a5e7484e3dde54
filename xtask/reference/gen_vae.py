"""Goldens for flux-vae: a tiny AutoencoderKL with the FLUX block structure (diffusers), per-block
captures, the same weights in BFL's `ae.safetensors` layout (made by inverting diffusers'
`convert_ldm_vae_checkpoint` and checked through it), and manifests of the real FLUX VAE's
tensor names and shapes in both layouts (meta device).

Usage: python gen_vae.py --out flux-vae/tests/golden
"""

import json
import math
import os
import shutil

import torch

import common

FLUX_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
TINY_CONFIG = dict(FLUX_CONFIG, block_out_channels=(4, 8, 8, 8), norm_num_groups=2, sample_size=64)


def to_bfl(sd, levels):
    """diffusers AutoencoderKL state dict -> BFL ae.safetensors names (spec §4.5, reversed)."""
    out = {}
    for k, v in sd.items():
        side, rest = k.split(".", 1)
        r = rest.replace("conv_shortcut", "nin_shortcut")
        if r.startswith("conv_norm_out."):
            r = "norm_out." + r[len("conv_norm_out."):]
        elif r.startswith("mid_block.resnets.0."):
            r = "mid.block_1." + r[len("mid_block.resnets.0."):]
        elif r.startswith("mid_block.resnets.1."):
            r = "mid.block_2." + r[len("mid_block.resnets.1."):]
        elif r.startswith("mid_block.attentions.0."):
            name, param = r[len("mid_block.attentions.0."):].rsplit(".", 1)
            new = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[name]
            r = f"mid.attn_1.{new}.{param}"
            if new != "norm" and param == "weight":
                v = v.reshape(*v.shape, 1, 1)
        elif r.startswith("down_blocks."):
            l, x = r[len("down_blocks."):].split(".", 1)
            x = x.replace("resnets.", "block.", 1).replace("downsamplers.0.", "downsample.", 1)
            r = f"down.{l}.{x}"
        elif r.startswith("up_blocks."):
            u, x = r[len("up_blocks."):].split(".", 1)
            x = x.replace("resnets.", "block.", 1).replace("upsamplers.0.", "upsample.", 1)
            r = f"up.{levels - 1 - int(u)}.{x}"
        out[f"{side}.{r}"] = v
    return out


def check_through_converter(bfl, sd, config, compare_values):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    conv = convert_ldm_vae_checkpoint(dict(bfl), cfg)
    if sorted(conv) != sorted(sd):
        raise RuntimeError(f"converter keys differ: missing {sorted(set(sd) - set(conv))[:5]}, extra {sorted(set(conv) - set(sd))[:5]}")
    for k, v in sd.items():
        if tuple(conv[k].shape) != tuple(v.shape):
            raise RuntimeError(f"converter shape differs at {k}: {tuple(conv[k].shape)} vs {tuple(v.shape)}")
        if compare_values and not torch.equal(conv[k], v):
            raise RuntimeError(f"converter value differs at {k}")
    return "diffusers convert_ldm_vae_checkpoint (unchanged)"


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def gen_tiny(out):
    from diffusers import AutoencoderKL

    common.setup(0)
    vae = AutoencoderKL(**TINY_CONFIG).eval()
    randomize(vae, 11)
    sc, sh = TINY_CONFIG["scaling_factor"], TINY_CONFIG["shift_factor"]
    g = torch.Generator().manual_seed(12)
    t = {}
    t["input/image_64"] = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    t["input/image_48x80"] = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1
    t["input/latent_8"] = torch.randn(2, 16, 8, 8, generator=g)
    t["input/latent_6x10"] = torch.randn(1, 16, 6, 10, generator=g)
    caps = {}

    def hook(tag):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            caps[tag] = (x.detach().clone(), output.detach().clone())

        return fn

    mods = {
        "resnet_shortcut": vae.encoder.down_blocks[1].resnets[0],
        "resnet_plain": vae.encoder.down_blocks[1].resnets[1],
        "mid_attention": vae.encoder.mid_block.attentions[0],
        "downsample": vae.encoder.down_blocks[0].downsamplers[0],
        "upsample": vae.decoder.up_blocks[0].upsamplers[0],
    }
    # per-block captures on a small image and latent, to keep the golden small
    t["input/block_image"] = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    t["input/block_latent"] = torch.randn(1, 16, 4, 4, generator=g)
    handles = [m.register_forward_hook(hook(k), with_kwargs=True) for k, m in mods.items()]
    with torch.no_grad():
        vae.encoder(t["input/block_image"])
        vae.decoder(t["input/block_latent"])
    for h in handles:
        h.remove()
    with torch.no_grad():
        for size in ["64", "48x80"]:
            x = t[f"input/image_{size}"]
            t[f"encode/{size}/moments"] = vae.encoder(x)
            dist = vae.encode(x).latent_dist
            t[f"encode/{size}/latent"] = (dist.mode() - sh) * sc
        for size in ["8", "6x10"]:
            z = t[f"input/latent_{size}"]
            t[f"decode/{size}"] = vae.decode(z / sc + sh).sample
    for k, (x, y) in caps.items():
        t[f"block/{k}/in"], t[f"block/{k}/out"] = x, y
    vae16 = AutoencoderKL(**TINY_CONFIG).eval()
    vae16.load_state_dict(vae.state_dict())
    vae16 = vae16.to(torch.bfloat16)
    with torch.no_grad():
        z = t["input/latent_8"].to(torch.bfloat16)
        t["decode/8/bf16"] = vae16.decode(z / sc + sh).sample
    folder = os.path.join(out, "tiny_diffusers")
    shutil.rmtree(folder, ignore_errors=True)
    vae.save_pretrained(folder)
    sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    bfl = to_bfl(sd, 4)
    checked = check_through_converter(bfl, sd, TINY_CONFIG, compare_values=True)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CONFIG.items()}
    common.save(out, "tiny_bfl", bfl, {"config": cfg, "layout": "bfl", "bfl_checked_through": checked, "seed": 11})
    meta = {"config": cfg, "seed": 12, "tolerance": {"f32": "abs=1e-5,rel=1e-5", "bf16": "see tests"},
            "blocks": {k: str(type(m).__name__) for k, m in mods.items()}}
    common.save(out, "tiny", t, meta)


def gen_manifests(out):
    from diffusers import AutoencoderKL

    mdir = os.path.join(os.path.dirname(out.rstrip("/")), "manifests")
    os.makedirs(mdir, exist_ok=True)
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_CONFIG)
    sd = dict(vae.state_dict())
    bfl = to_bfl(sd, 4)
    checked = check_through_converter(bfl, sd, FLUX_CONFIG, compare_values=False)
    for layout, d in [("diffusers", sd), ("bfl", bfl)]:
        fields = {
            "model": "FLUX.1 autoencoder",
            "layout": layout,
            "source": "diffusers AutoencoderKL with the FLUX config on the meta device"
            + ("" if layout == "diffusers" else f"; BFL names by our inverse mapping, checked through {checked}"),
        }
        common.write_manifest(mdir, f"ae_{layout}", fields, d)


def main():
    args = common.parse_args(__doc__)
    gen_tiny(args.out)
    gen_manifests(args.out)


if __name__ == "__main__":
    main()
