"""Goldens and test data for flux-text.

1. The real tokenizer files, rebuilt from PyPI packages (no model hub here) and checked by sha256:
   - CLIP ViT-L/14 BPE from open-clip-torch 3.3.0 (MIT): vocab.json + merges.txt exactly as CLIP's
     SimpleTokenizer derives them (the layout of the FLUX repos' `tokenizer/` folder);
   - T5 v1.1 tokenizer.json (Apache-2.0 vocabulary) embedded in stable-diffusion-cpp-python 0.4.7
     (MIT wrapper), as the FLUX repos' `tokenizer_2/` hold it; and the same tokenizer re-saved by
     transformers (the form a user gets after `save_pretrained`).
2. Token ids from transformers' CLIPTokenizer and T5TokenizerFast (how diffusers tokenizes) for
   a list of prompts, at 77 (CLIP) and 256/512 (T5), with the untruncated lengths.
3. Tiny CLIPTextModel / T5EncoderModel (real vocab sizes) in the Hugging Face layouts, their
   outputs for real token ids, the T5 relative-position bucket table for L = 512, a full tiny
   CLIPModel file (vision keys to be ignored), and manifests of the real CLIP-L and T5-XXL
   encoders (meta device).

Usage: python gen_text.py --out flux-text/tests/golden
"""

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import torch

import common

CLIP_WHEEL = ("open-clip-torch", "3.3.0")
T5_SDIST = ("stable-diffusion-cpp-python", "0.4.7")
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
T5_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"

PROMPTS = [
    "",
    " ",
    "   \t  ",
    "\n",
    "a",
    "A photo of a cat wearing a tiny hat, 4k, highly detailed",
    "a forest with mist, sunlight through the trees, and the word FLUX painted on a sign",
    "Hello, world!!! ... ??? ;;; ---",
    "!!!!!!!!!!!!!!!!!!!!",
    "double  spaces   and    more",
    "tabs\tand\nnewlines\r\nmixed",
    "  leading and trailing spaces  ",
    "UPPER lower MiXeD",
    "numbers 1234567890 and 3.14159 and 1e-9",
    "café naïve résumé façade",
    "Ångström, Øresund, Straße",
    "日本語のプロンプト：富士山と桜",
    "中文提示词，一只猫",
    "한국어 프롬프트",
    "emoji 🐱🎩✨ and 👩‍👩‍👧",
    "مرحبا بالعالم",
    "שלום עולם",
    "Ελληνικά και Русский текст",
    "special <|endoftext|> in the middle",
    "<|startoftext|>starts like CLIP",
    "t5 end </s> in the middle",
    "x</s>",
    "<pad> and <unk> as text",
    "quotes \"double\" and 'single' and `back`",
    "it's they're we've I'm you'll he'd",
    "math: a+b=c, x^2, 50% off, $5 & more @home #tag",
    "url https://example.com/path?q=1",
    "hyphen-ated words and under_scores",
    "long " + "very " * 120 + "end",
    " ".join(f"word{i}" for i in range(300)),
    "A" * 200,
]


def fetch(tmp, name, version, sdist):
    python = sys.executable
    cmd = [python, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"{name}=={version}"]
    if sdist:
        cmd[5:5] = ["--no-binary", name]
    subprocess.run(cmd, check=True)
    norm = name.replace("-", "_")
    for f in os.listdir(tmp):
        if f.lower().startswith(norm.lower() + "-" + version):
            return os.path.join(tmp, f)
    raise RuntimeError(f"{name} {version} not downloaded")


def bytes_to_unicode():
    """CLIP's byte → printable-character table (SimpleTokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tokenizer_files(data):
    tmp = tempfile.mkdtemp()
    try:
        wheel = fetch(tmp, *CLIP_WHEEL, sdist=False)
        raw = gzip.decompress(zipfile.ZipFile(wheel).read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
        merges = raw.split("\n")[1 : 49152 - 256 - 2 + 1]
        merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
        assert hashlib.sha256(merges_txt.encode()).hexdigest() == MERGES_SHA256, "merges.txt sha256 differs"
        bu = bytes_to_unicode()
        vocab = bu + [v + "</w>" for v in bu] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        assert len(vocab) == 49408
        clip = os.path.join(data, "clip")
        os.makedirs(clip, exist_ok=True)
        with open(os.path.join(clip, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(clip, "merges.txt"), "w", encoding="utf-8") as f:
            f.write(merges_txt)
        sdist = fetch(tmp, *T5_SDIST, sdist=True)
        with tarfile.open(sdist) as t:
            member = next(n for n in t.getnames() if n.endswith("tokenizers/vocab/clip_t5.hpp"))
            src = t.extractfile(member).read().decode("utf-8", "replace")
        i = src.index("t5_tokenizer_json_str")
        body = src[src.index("{", i) + 1 : src.index("};", i)]
        t5 = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", body))
        assert hashlib.sha256(t5).hexdigest() == T5_SHA256, "T5 tokenizer.json sha256 differs"
        t5dir = os.path.join(data, "t5")
        os.makedirs(t5dir, exist_ok=True)
        with open(os.path.join(t5dir, "tokenizer.json"), "wb") as f:
            f.write(t5)
        # A tokenizer_config.json like the FLUX repos' tokenizer_2/ (for transformers to load the folder).
        cfg = {"eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512,
               "pad_token": "<pad>", "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
        with open(os.path.join(t5dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, sort_keys=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(data, "LICENSES.md"), "w") as f:
        f.write(
            "# Tokenizer data\n\n"
            "Rebuilt by `cargo xtask golden gen text` from PyPI packages and checked by sha256.\n\n"
            "- `clip/vocab.json`, `clip/merges.txt`: CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`) from\n"
            "  open-clip-torch 3.3.0, MIT licence (Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman,\n"
            "  Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong,\n"
            "  Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt), derived as CLIP's SimpleTokenizer does.\n"
            f"  merges.txt sha256 {MERGES_SHA256}.\n"
            "- `t5/tokenizer.json`: the T5 v1.1 SentencePiece vocabulary (Google, Apache-2.0) as embedded in\n"
            "  stable-diffusion-cpp-python 0.4.7 (MIT). sha256 " + T5_SHA256 + ".\n"
            "- `t5/tokenizer_config.json`: written by the generator so transformers can load the folder.\n"
            "- `t5_resaved/tokenizer.json`: the same tokenizer after transformers' `save_pretrained`.\n"
        )


def tokenizers(data, out):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_dir = os.path.join(data, "clip")
    merges = [tuple(l.split()) for l in open(os.path.join(clip_dir, "merges.txt"), encoding="utf-8").read().split("\n")[1:] if l]
    vocab = json.load(open(os.path.join(clip_dir, "vocab.json"), encoding="utf-8"))
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    t5 = T5TokenizerFast.from_pretrained(os.path.join(data, "t5"))
    resaved = os.path.join(data, "t5_resaved")
    shutil.rmtree(resaved, ignore_errors=True)
    t5.save_pretrained(resaved)
    for f in os.listdir(resaved):
        if f != "tokenizer.json":
            os.remove(os.path.join(resaved, f))
    t = {}

    def ids(tok, n):
        # as diffusers' _get_clip_prompt_embeds / _get_t5_prompt_embeds
        enc = tok(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        full = tok(PROMPTS, padding="longest", return_tensors="pt").input_ids
        lengths = [len(tok(p).input_ids) for p in PROMPTS]
        return enc.input_ids.to(torch.int64), torch.tensor(lengths, dtype=torch.int64), full.shape[1]

    t["clip/ids"], t["clip/untruncated_len"], _ = ids(clip, 77)
    for n in (256, 512):
        t[f"t5_{n}/ids"], t[f"t5_{n}/untruncated_len"], _ = ids(t5, n)
    t["t5_16/ids"], t["t5_16/untruncated_len"], _ = ids(t5, 16)
    meta = {"prompts": PROMPTS, "clip_max_length": 77, "tolerance": "exact",
            "how": "transformers CLIPTokenizer(vocab, merges) and T5TokenizerFast.from_pretrained(tokenizer_2-like folder), "
                   "padding='max_length', truncation=True, as diffusers' FluxPipeline"}
    common.save(out, "tokenizers", t, meta)
    return clip, t5


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name or "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


CLIP_TINY = dict(vocab_size=49408, hidden_size=8, intermediate_size=37, projection_dim=8, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2)
T5_TINY = dict(vocab_size=32128, d_model=8, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
               layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
               pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
MODEL_PROMPTS = [PROMPTS[5], PROMPTS[6], PROMPTS[14]]


def models(out, clip_tok, t5_tok):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Attention

    common.setup(0)
    t = {}
    # CLIP
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TINY)).eval()
    randomize(clip, 21)
    ids = clip_tok(MODEL_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t["clip/ids"] = ids
    with torch.no_grad():
        o = clip(input_ids=ids, output_hidden_states=False)
        t["clip/last_hidden_state"], t["clip/pooled"] = o.last_hidden_state, o.pooler_output
        c16 = CLIPTextModel(CLIPTextConfig(**CLIP_TINY)).eval()
        c16.load_state_dict(clip.state_dict())
        c16 = c16.to(torch.bfloat16)
        t["clip/pooled_bf16"] = c16(input_ids=ids).pooler_output
    folder = os.path.join(out, "clip_text_encoder")
    shutil.rmtree(folder, ignore_errors=True)
    clip.save_pretrained(folder)
    # The keys a full CLIPModel file adds to the text tower (vision tower, projections, logit
    # scale); the tests merge them with clip_text_encoder into a full-model file, whose extra
    # keys the CLIP loader must ignore. (Stored apart to avoid a second copy of the vocab.)
    full = CLIPModel(CLIPConfig(text_config=CLIP_TINY, vision_config=dict(hidden_size=8, intermediate_size=8,
                     num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4), projection_dim=8)).eval()
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("text_model.")}
    common.save(out, "clip_full_model_extra", sd, {"what": "non-text keys of a tiny transformers CLIPModel"})
    # T5
    cfg = T5Config(**T5_TINY)
    t5 = T5EncoderModel(cfg).eval()
    randomize(t5, 22)
    with torch.no_grad():
        for n in (16, 77, 256):
            ids = t5_tok(MODEL_PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
            t[f"t5_{n}/ids"] = ids
            t[f"t5_{n}/last_hidden_state"] = t5(input_ids=ids).last_hidden_state
        m16 = T5EncoderModel(cfg).eval()
        m16.load_state_dict(t5.state_dict())
        m16 = m16.to(torch.bfloat16)
        t["t5_77/last_hidden_state_bf16"] = m16(input_ids=t["t5_77/ids"]).last_hidden_state
    folder = os.path.join(out, "t5_text_encoder_2")
    shutil.rmtree(folder, ignore_errors=True)
    t5.save_pretrained(folder, max_shard_size="1MB")
    # relative position buckets for L = 512 (bidirectional, 32 buckets, max distance 128)
    pos = torch.arange(512)
    rel = pos[None, :] - pos[:, None]
    buckets = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    t["t5/buckets_512"] = buckets.to(torch.uint8)
    meta = {"clip_config": CLIP_TINY, "t5_config": T5_TINY, "prompts": MODEL_PROMPTS, "seed": [21, 22],
            "tolerance": {"f32": "abs=1e-5,rel=1e-5", "bf16": "see tests"}}
    common.save(out, "models", t, meta)


def manifests(out):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    mdir = os.path.join(os.path.dirname(out.rstrip("/")), "manifests")
    os.makedirs(mdir, exist_ok=True)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                            projection_dim=768))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    for name, model, desc in [("clip_l", clip, "CLIPTextModel (openai/clip-vit-large-patch14 text config)"),
                              ("t5_xxl", t5, "T5EncoderModel (google/t5-v1_1-xxl config)")]:
        common.write_manifest(mdir, name, {"model": desc, "source": "transformers on the meta device"}, model.state_dict())


# llama.cpp's `t5encoder` names (gguf-py's tensor map), per transformers name
def llama_t5_name(k):
    if k in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embd.weight"
    if k == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    parts = k.split(".")
    i, sub = parts[2], ".".join(parts[3:])
    return f"enc.blk.{i}." + {
        "layer.0.SelfAttention.q.weight": "attn_q.weight", "layer.0.SelfAttention.k.weight": "attn_k.weight",
        "layer.0.SelfAttention.v.weight": "attn_v.weight", "layer.0.SelfAttention.o.weight": "attn_o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "attn_rel_b.weight",
        "layer.0.layer_norm.weight": "attn_norm.weight", "layer.1.DenseReluDense.wi_0.weight": "ffn_gate.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn_up.weight", "layer.1.DenseReluDense.wo.weight": "ffn_down.weight",
        "layer.1.layer_norm.weight": "ffn_norm.weight"}[sub]


T5_QUANT = dict(T5_TINY, vocab_size=256, d_model=256, d_kv=64, num_heads=4, d_ff=256)
T5_QUANT_TYPES = {
    "token_embd.weight": "Q8_0", "enc.blk.0.attn_rel_b.weight": "F16",
    "enc.blk.0.attn_q.weight": "Q4_K", "enc.blk.0.attn_k.weight": "Q5_K", "enc.blk.0.attn_v.weight": "Q6_K",
    "enc.blk.0.attn_o.weight": "Q8_0", "enc.blk.0.ffn_gate.weight": "Q4_0", "enc.blk.0.ffn_up.weight": "Q5_0",
    "enc.blk.0.ffn_down.weight": "Q3_K", "enc.blk.1.attn_q.weight": "Q2_K", "enc.blk.1.attn_k.weight": "Q4_1",
    "enc.blk.1.attn_v.weight": "Q5_1", "enc.blk.1.attn_o.weight": "BF16", "enc.blk.1.ffn_gate.weight": "F16",
    "enc.blk.1.ffn_up.weight": "Q8_0", "enc.blk.1.ffn_down.weight": "Q4_K",
}


def gguf_t5(out):
    """A T5 encoder (width 256, so k-quants apply) as a llama.cpp-layout GGUF, as city96's T5
    files are (names, `t5encoder.*` metadata, F32 norms), with a different type per linear;
    expected = transformers' T5EncoderModel on the weights as `gguf` decodes them."""
    import numpy as np

    import quant_ref
    from transformers import T5Config, T5EncoderModel

    common.setup(0)
    cfg = T5Config(**T5_QUANT)
    t5 = T5EncoderModel(cfg).eval()
    randomize(t5, 23)
    rng = np.random.default_rng(24)
    tensors, decoded = [], {}
    sd = {k: v.detach().clone() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    for k in sorted(sd):
        v = sd[k].float().numpy()
        name = llama_t5_name(k)
        tname = T5_QUANT_TYPES.get(name, "F32")
        v2 = v.reshape(1, -1) if v.ndim == 1 else v
        raw, dec = quant_ref.encode(tname, v2, rng=rng, scale=float(np.abs(v2).mean()))
        tensors.append((name, tname, raw, list(v.shape)))
        decoded[k] = torch.from_numpy(dec.reshape(v.shape).copy())
    kv = {"t5encoder.context_length": 512, "t5encoder.embedding_length": 256,
          "t5encoder.feed_forward_length": 256, "t5encoder.block_count": 2, "t5encoder.attention.head_count": 4,
          "t5encoder.attention.key_length": 64, "t5encoder.attention.value_length": 64,
          "t5encoder.attention.relative_buckets_count": 32, "general.name": "T5 tiny (flux-rs golden)"}
    path = os.path.join(out, "t5_quant.gguf")
    quant_ref.write(path, tensors, kv=kv, arch="t5encoder")
    print(f"wrote {os.path.relpath(path)} ({len(tensors)} tensors, {os.path.getsize(path)} bytes)")
    decoded["encoder.embed_tokens.weight"] = decoded["shared.weight"]
    t5.load_state_dict(decoded)
    g = torch.Generator().manual_seed(25)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    ids[1, 10:] = 0  # padding, as the pipeline pads
    t = {"ids": ids}
    with torch.no_grad():
        t["last_hidden_state"] = t5(input_ids=ids).last_hidden_state
    meta = {"t5_config": T5_QUANT, "types": T5_QUANT_TYPES, "seed": 23, "tolerance": "abs=1e-5,rel=1e-5"}
    common.save(out, "t5_quant", t, meta)


def main():
    args = common.parse_args(__doc__)
    data = os.path.join(os.path.dirname(args.out.rstrip("/")), "data")
    make_tokenizer_files(data)
    clip_tok, t5_tok = tokenizers(data, args.out)
    models(args.out, clip_tok, t5_tok)
    manifests(args.out)
    gguf_t5(args.out)


if __name__ == "__main__":
    main()
