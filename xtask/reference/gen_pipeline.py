"""Goldens for flux-pipeline: diffusers' FluxPipeline end to end on tiny components.

The text encoders, tokenizers and VAE are the ones committed by the flux-text and flux-vae
goldens (run those generators first); the transformers are new tiny FluxTransformer2DModels with
64 input channels (the pipeline packs 16 latent channels into 64). The test model folders are
written in the diffusers layout; components shared with the other crates' goldens are relative
symbolic links instead of copies.

- tiny-dev/: a complete diffusers folder (model_index.json, scheduler with dynamic shifting,
  guidance-distilled transformer, ...). Case `dev`: 6 steps, 64×96, guidance 3.5, T5 length 512,
  batch 1, from given packed latents; case `dev_seed`: the same with diffusers drawing the noise
  from `torch.Generator("cpu").manual_seed(42)` in f32.
- tiny-schnell/: scheduler (no shift) and a transformer without guidance; its text encoders and
  VAE are tiny-dev's. Case `schnell`: 4 steps, 64×64, T5 length 256, batch 2, given latents.
- tiny-dev-bfl/: the dev transformer and the VAE as BFL single files (flux.safetensors,
  ae.safetensors), produced by the inverse mappings of gen_dit/gen_vae.

Usage: python gen_pipeline.py --out flux-pipeline/tests/golden
"""

import json
import os
import shutil

import numpy as np
import torch

import common
import gen_dit
import gen_vae

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = os.path.join(REPO, "flux-text", "tests")
VAE = os.path.join(REPO, "flux-vae", "tests", "golden", "tiny_diffusers")
COMMITTED = os.path.join(REPO, "flux-pipeline", "tests", "golden")

PROMPT = "A photo of a cat wearing a tiny hat, 4k, highly detailed"
PROMPTS_SCHNELL = [PROMPT, "a forest with mist, sunlight through the trees"]


def link(folder, name, target):
    """A relative symlink `folder/name` -> `target`, relative to where the folder is committed."""
    committed_folder = os.path.join(COMMITTED, os.path.basename(folder))
    rel = os.path.relpath(target, committed_folder)
    path = os.path.join(folder, name)
    if os.path.lexists(path):
        os.remove(path) if os.path.islink(path) else shutil.rmtree(path)
    os.symlink(rel, path)


def transformer(guidance, seed):
    from diffusers import FluxTransformer2DModel

    common.setup(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                               guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)).eval()
    gen_dit.randomize(m, seed)
    return m


def components():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    merges = [tuple(l.split()) for l in open(os.path.join(TEXT, "data/clip/merges.txt"), encoding="utf-8").read().split("\n")[1:] if l]
    vocab = json.load(open(os.path.join(TEXT, "data/clip/vocab.json"), encoding="utf-8"))
    return dict(
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(TEXT, "data/t5")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(TEXT, "golden/clip_text_encoder")).eval(),
        text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(TEXT, "golden/t5_text_encoder_2")).eval(),
        vae=AutoencoderKL.from_pretrained(VAE).eval(),
    )


def gen_dit_scheduler(dev):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dev:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FlowMatchEulerDiscreteScheduler()


def run(pipe, prompts, height, width, steps, guidance, max_len, latents=None, generator=None):
    with torch.no_grad():
        out = pipe(prompt=prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents, generator=generator, max_sequence_length=max_len, output_type="latent",
                   return_dict=False)[0]
        # the pipeline's own decode path, stopped before postprocess (pre-clamp f32)
        lat = pipe._unpack_latents(out, height, width, pipe.vae_scale_factor)
        lat = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(lat, return_dict=False)[0]
    return out, image


def write_folder(folder, pipe, with_text):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    pipe.transformer.save_pretrained(os.path.join(folder, "transformer"))
    pipe.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    index = {"_class_name": "FluxPipeline", "_diffusers_version": common.versions()["diffusers"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "FluxTransformer2DModel"]}
    if with_text:
        index.update({"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                      "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                      "vae": ["diffusers", "AutoencoderKL"]})
        link(folder, "text_encoder", os.path.join(TEXT, "golden/clip_text_encoder"))
        link(folder, "text_encoder_2", os.path.join(TEXT, "golden/t5_text_encoder_2"))
        link(folder, "tokenizer", os.path.join(TEXT, "data/clip"))
        link(folder, "tokenizer_2", os.path.join(TEXT, "data/t5"))
        link(folder, "vae", VAE)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    from diffusers import FluxPipeline

    args = common.parse_args(__doc__)
    os.makedirs(args.out, exist_ok=True)
    comp = components()
    t = {}
    # dev-like
    dev = FluxPipeline(scheduler=gen_dit_scheduler(True), transformer=transformer(True, 31), **comp)
    g = torch.Generator().manual_seed(32)
    h, w = 64, 96
    lat = torch.randn(1, (h // 16) * (w // 16), 64, generator=g)
    t["dev/latents_in"] = lat
    t["dev/latents_out"], t["dev/image"] = run(dev, [PROMPT], h, w, 6, 3.5, 512, latents=lat)
    t["dev_seed/latents_out"], t["dev_seed/image"] = run(dev, [PROMPT], h, w, 6, 3.5, 512,
                                                          generator=torch.Generator("cpu").manual_seed(42))
    write_folder(os.path.join(args.out, "tiny-dev"), dev, with_text=True)
    # schnell-like
    sch = FluxPipeline(scheduler=gen_dit_scheduler(False), transformer=transformer(False, 33), **comp)
    lat = torch.randn(2, 16, 64, generator=g)
    t["schnell/latents_in"] = lat
    t["schnell/latents_out"], t["schnell/image"] = run(sch, PROMPTS_SCHNELL, 64, 64, 4, 0.0, 256, latents=lat)
    write_folder(os.path.join(args.out, "tiny-schnell"), sch, with_text=False)
    # BFL single files of the dev transformer and the VAE
    bfl = os.path.join(args.out, "tiny-dev-bfl")
    os.makedirs(bfl, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in dev.transformer.state_dict().items()}
    common.save(bfl, "flux", gen_dit.to_bfl(sd, 1, 2), {"layout": "bfl", "what": "tiny-dev transformer"})
    vsd = {k: v.detach().clone() for k, v in dev.vae.state_dict().items()}
    common.save(bfl, "ae", gen_vae.to_bfl(vsd, 4), {"layout": "bfl", "what": "tiny VAE"})
    meta = {
        "cases": {
            "dev": {"prompt": PROMPT, "height": h, "width": w, "steps": 6, "guidance": 3.5, "max_sequence_length": 512},
            "dev_seed": {"prompt": PROMPT, "height": h, "width": w, "steps": 6, "guidance": 3.5, "max_sequence_length": 512,
                         "seed": 42, "noise": "torch.Generator('cpu').manual_seed(42), f32"},
            "schnell": {"prompts": PROMPTS_SCHNELL, "height": 64, "width": 64, "steps": 4, "guidance": 0.0,
                        "max_sequence_length": 256},
        },
        "tolerance": "abs=1e-4",
    }
    common.save(args.out, "pipeline", t, meta)


if __name__ == "__main__":
    main()
