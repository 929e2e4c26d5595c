"""The ModernBERT LDM's bare model.safetensors (resized for chat tokens) loads into hf_mlm.

A tiny base ModernBERT folder (config, weights, tokenizer) stands in for
answerdotai/ModernBERT-large; the "release" is a state dict of the same model resized by two
added tokens, saved without config.json as the LDM's training scripts do (decoder weight tied,
one name kept). Logits of the converted module are compared with a ModernBERT forward written
here from its description (embedding LayerNorm, pre-norm blocks with no norm before layer 0's
attention, packed Wqkv, rotary with the global/local thetas, GeGLU-style Wi split with GELU,
head dense -> GELU -> LayerNorm, tied decoder with bias; biases and LayerNorm biases off).
Negative twin: q and k exchanged inside Wqkv.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.formats import FormatError, detect_format, load_checkpoint

C, N, H, HID = 16, 2, 2, 24
D = C // H


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(base folder, tokenizer folder with two added chat tokens, vocab sizes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("modernbert_base")
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bpe.train_from_iterator(
        ["a tiny corpus of words"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=specials)
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    tok.save_pretrained(folder)
    config = transformers.ModernBertConfig(
        vocab_size=len(tok), hidden_size=C, intermediate_size=HID, num_hidden_layers=N,
        num_attention_heads=H, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(config).save_pretrained(folder)
    chat = tmp_path_factory.mktemp("ldm_tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.save_pretrained(chat)
    return folder, chat, len(tok), tok.mask_token_id


def ldm_params(V: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    p = {
        "model.embeddings.tok_embeddings.weight": r(V, C),
        "model.embeddings.norm.weight": 1 + r(C),
    }
    for i in range(N):
        b = f"model.layers.{i}."
        if i > 0:
            p[b + "attn_norm.weight"] = 1 + r(C)
        p |= {b + "attn.Wqkv.weight": r(3 * C, C), b + "attn.Wo.weight": r(C, C)}
        p |= {
            b + "mlp_norm.weight": 1 + r(C),
            b + "mlp.Wi.weight": r(2 * HID, C),
            b + "mlp.Wo.weight": r(C, HID),
        }
    p |= {
        "model.final_norm.weight": 1 + r(C),
        "head.dense.weight": r(C, C),
        "head.norm.weight": 1 + r(C),
    }
    p["decoder.bias"] = r(V)
    return p


def reference_logits(p, x):
    p = {k: v.double() for k, v in p.items()}
    B, L = x.shape

    def ln(h, name):
        return F.layer_norm(h, (C,), p[name], None, 1e-5)

    def rope(t, theta):  # (B, H, L, D)
        inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-b, a], -1) * sin

    h = ln(p["model.embeddings.tok_embeddings.weight"][x], "model.embeddings.norm.weight")
    for i in range(N):
        b = f"model.layers.{i}."
        theta = 160000.0 if i % 3 == 0 else 10000.0  # every third layer global (0, 3, ...)
        a = h if i == 0 else ln(h, b + "attn_norm.weight")
        qkv = (a @ p[b + "attn.Wqkv.weight"].T).view(B, L, 3, H, D)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        q, k = rope(q, theta), rope(k, theta)  # L < the local window: local = global attention
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D)).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(B, L, C) @ p[b + "attn.Wo.weight"].T
        inp, gate = (ln(h, b + "mlp_norm.weight") @ p[b + "mlp.Wi.weight"].T).chunk(2, -1)
        h = h + (F.gelu(inp) * gate) @ p[b + "mlp.Wo.weight"].T
    h = ln(h, "model.final_norm.weight")
    h = ln(F.gelu(h @ p["head.dense.weight"].T), "head.norm.weight")
    return h @ p["model.embeddings.tok_embeddings.weight"].T + p["decoder.bias"]


def converted_logits(ckpt, x, V, mask):
    from diffusion.build import build_module

    class Vocab:
        vocab_size, mask_id = V, mask

    module = build_module(OmegaConf.create(ckpt["unmask_config"]), Vocab())
    module.load_state_dict(ckpt["state_dict"], strict=True)
    with torch.no_grad():
        return module.eval_backbone.eval()(x, None, None).double()


def write(folder: Path, params) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(folder / "model.safetensors"))
    return folder


def test_modernbert_ldm_parity_and_errors(base, tmp_path):
    base_dir, tok_dir, V, mask = base
    p = ldm_params(V)
    folder = write(tmp_path / "final_model", p)
    assert detect_format(folder) == "modernbert_ldm"
    ov = [f"backbone.pretrained={base_dir}", f"data.tokenizer={tok_dir}"]
    ckpt = load_checkpoint(str(folder), overrides=ov)
    assert ckpt["unmask_config"]["data"]["tokenizer"] == str(tok_dir)
    x = torch.tensor([[2, 7, mask, 9, mask, V - 1, 3, 0], [mask] * 8])
    want = reference_logits(p, x)
    torch.testing.assert_close(converted_logits(ckpt, x, V, mask), want, atol=1e-5, rtol=1e-5)
    qk = dict(p)
    for i in range(N):
        w = p[f"model.layers.{i}.attn.Wqkv.weight"]
        qk[f"model.layers.{i}.attn.Wqkv.weight"] = torch.cat([w[C : 2 * C], w[:C], w[2 * C :]])
    bad = load_checkpoint(str(write(tmp_path / "twin", qk)), overrides=ov)
    assert not torch.allclose(converted_logits(bad, x, V, mask), want, atol=1e-5, rtol=1e-5)
    missing = dict(p)
    del missing["model.layers.1.attn_norm.weight"]
    with pytest.raises(FormatError, match=r"model\.layers\.1\.attn_norm\.weight.*missing"):
        load_checkpoint(str(write(tmp_path / "m", missing)), "modernbert_ldm", overrides=ov)
    extra = dict(p, **{"model.layers.0.attn_norm.weight": torch.ones(C)})
    with pytest.raises(FormatError, match=r"unexpected.*layers\.0\.attn_norm"):
        load_checkpoint(str(write(tmp_path / "e", extra)), "modernbert_ldm", overrides=ov)
    wrong = dict(p, **{"head.dense.weight": torch.zeros(C, C + 1)})
    with pytest.raises(FormatError, match=r"head\.dense\.weight.*shape"):
        load_checkpoint(str(write(tmp_path / "s", wrong)), "modernbert_ldm", overrides=ov)
    cut = write(tmp_path / "cut", p) / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(FormatError, match="truncated"):
        load_checkpoint(str(cut.parent), "modernbert_ldm", overrides=ov)


def test_ldm_tokenizer_chat_tokens_get_the_release_ids(base, tmp_path):
    """No tokenizer files beside the weights: the converter rebuilds the LDM's tokenizer from
    the base (its tokenizer.py appends <BOS> <EOS> <START_ID> <END_ID> <EOT_ID> in that order,
    pad = <EOS>, [MASK] the base's), checked against the embedding's rows. The chat template
    gives <BOS><START_ID>user<END_ID>\\n...<EOT_ID><START_ID>assistant<END_ID>\\n...<EOS>.
    Tokenizer files saved beside the weights are read instead; a row count that fits neither
    is an error naming both sizes."""
    from diffusion.build import module_from_checkpoint
    from diffusion.data.base import build_part
    from diffusion.data.chat import encode_chat

    base_dir, _, _, mask = base
    n = len(transformers.AutoTokenizer.from_pretrained(base_dir))
    V = n + 5
    folder = write(tmp_path / "final_model", ldm_params(V))
    ov = [f"backbone.pretrained={base_dir}"]
    ckpt = load_checkpoint(str(folder), overrides=ov)
    spec = ckpt["unmask_config"]["data"]["tokenizer"]
    assert spec["_target_"].endswith("ChatTokensTokenizer") and spec["vocab_size"] == V
    tok = build_part(spec, "tokenizer", "data.tokenizer").build(None, "", "x")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<BOS>", "<EOS>", "<START_ID>")}
    ids |= {t: tok.convert_tokens_to_ids(t) for t in ("<END_ID>", "<EOT_ID>")}
    assert list(ids.values()) == list(range(n, n + 5)) and len(tok) == V
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 1, n + 1)
    assert tok.cls_token_id == n and tok.mask_token_id == mask
    chat = [{"role": "user", "content": "a tiny"}, {"role": "assistant", "content": "corpus"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert (
        text
        == "<BOS><START_ID>user<END_ID>\na tiny<EOT_ID><START_ID>assistant<END_ID>\ncorpus<EOS>"
    )
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<EOT_ID><START_ID>assistant<END_ID>")

    def enc(piece):
        return tok(piece, add_special_tokens=False)["input_ids"]

    want = [n, n + 2, *enc("user"), n + 3, *enc("\na tiny"), n + 4]
    want += [n + 2, *enc("assistant"), n + 3, *enc("\ncorpus"), n + 1]
    assert encode_chat(tok, chat) == want  # the ids SFT rows and prompts are made of
    # the whole path: a converted .ckpt rebuilt by the judge/lm-eval builder has these ids
    from diffusion.checkpoint import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "ldm.ckpt")
    _, dm, _ = module_from_checkpoint(str(tmp_path / "ldm.ckpt"), "checkpoint")
    assert (dm.vocab_size, dm.mask_id, dm.tokenizer.pad_token_id) == (V, mask, n + 1)
    assert dm.tokenizer.convert_tokens_to_ids("<EOT_ID>") == n + 4
    # exported to a Hugging Face folder, it ships this tokenizer, chat tokens and template
    from tests.tiny_lm import load_script

    argv = ["--ckpt", str(tmp_path / "ldm.ckpt"), "--out", str(tmp_path / "hf")]
    shipped = transformers.AutoTokenizer.from_pretrained(load_script("export_hf").main(argv))
    assert len(shipped) == V and shipped.convert_tokens_to_ids("<EOT_ID>") == n + 4
    assert shipped.apply_chat_template(chat, tokenize=False) == text
    # the release's own tokenizer saved beside the weights is read as it is
    tok.save_pretrained(folder)
    assert load_checkpoint(str(folder), overrides=ov)["unmask_config"]["data"]["tokenizer"] == str(
        folder
    )
    odd = write(tmp_path / "odd", ldm_params(n + 2))
    with pytest.raises(FormatError, match=rf"{n + 2} rows.*{n} ids.*{n + 5}"):
        load_checkpoint(str(odd), overrides=ov)
