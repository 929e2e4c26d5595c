"""The Hugging Face backbones (models/hf.py): ModernBERT as a diffusion LM, GPT-2 / LLaMA made
bidirectional as in DiffuGPT, export and reload, LoRA. Tiny models built from configs are saved to
temporary folders and loaded by path, the same `from_pretrained` path a hub name takes."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
)

from models.hf import HFCausalBidirectional, HFMaskedLM, anneal_ratio, annealed_mask
from tests.tiny_lm import load_script

WORDS = [f"w{i}" for i in range(59)]
LIMIT = 16  # max_position_embeddings of the tiny models


def save_tokenizer(folder: Path, specials: list[str], **roles: str) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    wl = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, **roles)
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> str:
    """A tiny ModernBERT with its own [MASK] (id 4) and a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_modernbert")
    tok = save_tokenizer(
        folder,
        ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"],
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=LIMIT, pad_token_id=1, cls_token_id=2,
        sep_token_id=3, bos_token_id=2, eos_token_id=3, mask_token_id=4,
    )  # fmt: skip
    ModernBertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 without a mask token (the data module's [MASK] is len(tokenizer) = 60)."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tok = save_tokenizer(
        folder, ["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=LIMIT, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=LIMIT,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def change_last(x: torch.Tensor, vocab: int = 60) -> torch.Tensor:
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % vocab
    return y


def run_export(argv: list[str]) -> Path:
    module = load_script("export_hf")
    return module.main(argv)


def write_checkpoint(path: Path, backbone: torch.nn.Module, ema: torch.nn.Module, cfg: dict):
    """A checkpoint laid out as ours: `backbone.` and `ema.module.` prefixes, unmask_config."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    state["ema.n_averaged"] = torch.tensor(3)
    torch.save({"state_dict": state, "unmask_config": cfg, "global_step": 3}, path)


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---- hf_mlm ------------------------------------------------------------------------------------
def test_mlm_logits_mask_token_and_sigma_ignored(mlm_dir):
    model = HFMaskedLM(vocab_size=64, pretrained=mlm_dir, max_length=LIMIT).eval()
    assert model.attn_implementation == "sdpa"  # CPU: no flash-attn
    assert AutoTokenizer.from_pretrained(mlm_dir).mask_token_id == 4  # the model's own [MASK]
    x = torch.randint(5, 64, (2, 10))
    x[:, 3] = 4
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10, 64)
        torch.testing.assert_close(model(x, sigma=torch.tensor([0.1, 5.0])), out)
        assert not torch.allclose(model(change_last(x, 64))[:, 0], out[:, 0])  # bidirectional


def test_mlm_padding_mask_is_passed_through(mlm_dir):
    model = HFMaskedLM(vocab_size=64, pretrained=mlm_dir).eval()
    x = torch.randint(5, 64, (1, 10))
    attn = torch.ones_like(x)
    attn[:, -3:] = 0
    y = x.clone()
    y[:, -3:] = (y[:, -3:] + 7) % 64  # change only padded tokens
    with torch.no_grad():
        a, b = model(x, attention_mask=attn), model(y, attention_mask=attn)
        torch.testing.assert_close(a[:, :7], b[:, :7])  # padding is invisible to real tokens
        assert not torch.allclose(model(x)[:, :7], model(y)[:, :7])  # without the mask it is not


def test_vocabulary_resize_new_rows_start_at_the_mean(mlm_dir, gpt2_dir):
    base = AutoModelForMaskedLM.from_pretrained(mlm_dir).get_input_embeddings().weight
    grown = HFMaskedLM(vocab_size=70, pretrained=mlm_dir)
    emb = grown.hf_model.get_input_embeddings().weight
    assert emb.shape == (70, 32) and grown.vocab_size == 70
    torch.testing.assert_close(emb[:64], base)
    torch.testing.assert_close(emb[64:], base.mean(0).expand(6, -1))
    assert grown.hf_model.get_output_embeddings().weight.shape[0] == 70
    shrunk = HFMaskedLM(vocab_size=40, pretrained=mlm_dir)
    torch.testing.assert_close(shrunk.hf_model.get_input_embeddings().weight, base[:40])
    # GPT-2: the data's [MASK] = len(tokenizer) = 60 becomes a new, mean-initialised row
    wte = AutoModelForCausalLM.from_pretrained(gpt2_dir).get_input_embeddings().weight
    causal = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir)
    new = causal.hf_model.get_input_embeddings().weight
    torch.testing.assert_close(new[60], wte.mean(0))
    assert causal.hf_model.get_output_embeddings().weight is new  # the head stays tied


def test_reused_mask_token_must_be_in_the_vocabulary(gpt2_dir):
    reused = HFCausalBidirectional(vocab_size=60, pretrained=gpt2_dir, mask_token_id=41)
    assert reused.vocab_size == 60 and reused.mask_token_id == 41  # no new row (DiffuGPT-s)
    with pytest.raises(ValueError, match="mask_token_id=60 is outside the vocabulary"):
        HFCausalBidirectional(vocab_size=60, pretrained=gpt2_dir, mask_token_id=60)


def test_length_limit_is_a_clear_error(mlm_dir, gpt2_dir):
    with pytest.raises(ValueError, match=r"max_position_embeddings=16.*model.length <= 16"):
        HFMaskedLM(vocab_size=64, pretrained=mlm_dir, max_length=17)
    with pytest.raises(ValueError, match=r"plus 1 BOS.*model.length <= 15"):
        HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, max_length=16, shift_first="bos")
    model = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, max_length=16)
    with pytest.raises(ValueError, match="sequence length 17 exceeds"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ---- hf_causal_bidirectional ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gpt2_is_bidirectional(gpt2_dir, impl):
    model = HFCausalBidirectional(
        vocab_size=61, pretrained=gpt2_dir, shift=False, attn_implementation=impl
    ).eval()
    flags = [m.is_causal for m in model.modules() if hasattr(m, "is_causal")]
    assert flags and not any(flags) and model.hf_model.config.is_causal is False
    x = torch.randint(1, 60, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model(change_last(x))[:, 0], model(x)[:, 0], atol=1e-6)
        causal = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation=impl).eval()
        torch.testing.assert_close(  # the untouched model is causal: the control
            causal(change_last(x)).logits[:, 0], causal(x).logits[:, 0]
        )


def test_llama_is_bidirectional_and_shifted(llama_dir):
    model = HFCausalBidirectional(vocab_size=61, pretrained=llama_dir).eval()
    x = torch.randint(1, 60, (2, 12))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 12, 61)
        assert not torch.allclose(model(change_last(x))[:, 1], out[:, 1], atol=1e-6)


def test_annealing_starts_causal_and_ends_bidirectional(gpt2_dir):
    model = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, shift=False, anneal_steps=100)
    causal = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    x = torch.randint(1, 60, (2, 12))
    model.train()  # annealing acts on training steps only (dropout is 0 in the tiny config)
    with torch.no_grad():
        model.set_training_step(0)
        out = model(x)
        torch.testing.assert_close(model(change_last(x))[:, 0], out[:, 0])  # step 0: causal
        torch.testing.assert_close(out[..., :60], causal(x).logits)  # the pretrained model
        model.set_training_step(100)
        assert not torch.allclose(model(change_last(x))[:, 0], model(x)[:, 0], atol=1e-6)
        model.set_training_step(0)
        model.eval()  # validation and sampling always see full attention (DiffuGPT)
        assert not torch.allclose(model(change_last(x))[:, 0], model(x)[:, 0], atol=1e-6)


def test_anneal_mask_opens_the_upper_triangle_linearly():
    assert [anneal_ratio(s, 100) for s in (0, 25, 100, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert anneal_ratio(0, 0) == 1.0
    g = torch.Generator().manual_seed(0)
    mask = annealed_mask(200, 0.25, None, torch.device("cpu"), generator=g)[0, 0]
    lower = torch.ones(200, 200, dtype=torch.bool).tril()
    assert mask[lower].all()  # the causal part is always open
    upper = mask[~lower]
    assert abs(upper.float().mean().item() - 0.25) < 0.02
    padding = torch.tensor([[1, 1, 1, 0]])
    padded = annealed_mask(4, 1.0, padding, torch.device("cpu"))
    assert padded.shape == (1, 1, 4, 4)
    assert not padded[0, 0, :3, 3].any() and padded[0, 0, 3, 3]  # hidden key; no empty row


def test_shift_loss_by_hand_on_four_tokens(gpt2_dir):
    """Under the shift, the adapter's loss on positions 1..3 at anneal step 0 is GPT-2's own
    next-token loss (the head transfers); position 0 copies its input (DiffuGPT)."""
    model = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, anneal_steps=10).train()
    model.set_training_step(0)
    causal = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    x = torch.tensor([[7, 21, 3, 45]])
    with torch.no_grad():
        logits = model(x)[..., :60]  # (1, 4, V) aligned with x
        ar = causal(x).logits  # (1, 4, V): position i predicts token i+1
        by_hand = -sum(ar[0, i - 1].log_softmax(-1)[x[0, i]] for i in (1, 2, 3)) / 3
        ours = F.cross_entropy(logits[0, 1:], x[0, 1:])
        torch.testing.assert_close(ours, by_hand)
        assert logits[0, 0].argmax() == 7  # position 0 predicts its own input token
        masked = x.clone()
        masked[0, 0] = 60  # [MASK] at position 0: after SUBS (mask logit removed) it is uniform
        first = model(masked)[0, 0]
        first[60] = -1e6
        torch.testing.assert_close(first.log_softmax(-1)[:60], torch.full((60,), -math.log(60)))


def test_shift_first_bos_predicts_position_zero_from_bos(gpt2_dir):
    model = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, shift_first="bos").eval()
    plain = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, shift=False).eval()
    x = torch.randint(1, 60, (2, 6))
    with torch.no_grad():
        with_bos = torch.cat([torch.zeros(2, 1, dtype=torch.long), x], dim=1)
        torch.testing.assert_close(model(x), plain(with_bos)[:, :-1])


# ---- export, reload, LoRA -----------------------------------------------------------------------
def test_export_and_reload_give_identical_logits_mlm(mlm_dir, tmp_path):
    backbone = HFMaskedLM(vocab_size=66, pretrained=mlm_dir, max_length=LIMIT)
    ema = copy.deepcopy(backbone)
    perturb(backbone, 1)
    perturb(ema, 2)
    cfg = {
        "backbone": {
            "_target_": "models.hf.HFMaskedLM",
            "pretrained": mlm_dir,
            "max_length": LIMIT,
        },
        "data": {"tokenizer": mlm_dir},
    }
    write_checkpoint(tmp_path / "last.ckpt", backbone, ema, cfg)
    out = run_export(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "hf")])
    reloaded = HFMaskedLM(vocab_size=66, pretrained=str(out), max_length=LIMIT).eval()
    plain = AutoModelForMaskedLM.from_pretrained(out).eval()  # no trust_remote_code
    x = torch.randint(5, 66, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ema.eval()(x))  # the EMA weights were exported
        torch.testing.assert_close(plain(input_ids=x).logits, reloaded(x))
        assert not torch.allclose(reloaded(x), backbone.eval()(x))
    assert AutoTokenizer.from_pretrained(out).mask_token_id == 4


def test_export_with_lora_and_added_mask_reloads_identically(gpt2_dir, tmp_path):
    pytest.importorskip("peft")
    kwargs = dict(pretrained=gpt2_dir, max_length=LIMIT, anneal_steps=5, lora_rank=4)
    backbone = HFCausalBidirectional(vocab_size=61, **kwargs)
    perturb(backbone, 3)  # LoRA B starts at zero: make the adapters matter
    cfg = {
        "backbone": {"_target_": "models.hf.HFCausalBidirectional", **kwargs},
        "data": {"tokenizer": gpt2_dir},
    }
    write_checkpoint(tmp_path / "last.ckpt", backbone, backbone, cfg)
    out = run_export(["--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "hf")])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token_id == 60 and len(tok) == 61  # the data module's [MASK] id
    plain = AutoModelForCausalLM.from_pretrained(out)  # a plain (causal) GPT-2 again
    assert plain.config.vocab_size == 61 and plain.config.unmask_adapter["shift"] is True
    assert not any("lora" in n for n, _ in plain.named_parameters())  # merged
    reloaded = HFCausalBidirectional(vocab_size=61, pretrained=str(out), max_length=LIMIT).eval()
    x = torch.randint(1, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), backbone.eval()(x), atol=1e-5, rtol=1e-5)


def test_lora_trains_only_the_adapters(gpt2_dir, mlm_dir):
    pytest.importorskip("peft")
    for model in (
        HFCausalBidirectional(
            vocab_size=61, pretrained=gpt2_dir, lora_rank=4, train_embeddings=False
        ),
        HFMaskedLM(vocab_size=64, pretrained=mlm_dir, lora_rank=4, train_embeddings=False),
    ):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randint(1, 60, (2, 8))
        for _ in range(2):  # B starts at zero: two steps move A as well
            model.train()
            F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
            opt.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == trainable
    with_emb = HFCausalBidirectional(vocab_size=61, pretrained=gpt2_dir, lora_rank=4)
    names = {n for n, p in with_emb.named_parameters() if p.requires_grad}
    assert any(n.endswith("wte.weight") for n in names)  # DiffuLLaMA: embeddings train too
    assert all("lora_" in n or n.endswith("wte.weight") for n in names)


def test_export_takes_hf_backbones_by_class_not_by_module_name():
    """export_hf.py accepts a backbone whose class is an HF adapter (models/hf.py), wherever
    it is named from, and refuses the DiT or a name that does not resolve."""
    module = load_script("export_hf")
    assert module.is_hf_backbone("models.hf.HFMaskedLM")
    assert module.is_hf_backbone("models.hf.HFCausalBidirectional")
    assert not module.is_hf_backbone("models.dit.DiT")
    assert not module.is_hf_backbone("models.hf.NoSuchClass")
