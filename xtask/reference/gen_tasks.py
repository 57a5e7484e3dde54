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
- FLUX.1-Fill: `FluxFillPipeline` with a tiny Fill transformer (384 input channels: the packed
  latent, the masked picture's latent and the 8×8 mask; random weights, written to
  `tiny-fill/transformer`), the init image and the mask, strength 1, 4 steps, guidance 3.5
  (Fill's default 30 amplifies f32 rounding past the shared 1e-4 tolerance on random weights),
  seed 42. Case `fill`.
- true CFG: `FluxPipeline` with `negative_prompt`, `true_cfg_scale=4.0`, 4 steps, 64×96,
  guidance 3.5 (the distilled guidance still goes to both passes), seed 42. Case `true_cfg`.
- Canny: BFL's `CannyImageEncoder` on a few pictures (`canny_<name>.png`): the picture to
  [−1, 1] f32 and back to uint8 by truncation, as BFL does, then `cv2.Canny(img, 50, 200)` on the
  3-channel image; the edges are written as `canny_<name>_edges.png` (grey, 0/255).
- Resizing: PIL's `Image.resize` (LANCZOS and BICUBIC, up and down, both axes and one) of the
  test pictures, written as `resize/<picture>_<w>x<h>_<filter>.png`.
- FLUX.1-Canny/Depth: `FluxControlPipeline` with a tiny control transformer (128 input channels:
  the packed latent and the control picture's packed latent; random weights, written to
  `tiny-control/transformer`), the init image's Canny edges (3 channels) as the control image,
  4 steps, guidance 3.5, seed 42 (the control picture's posterior sample is the generator's
  first draw, the noise its second). Case `control`.

- FLUX.1-Redux: diffusers' `FluxPriorReduxPipeline` with a tiny `SiglipVisionModel` (hidden 32,
  2 layers, 4 heads, 28-pixel images in 14-pixel patches: 4 tokens; written to
  `tiny-redux/siglip`), transformers' PIL `SiglipImageProcessor` at 28×28 (BICUBIC, mean =
  std = 0.5) and a `ReduxImageEncoder(redux_dim=32, txt_in_features=8)` (written to
  `tiny-redux/redux.safetensors` with BFL's names), the tiny pipeline's own text encoders on
  the empty prompt (BFL's `flux redux`); its embeddings then go to `FluxPipeline`
  (`prompt_embeds`, `pooled_prompt_embeds`), 4 steps, guidance 2.5, seed 42. Case `redux`;
  also `redux/pixel_values`, `redux/siglip_hidden`, `redux/image_embeds`. Case `redux_mix`:
  the same picture with a prompt (image + prompt mixing).

- BFL's tools (`Reference::Bfl`), restated from BFL's `sampling.py`/`demo_st.py`/`prepare_fill`/
  `prepare_kontext` around the same tiny transformer and VAE (the transformer itself is proven
  equal to BFL's by the dit goldens), f32: noise from `get_noise` (a bf16 draw of the CPU
  generator), `get_schedule`, the posterior mean, BFL's Euler loop. `bfl_img2img`: strength
  0.8 with 5 steps (BFL's start index int((1 − s)·N) = 0, diffusers' would be 1);
  `bfl_fill`: the soft (not binarized) mask, T5 length 128 (BFL's fill CLI); `bfl_kontext`:
  the picture's tokens with ids (1, r, c), mu from the target's tokens.

- bf16: the diffusers cases of `BF16_CASES` again with the pipeline in bf16 (bf16 noise and
  posterior draws, as diffusers does), final latents as `<case>/bf16/latents_out`.

Usage: python gen_tasks.py --out flux-pipeline/tests/golden
"""

import os

import numpy as np
import torch
from PIL import Image

import common
from gen_pipeline import PROMPT, components

NEGATIVE = "blurry, low quality, watermark"
# cases also run in bf16 (final latents only, for a loose check)
BF16_CASES = ["img2img_s60", "inpaint", "kontext", "true_cfg", "fill", "control"]


def init_image(path):
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255) // (w - 1), (y * 255) // (h - 1), ((x + y) * 7) % 256], axis=-1)
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    img.save(path)
    return img


def run(pipe, case, images, embeds=None):
    """One case: the pipeline called with the case record's arguments (pictures by file name
    from `images`; `embeds`: given prompt and pooled embeddings instead of the prompt), stopped
    at the latents, then the pipeline's own decode (pre-clamp f32)."""
    h, w = case["height"], case["width"]
    text = dict(prompt=[case["prompt"]]) if embeds is None else \
        dict(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1])
    kw = dict(**text, height=h, width=w, num_inference_steps=case["steps"],
              guidance_scale=case["guidance"], max_sequence_length=case["max_sequence_length"],
              generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="latent",
              return_dict=False)
    if "strength" in case:
        kw["strength"] = case["strength"]
    for key, arg in [("image", "image"), ("mask", "mask_image"), ("edit_image", "image"),
                     ("control_image", "control_image")]:
        if key in case:
            kw[arg] = images[case[key]]
    if "edit_image" in case:  # Kontext: neither the picture nor the output resized
        kw.update(max_area=h * w, _auto_resize=False)
    if "negative_prompt" in case:
        kw.update(negative_prompt=[case["negative_prompt"]], true_cfg_scale=case["true_cfg"])
    with torch.no_grad():
        out = pipe(**kw)[0]
        lat = pipe._unpack_latents(out, h, w, pipe.vae_scale_factor)
        lat = (lat / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        return out, pipe.vae.decode(lat, return_dict=False)[0]


def canny_pictures(out):
    """Pictures for the Canny check: the init image's pattern, shapes with soft edges and noise,
    and smoothed noise (many weak edges for the hysteresis)."""
    rng = np.random.default_rng(7)
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    shapes = np.zeros((h, w, 3))
    shapes[((x - 30) ** 2 + (y - 30) ** 2) < 18 ** 2] = (220, 60, 40)
    shapes[(x > 50) & (x < 85) & (y > 10) & (y < 50)] += (20, 180, 90)
    shapes[np.abs((x - y) - 20) < 3] = (250, 250, 250)
    shapes += rng.normal(0, 12, shapes.shape)
    noise = rng.uniform(0, 255, (h // 4, w // 4, 3))
    noise = np.kron(noise, np.ones((4, 4, 1)))
    k = np.ones(5) / 5
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, noise)
    pics = {"shapes": shapes, "noise": noise}
    out_pics = {}
    for name, a in pics.items():
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
        img.save(os.path.join(out, f"canny_{name}.png"))
        out_pics[name] = img
    return out_pics


def bfl_canny(img):
    """BFL's CannyImageEncoder on a PIL picture: [−1, 1] f32, back to uint8 by truncation, then
    cv2.Canny(50, 200) on the 3-channel image; 0/255 edges (H, W)."""
    import cv2
    t = torch.from_numpy(np.array(img.convert("RGB"))).float() / 127.5 - 1.0
    t = torch.clamp(t, -1, 1)
    u8 = ((t + 1) * 127.5).numpy().astype(np.uint8)
    return cv2.Canny(u8, 50, 200)


def bfl_run(pipe, transformer, case, images):
    """BFL's sampling of one case (f32): `get_noise`, `get_schedule` (sliced at
    int((1 − strength)·N)), the posterior mean, `x = t·noise + (1 − t)·x0`, the Euler loop
    `img += (t_prev − t_curr)·pred`, then the decode; Fill's condition with the soft mask, and
    Kontext's picture tokens."""
    import math
    import gen_sampler
    h, w, n = case["height"], case["width"], case["steps"]
    vae = pipe.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    to_tensor = lambda img: torch.from_numpy(np.array(img.convert("RGB"))).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    encode = lambda x: (vae.encode(x).latent_dist.mean - shift) * scale
    pack = lambda z: pipe._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])
    with torch.no_grad():
        emb, pooled, text_ids = pipe.encode_prompt(prompt=[case["prompt"]], prompt_2=None,
                                                   max_sequence_length=case["max_sequence_length"])
        gen = torch.Generator("cpu").manual_seed(case["seed"])
        noise = torch.randn(1, 16, 2 * math.ceil(h / 16), 2 * math.ceil(w / 16), generator=gen,
                            dtype=torch.bfloat16).float()
        ts = gen_sampler.bfl_get_schedule(n, (h // 16) * (w // 16), shift=True)
        x = noise
        if "strength" in case and "mask" not in case:
            t_idx = int((1 - case["strength"]) * n)
            ts = ts[t_idx:]
            x0 = encode(to_tensor(images[case["image"]]))
            x = ts[0] * noise + (1.0 - ts[0]) * x0
        img = pack(x)
        img_ids = pipe._prepare_latent_image_ids(1, h // 16, w // 16, "cpu", torch.float32)
        extra, ids = None, img_ids
        if "mask" in case:  # prepare_fill: soft mask, f32 here
            mask = torch.from_numpy(np.array(images[case["mask"]].convert("L"))).float()[None, None] / 255.0
            cond = encode(to_tensor(images[case["image"]]) * (1 - mask))
            m = mask[:, 0]
            b_, hh, ww = m.shape
            m = m.reshape(b_, hh // 8, 8, ww // 8, 8).permute(0, 2, 4, 1, 3).reshape(b_, 64, hh // 8, ww // 8)
            m = m.reshape(b_, 64, hh // 16, 2, ww // 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(b_, (hh // 16) * (ww // 16), 256)
            extra = ("channels", torch.cat([pack(cond), m], dim=-1))
        if "edit_image" in case:  # prepare_kontext: the picture's tokens, ids (1, r, c)
            z = encode(to_tensor(images[case["edit_image"]]))
            cids = pipe._prepare_latent_image_ids(1, z.shape[2] // 2, z.shape[3] // 2, "cpu", torch.float32)
            cids[:, 0] = 1.0
            extra = ("tokens", pack(z))
            ids = torch.cat([img_ids, cids], dim=0)
        g = torch.full((1,), case["guidance"])
        for t_curr, t_prev in zip(ts[:-1], ts[1:]):
            inp = img
            if extra and extra[0] == "channels":
                inp = torch.cat([img, extra[1]], dim=-1)
            if extra and extra[0] == "tokens":
                inp = torch.cat([img, extra[1]], dim=1)
            pred = transformer(hidden_states=inp, timestep=torch.full((1,), t_curr), guidance=g,
                               pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=text_ids,
                               img_ids=ids, return_dict=False)[0][:, :img.shape[1]]
            img = img + (t_prev - t_curr) * pred
        lat = pipe._unpack_latents(img, h, w, pipe.vae_scale_factor)
        return img, vae.decode(lat / scale + shift, return_dict=False)[0]


def mask_image(path):
    m = np.zeros((64, 96), np.uint8)
    m[8:40, 24:72] = 200
    m[16:32, 32:64] = 255
    m[8:40, 24:28] = 100
    img = Image.fromarray(m, "L")
    img.save(path)
    return img


def main():
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline,
                           FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel)

    args = common.parse_args(__doc__)
    common.setup(0)
    folder = os.path.join(args.out, "tiny-dev")
    # the committed transformer and scheduler; text encoders, tokenizers and VAE built as
    # gen_pipeline.py builds them (the same files the folder links to)
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval(),
        **components())
    images = {"img2img_init.png": init_image(os.path.join(args.out, "img2img_init.png")),
              "inpaint_mask.png": mask_image(os.path.join(args.out, "inpaint_mask.png"))}
    base = {"prompt": PROMPT, "height": 64, "width": 96, "guidance": 3.5, "max_sequence_length": 512, "seed": 42}
    cases = {
        "img2img_s60": dict(base, steps=6, strength=0.6, image="img2img_init.png"),
        "img2img_s100": dict(base, steps=6, strength=1.0, image="img2img_init.png"),
        "inpaint": dict(base, steps=6, strength=0.8, image="img2img_init.png", mask="inpaint_mask.png"),
        "kontext": dict(base, steps=4, guidance=2.5, edit_image="img2img_init.png"),
        "true_cfg": dict(base, steps=4, negative_prompt=NEGATIVE, true_cfg=4.0),
    }
    # FLUX.1-Fill: a tiny 384-channel transformer, saved for the Rust side
    from diffusers import FluxFillPipeline
    import gen_dit
    common.setup(0)
    fill = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                  pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    gen_dit.randomize(fill, 37)
    fill.save_pretrained(os.path.join(args.out, "tiny-fill", "transformer"))
    cases["fill"] = dict(base, steps=4, strength=1.0, image="img2img_init.png", mask="inpaint_mask.png")
    # Canny: BFL's preprocessing and OpenCV's detector on a few pictures and the init image
    pictures = canny_pictures(args.out)
    pictures["init"] = images["img2img_init.png"]
    for name, img in pictures.items():
        Image.fromarray(bfl_canny(img), "L").save(os.path.join(args.out, f"canny_{name}_edges.png"))
    # PIL's resize, the one diffusers' processor, BFL's tools and SigLIP's processor use
    os.makedirs(os.path.join(args.out, "resize"), exist_ok=True)
    for name, w, h, f in [("init", 150, 100, "lanczos"), ("init", 40, 27, "lanczos"), ("shapes", 64, 96, "lanczos"),
                          ("shapes", 384, 384, "bicubic"), ("noise", 28, 28, "bicubic"), ("noise", 96, 30, "lanczos")]:
        flt = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}[f]
        pictures[name].resize((w, h), flt).save(os.path.join(args.out, "resize", f"{name}_{w}x{h}_{f}.png"))
    # FLUX.1-Canny/Depth: a tiny 128-channel transformer, the init image's edges as control
    from diffusers import FluxControlPipeline
    common.setup(0)
    control = FluxTransformer2DModel(patch_size=1, in_channels=128, out_channels=64, num_layers=1,
                                     num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                     joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=True,
                                     axes_dims_rope=(2, 2, 4)).eval()
    gen_dit.randomize(control, 41)
    control.save_pretrained(os.path.join(args.out, "tiny-control", "transformer"))
    edges = Image.open(os.path.join(args.out, "canny_init_edges.png")).convert("RGB")
    images["canny_init_edges.png"] = edges
    cases["control"] = dict(base, steps=4, control_image="canny_init_edges.png")
    t = {}
    # FLUX.1-Redux: a tiny SigLIP and Redux embedder; the prior pipeline's embeddings then
    # FluxPipeline
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    common.setup(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, image_size=28, patch_size=14)).eval()
    with torch.no_grad():
        for prm in siglip.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3)
    siglip.save_pretrained(os.path.join(args.out, "tiny-redux", "siglip"))
    embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=8).eval()
    with torch.no_grad():
        for prm in embedder.parameters():
            prm.copy_(torch.randn_like(prm) * 0.2)
    save_file({k: v.contiguous() for k, v in embedder.state_dict().items()},
              os.path.join(args.out, "tiny-redux", "redux.safetensors"))
    processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    prior = FluxPriorReduxPipeline(image_encoder=siglip, feature_extractor=processor, image_embedder=embedder,
                                   text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"])
    redux_pic = images["img2img_init.png"]
    with torch.no_grad():
        pixels = processor.preprocess(images=redux_pic, do_resize=True, return_tensors="pt",
                                      do_convert_rgb=True)["pixel_values"]
        hidden = siglip(pixel_values=pixels).last_hidden_state
        t["redux/pixel_values"], t["redux/siglip_hidden"] = pixels, hidden
        t["redux/image_embeds"] = embedder(hidden).image_embeds
    redux_runs = {}
    for name, prompt in [("redux", ""), ("redux_mix", PROMPT)]:
        with torch.no_grad():
            emb, pooled = prior(image=redux_pic, prompt=prompt, return_dict=False)
        redux_runs[name] = (emb, pooled)
        cases[name] = dict(base, prompt=prompt, steps=4, guidance=2.5, redux_image="img2img_init.png")
    pipes = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline, "kontext": FluxKontextPipeline,
             "true_cfg": FluxPipeline}
    bf16_jobs = []
    for name, case in cases.items():
        kind = "inpaint" if "mask" in case else "kontext" if "edit_image" in case else \
            "true_cfg" if "negative_prompt" in case else "img2img"
        if name == "fill":
            pipe = FluxFillPipeline(**dict(parts, transformer=fill))
        elif name == "control":
            pipe = FluxControlPipeline(**dict(parts, transformer=control))
        else:
            pipe = pipes[kind](**parts)
        if name.startswith("redux"):
            pipe = FluxPipeline(**parts)
            t[f"{name}/latents_out"], t[f"{name}/image"] = run(pipe, case, images, redux_runs[name])
            continue
        t[f"{name}/latents_out"], t[f"{name}/image"] = run(pipe, case, images)
        if name in BF16_CASES:
            bf16_jobs.append((name, pipe, case))
    # BFL's tools restated (Reference::Bfl)
    bfl_cases = {
        "bfl_img2img": dict(base, steps=5, strength=0.8, image="img2img_init.png", reference="bfl"),
        "bfl_fill": dict(base, steps=4, strength=1.0, max_sequence_length=128, image="img2img_init.png",
                         mask="inpaint_mask.png", reference="bfl"),
        "bfl_kontext": dict(base, steps=4, guidance=2.5, edit_image="img2img_init.png", reference="bfl"),
    }
    for name, case in bfl_cases.items():
        model = fill if name == "bfl_fill" else parts["transformer"]
        pipe = FluxPipeline(**parts)
        t[f"{name}/latents_out"], t[f"{name}/image"] = bfl_run(pipe, model, case, images)
        cases[name] = case
    # last, as it casts the shared modules: the same pipelines in bf16 (bf16 noise and posterior
    # draws, as diffusers does)
    for name, pipe, case in bf16_jobs:
        pipe.to(torch.bfloat16)
        t[f"{name}/bf16/latents_out"] = run(pipe, case, images)[0].float()
    common.save(args.out, "tasks", t, {"cases": cases, "tolerance": "abs=1e-4"})


if __name__ == "__main__":
    main()
