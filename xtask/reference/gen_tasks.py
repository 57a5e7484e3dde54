"""Goldens for flux-pipeline's image-conditioned tasks: diffusers' pipelines on the committed
tiny-dev model folder (`flux-pipeline/tests/golden/tiny-dev`, written by gen_pipeline.py; this
script only reads it, so the text-to-image goldens stay as they are).

- img2img: `FluxImg2ImgPipeline`, f32 on the CPU, init image `img2img_init.png` (a fixed 96×64
  RGB pattern, written here), 64×96 output (no resize), 6 steps, guidance 3.5, T5 length 512,
  generator `torch.Generator("cpu").manual_seed(42)` (the VAE posterior sample takes its first
  draw, the noise its second). Cases `img2img_s60` (strength 0.6) and `img2img_s100`
  (strength 1.0: pure noise, every step).
- inpainting: `FluxInpaintPipeline` (base model), the same init image, mask `inpaint_mask.png`
  (grey PNG: a white rectangle = repaint, with a 100/200 grey border to exercise the 0.5
  binarization), strength 0.8, 6 steps, seed 42. Case `inpaint`.
- Kontext: `FluxKontextPipeline` on the same tiny transformer (Kontext has dev's shapes), the
  init image as the picture to edit (`_auto_resize=False`, `max_area` = its area, so neither it
  nor the output is resized), 4 steps, guidance 2.5, seed 42. Case `kontext`.
- true CFG: `FluxPipeline` with `negative_prompt`, `true_cfg_scale=4.0`, 4 steps, 64×96,
  guidance 3.5 (the distilled guidance still goes to both passes), seed 42. Case `true_cfg`.

Usage: python gen_tasks.py --out flux-pipeline/tests/golden
"""

import os

import numpy as np
import torch
from PIL import Image

import common
from gen_pipeline import PROMPT, components

NEGATIVE = "blurry, low quality, watermark"


def init_image(path):
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255) // (w - 1), (y * 255) // (h - 1), ((x + y) * 7) % 256], axis=-1)
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    img.save(path)
    return img


def run(pipe, image, strength, steps, seed):
    h, w = image.height, image.width
    with torch.no_grad():
        out = pipe(prompt=[PROMPT], image=image, height=h, width=w, strength=strength,
                   num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=512,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                   return_dict=False)[0]
        lat = pipe._unpack_latents(out, h, w, pipe.vae_scale_factor)
        lat = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(lat, return_dict=False)[0]
    return out, decoded


def main():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxTransformer2DModel

    args = common.parse_args(__doc__)
    common.setup(0)
    folder = os.path.join(args.out, "tiny-dev")
    # the committed transformer and scheduler; text encoders, tokenizers and VAE built as
    # gen_pipeline.py builds them (the same files the folder links to)
    pipe = FluxImg2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval(),
        **components())
    image = init_image(os.path.join(args.out, "img2img_init.png"))
    t, cases = {}, {}
    for name, strength in [("img2img_s60", 0.6), ("img2img_s100", 1.0)]:
        t[f"{name}/latents_out"], t[f"{name}/image"] = run(pipe, image, strength, 6, 42)
        cases[name] = {"prompt": PROMPT, "height": image.height, "width": image.width, "steps": 6,
                       "guidance": 3.5, "max_sequence_length": 512, "seed": 42, "strength": strength,
                       "image": "img2img_init.png"}
    # inpainting with the base model
    from diffusers import FluxInpaintPipeline
    inp = FluxInpaintPipeline(scheduler=pipe.scheduler, transformer=pipe.transformer, **components())
    m = np.zeros((64, 96), np.uint8)
    m[8:40, 24:72] = 200
    m[16:32, 32:64] = 255
    m[8:40, 24:28] = 100
    mask = Image.fromarray(m, "L")
    mask.save(os.path.join(args.out, "inpaint_mask.png"))
    with torch.no_grad():
        h, w = image.height, image.width
        out = inp(prompt=[PROMPT], image=image, mask_image=mask, height=h, width=w, strength=0.8,
                  num_inference_steps=6, guidance_scale=3.5, max_sequence_length=512,
                  generator=torch.Generator("cpu").manual_seed(42), output_type="latent", return_dict=False)[0]
        lat = inp._unpack_latents(out, h, w, inp.vae_scale_factor)
        lat = (lat / inp.vae.config.scaling_factor) + inp.vae.config.shift_factor
        t["inpaint/latents_out"], t["inpaint/image"] = out, inp.vae.decode(lat, return_dict=False)[0]
    cases["inpaint"] = {"prompt": PROMPT, "height": h, "width": w, "steps": 6, "guidance": 3.5,
                        "max_sequence_length": 512, "seed": 42, "strength": 0.8, "image": "img2img_init.png",
                        "mask": "inpaint_mask.png"}
    # Kontext editing
    from diffusers import FluxKontextPipeline
    kon = FluxKontextPipeline(scheduler=pipe.scheduler, transformer=pipe.transformer, **components())
    with torch.no_grad():
        h, w = image.height, image.width
        out = kon(prompt=[PROMPT], image=image, height=h, width=w, max_area=h * w, _auto_resize=False,
                  num_inference_steps=4, guidance_scale=2.5, max_sequence_length=512,
                  generator=torch.Generator("cpu").manual_seed(42), output_type="latent", return_dict=False)[0]
        lat = kon._unpack_latents(out, h, w, kon.vae_scale_factor)
        lat = (lat / kon.vae.config.scaling_factor) + kon.vae.config.shift_factor
        t["kontext/latents_out"], t["kontext/image"] = out, kon.vae.decode(lat, return_dict=False)[0]
    cases["kontext"] = {"prompt": PROMPT, "height": h, "width": w, "steps": 4, "guidance": 2.5,
                        "max_sequence_length": 512, "seed": 42, "edit_image": "img2img_init.png"}
    # true CFG with a negative prompt, text-to-image
    from diffusers import FluxPipeline
    t2i = FluxPipeline(scheduler=pipe.scheduler, transformer=pipe.transformer, **components())
    with torch.no_grad():
        h, w = 64, 96
        out = t2i(prompt=[PROMPT], negative_prompt=[NEGATIVE], true_cfg_scale=4.0, height=h, width=w,
                  num_inference_steps=4, guidance_scale=3.5, max_sequence_length=512,
                  generator=torch.Generator("cpu").manual_seed(42), output_type="latent", return_dict=False)[0]
        lat = t2i._unpack_latents(out, h, w, t2i.vae_scale_factor)
        lat = (lat / t2i.vae.config.scaling_factor) + t2i.vae.config.shift_factor
        t["true_cfg/latents_out"], t["true_cfg/image"] = out, t2i.vae.decode(lat, return_dict=False)[0]
    cases["true_cfg"] = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "true_cfg": 4.0, "height": h, "width": w,
                         "steps": 4, "guidance": 3.5, "max_sequence_length": 512, "seed": 42}
    common.save(args.out, "tasks", t, {"cases": cases, "tolerance": "abs=1e-4"})


if __name__ == "__main__":
    main()
