"""Goldens for LoRAs on the CLIP text encoder (flux-text/tests/golden/clip_text_encoder).

Two files with CLIP modules on every linear layer of the tiny CLIPTextModel: kohya's
`lora_te1_text_model_encoder_layers_{i}_{module}` (lora_down/lora_up/alpha) and diffusers'
`text_encoder.text_model.encoder.layers.{i}.{module}.lora_A/B`, each with a transformer module
too (the files people have mix both). Expected: the CLIP weights after diffusers' own
load_lora_weights + fuse_lora at strength 0.8 (FluxPipeline with the tiny CLIP and the tiny
dev transformer of gen_dit.py), checked against the formula W + m * alpha/rank * up @ down.

Usage: python gen_lora_text.py --out flux-text/tests/golden
"""

import os

import torch
from safetensors.torch import load_file, save_file

import common
from gen_lora import M, diffusers_fused_pipe

g = torch.Generator().manual_seed(21)
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]


def rnd(*shape):
    return torch.randn(*shape, generator=g) * 0.5


def sd_key(sd, name):
    """transformers 5 names CLIPTextModel's tensors without `text_model.`."""
    return name if name in sd else name.removeprefix("text_model.")


def main():
    args = common.parse_args(__doc__)
    common.setup(0)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(here, "..", "..")
    clip_dir = os.path.join(root, "flux-text", "tests", "golden", "clip_text_encoder")
    dit_dir = os.path.join(root, "flux-dit", "tests", "golden", "dev_diffusers")
    from transformers import CLIPTextModel

    base = CLIPTextModel.from_pretrained(clip_dir).float().eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    n_layers = base.config.num_hidden_layers
    out_dir = os.path.join(args.out, "lora")
    os.makedirs(out_dir, exist_ok=True)
    expected = {}
    record = {"strength": M, "formats": {}}
    for fmt in ["kohya_te", "diffusers_te"]:
        sd, want = {}, {}
        for i in range(n_layers):
            for k, mod in enumerate(MODULES):
                name = f"text_model.encoder.layers.{i}.{mod}"
                w = base_sd[sd_key(base_sd, f"{name}.weight")]
                r = 2 + (i + k) % 2
                down, up = rnd(r, w.shape[1]), rnd(w.shape[0], r)
                if fmt == "kohya_te":
                    key = "lora_te1_" + name.replace(".", "_")
                    alpha = float(1 + k % 3)
                    sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                    sd[f"{key}.alpha"] = torch.tensor(alpha)
                    scale = alpha / r
                else:
                    key = f"text_encoder.{name}"
                    sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
                    scale = 1.0
                want[f"{name}.weight"] = w + M * scale * (up @ down)
        # one transformer module beside them (tiny dev: img_attn.qkv is (48, 16))
        if fmt == "kohya_te":
            k = "lora_unet_double_blocks_0_img_attn_qkv"
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = rnd(2, 16), rnd(48, 2)
            sd[f"{k}.alpha"] = torch.tensor(2.0)
        else:
            k = "transformer.transformer_blocks.0.attn.to_q"
            sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = rnd(2, 16), rnd(16, 2)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, f"{fmt}.safetensors"))
        clip = CLIPTextModel.from_pretrained(clip_dir).float().eval()
        pipe = diffusers_fused_pipe(dit_dir, sd, None, out_dir, text_encoder=clip)
        fused = clip.state_dict()
        worst = 0.0
        for k, v in want.items():
            f = fused[sd_key(fused, k)]
            worst = max(worst, (f - v).abs().max().item())
            expected[f"{fmt}/{k}"] = f.clone()
        assert worst < 1e-5, f"{fmt}: diffusers' fused CLIP differs from the formula by {worst}"
        record["formats"][fmt] = {
            "source": "diffusers load_lora_weights + fuse_lora (text_encoder)",
            "diffusers_vs_formula_max_abs": worst,
            "changed": len(want),
        }
        del pipe
    common.save(out_dir, "expected", expected, record)


if __name__ == "__main__":
    main()
