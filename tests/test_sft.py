"""Instruction tuning (SFT): the chat template (diffusion/data/chat.py), SFT rows with an
answer mask (diffusion/data/sft.py: ChatRecords + SFTRows), the prompt never noised, weights-only init from a pretrained
checkpoint with a grown vocabulary, and a tiny SFT run through main.py that lowers the
answer loss."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dataloader import TextDataModule
from diffusion.checkpoint import CheckpointError, init_weights
from diffusion.data.chat import (
    ROLE_TOKENS,
    chat_text,
    ensure_chat_template,
    prompt_ids,
    render_chat,
)
from diffusion.data.from_checkpoint import tokenizer_from_checkpoint
from diffusion.data.layouts import Wrap
from diffusion.data.sft import ChatRecords, SFTRows, alpaca_messages, row_to_messages, sft_rows
from diffusion.data.sources import HFDataset
from diffusion.data.tokenizers import train_tokenizer, wrap_tokenizer
from tests.test_configs import load
from tests.test_hf_backbones import gpt2_dir, mlm_dir  # noqa: F401  (fixtures)
from tests.tiny_lm import main_in_process

THINGS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "rose": "red"}
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the sky?"},
    {"role": "assistant", "content": "blue."},
]


def char_tokenizer():
    return wrap_tokenizer(train_tokenizer(["abcdefghijklmnopqrstuvwxyz ?.,!\n"], "char", 0))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def sft_dm(
    tmp_path: Path,
    train: list,
    validation: list | None = None,
    tokenizer="char",
    length: int = 32,
    **source,
) -> TextDataModule:
    """A char-level SFT data module over jsonl rows written to tmp_path."""
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", train))}
    if validation is not None:
        files["validation"] = str(write_jsonl(tmp_path / "validation.jsonl", validation))
    records = dict(path="json", data_files=files, splits={k: k for k in files})
    dm = TextDataModule(
        name="sft_test",
        source=ChatRecords(**(records | source)),
        tokenizer=tokenizer,
        layout=SFTRows(),
        length=length,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup()
    return dm


# ---- chat template --------------------------------------------------------------------------


def test_chat_template_renders_the_messages_in_order_with_whole_role_tokens():
    tok = char_tokenizer()
    before = len(tok)
    assert ensure_chat_template(tok) is tok and len(tok) == before + len(ROLE_TOKENS)
    for role_token in ROLE_TOKENS.values():  # one id each, never split into characters
        assert len(tok(role_token, add_special_tokens=False)["input_ids"]) == 1
    ids = render_chat(tok, CONVERSATION)
    text = tok.decode(ids)
    assert text == (
        "[BOS]<|system|>\nbe brief[EOS]<|user|>\nwhat is the sky?[EOS]<|assistant|>\nblue.[EOS]"
    )
    assert ids[-1] == tok.eos_token_id  # the answer ends with EOS: what a generator stops on
    ensure_chat_template(tok)  # idempotent
    assert len(tok) == before + len(ROLE_TOKENS)


def test_prompt_ids_is_the_clean_prefix_of_the_conversation():
    tok = ensure_chat_template(char_tokenizer())
    prompt = prompt_ids(tok, "what is the sky?")
    full = render_chat(tok, CONVERSATION[1:])
    assert full[: len(prompt)] == prompt
    assert tok.decode(prompt) == "[BOS]<|user|>\nwhat is the sky?[EOS]<|assistant|>\n"
    assert chat_text(tok, CONVERSATION[1:2], add_generation_prompt=True) == tok.decode(prompt)


def test_a_tokenizer_with_its_own_template_keeps_it():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    before = len(tok)
    ensure_chat_template(tok)
    assert len(tok) == before and tok.decode(render_chat(tok, CONVERSATION)) == (
        "be briefwhat is the sky?blue."
    )


def test_rendering_without_a_template_or_with_an_unknown_role_fails_clearly():
    with pytest.raises(ValueError, match="no chat template.*data=sft_local"):
        prompt_ids(char_tokenizer(), "hi")
    tok = ensure_chat_template(char_tokenizer())
    with pytest.raises(Exception, match="system, user or assistant, got bob"):
        render_chat(tok, [{"role": "bob", "content": "hi"}])


# ---- rows and the answer mask ---------------------------------------------------------------


def test_sft_rows_lay_out_prompt_answer_and_eos_padding():
    eos = 9
    ids, loss_mask, truncated, dropped = sft_rows(
        [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]], [[7, eos], [7, 7, eos], [7]], 6, eos
    )
    assert ids.tolist() == [[1, 2, 7, eos, eos, eos], [1, 2, 3, 4, 5, 7]]
    assert loss_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert (truncated, dropped) == (1, 1)


def test_answer_mask_covers_exactly_the_answer_and_its_eos_padding(tmp_path):
    rows = [
        {"messages": CONVERSATION[1:]},
        {"prompt": "the sun?", "response": "yellow."},
        {"instruction": "name it", "input": "snow", "output": "white."},
    ]
    dm = sft_dm(tmp_path, rows, rows[:1])
    tok, data = dm.tokenizer, dm.dataset("train")
    assert dm.vocab_size == len(tok) and dm.mask_id == tok.mask_token_id
    users = ["what is the sky?", "the sun?", "name it\n\nsnow"]
    answers = ["blue.", "yellow.", "white."]
    for row, (user, answer) in enumerate(zip(users, answers)):
        prompt = prompt_ids(tok, user)
        body = tok(answer, add_special_tokens=False)["input_ids"]
        ids, mask = data.input_ids[row].tolist(), data.loss_mask[row].bool().tolist()
        assert ids[: len(prompt)] == prompt  # the generator's clean prefix, token for token
        assert ids[len(prompt) : len(prompt) + len(body)] == body
        assert set(ids[len(prompt) + len(body) :]) == {tok.eos_token_id}  # EOS padding
        assert mask == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    batch = next(iter(dm.dataloader("validation")))
    assert batch["loss_mask"].dtype == torch.bool and batch["loss_mask"].shape == (1, 32)
    assert bool(batch["attention_mask"].all())  # EOS padding is part of the sequence
    # the unigram baseline scores the answers only, like the NELBO
    scored = data.input_ids[data.loss_mask.bool()]
    assert 1 < dm.unigram_ppl("validation") < len(set(scored.tolist())) + 1


def test_over_long_examples_are_truncated_or_dropped_with_a_logged_count(tmp_path, caplog):
    rows = [
        {"prompt": "sky?", "response": "blue."},
        {"prompt": "sky?", "response": "blue " * 10},  # answer cut at length
        {"prompt": "a" * 40, "response": "x"},  # the prompt alone fills the row
    ]
    with caplog.at_level(logging.WARNING, logger="diffusion.data.sft"):
        dm = sft_dm(tmp_path, rows)
    assert len(dm.dataset("train")) == 2
    assert "truncated 1 of 3 answers at model.length=32" in caplog.text
    assert "dropped 1 of 3 examples whose prompt alone fills model.length=32" in caplog.text


def test_a_slice_of_one_file_makes_the_splits(tmp_path):
    rows = [{"prompt": f"{t}?", "response": f"{c}."} for t, c in THINGS.items()] * 2
    dm = sft_dm(tmp_path, rows, splits={"train": "train[:80%]", "validation": "train[80%:]"})
    assert len(dm.dataset("train")) == 8 and len(dm.dataset("validation")) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "sky?", "response": ', r"train.jsonl line 3: not valid JSON"),
        ('["sky?", "blue."]', r"train.jsonl line 3: expected a JSON object, got list"),
        ('{"question": "sky?", "answer": "blue."}', r"train.jsonl line 3: expected .*messages"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', r"line 3: the last message must be the assistant"),
    ],
)  # fmt: skip
def test_a_malformed_line_names_the_file_and_the_line(tmp_path, line, message):
    rows = [{"prompt": "sky?", "response": "blue."}, "", line]  # line 2 is blank
    with pytest.raises(ValueError, match=message):
        sft_dm(tmp_path, rows)


def test_alpaca_row_conversion():
    row = {"instruction": "Translate to French.", "input": "cat", "output": " chat \n"}
    assert alpaca_messages(row) == [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert alpaca_messages(no_input)[0] == {"role": "user", "content": "Say hi."}
    assert row_to_messages(no_input) == alpaca_messages(no_input)
    with pytest.raises(ValueError, match="output"):
        alpaca_messages({"instruction": "Say hi."})


def test_a_checkpoint_without_a_data_config_cannot_give_its_tokenizer(tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"data.tokenizer=.*bare.ckpt: .*no unmask data config"):
        tokenizer_from_checkpoint(str(path), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer=.*missing.ckpt: checkpoint"):
        tokenizer_from_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path))


def test_a_null_tokenizer_points_at_init_from_ckpt():
    with pytest.raises(ValueError, match="data.tokenizer is null.*init_from_ckpt"):
        source = ChatRecords(path="json", splits={"train": "train"})
        TextDataModule(
            name="x", source=source, tokenizer=None, layout=SFTRows(), length=32, batch_size=1
        )


def test_a_tokenizer_without_mask_keeps_its_mask_id_and_the_role_tokens_come_after(
    tmp_path,
    gpt2_dir,  # noqa: F811
):
    words = {"prompt": "w1 w2", "response": "w3"}
    source = HFDataset(path="json", splits={"train": "train"})
    plain = TextDataModule(
        name="p", source=source, tokenizer=gpt2_dir, layout=Wrap(), length=16, batch_size=1
    )
    plain.setup_tokenizer()
    dm = sft_dm(tmp_path, [words] * 2, tokenizer=gpt2_dir, length=16)
    assert dm.mask_id == plain.mask_id == 60  # MDLM's implicit mask id: the old len(tokenizer)
    assert dm.vocab_size == 64
    assert {dm.tokenizer.convert_tokens_to_ids(t) for t in ROLE_TOKENS.values()} == {61, 62, 63}


def test_a_hugging_face_backbone_is_resized_to_the_chat_vocabulary(tmp_path, mlm_dir):  # noqa: F811
    from models.hf import HFMaskedLM

    dm = sft_dm(tmp_path, [{"prompt": "w1 w2", "response": "w3"}] * 2, tokenizer=mlm_dir, length=16)
    backbone = HFMaskedLM(vocab_size=dm.vocab_size, pretrained=mlm_dir)
    assert backbone.vocab_size == dm.vocab_size == 64 + len(ROLE_TOKENS)
    batch = next(iter(dm.dataloader("train", batch_size=2)))
    assert backbone(batch["input_ids"]).shape == (2, 16, dm.vocab_size)


# ---- the prompt is never noised -------------------------------------------------------------


class RecordingBackbone(nn.Module):
    """Uniform logits; remembers every x_t it is given."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size, self.seen = vocab_size, []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_t, sigma=None, attention_mask=None):
        self.seen.append(x_t.clone())
        return self.scale * torch.zeros(*x_t.shape, self.vocab_size)


def test_no_prompt_token_is_ever_masked_in_a_training_batch(tmp_path):
    from diffusion.module import DiffusionModule
    from diffusion.noise import LogLinear
    from diffusion.objectives.subs import SUBS

    rows = [{"prompt": f"what is the {t}?", "response": f"{c}."} for t, c in THINGS.items()]
    dm = sft_dm(tmp_path, rows * 2)
    backbone = RecordingBackbone(dm.vocab_size)
    objective = SUBS(LogLinear(), mask_id=dm.mask_id, vocab_size=dm.vocab_size)
    batch = next(iter(dm.dataloader("train", batch_size=8, shuffle=True)))
    x0, keep = batch["input_ids"], batch["loss_mask"]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        out = objective.loss(backbone, x0, batch["attention_mask"], g, loss_mask=keep)
        assert torch.equal(out.mask.bool(), keep)  # only the answer is scored
    # the training step of the module passes the batch's loss_mask through as well
    module = DiffusionModule(backbone, objective, optimizer=torch.optim.SGD, ema_decay=0)
    module.training_step(batch, 0)
    x_t = torch.stack(backbone.seen)  # (runs, B, L)
    masked = x_t == dm.mask_id
    assert not masked[:, ~keep].any()  # no prompt token masked, ever
    assert torch.equal(x_t[:, ~keep], x0[~keep].expand(len(x_t), -1))
    assert masked[:, keep].float().mean() > 0.2  # the answers are noised


# ---- init from a pretrained checkpoint ------------------------------------------------------


def tiny_module(vocab_size: int, hidden: int = 16, blocks: int = 1):
    from diffusion.module import DiffusionModule
    from diffusion.noise import LogLinear
    from diffusion.objectives.subs import SUBS
    from models.dit import DiT

    backbone = DiT(
        vocab_size, hidden_size=hidden, n_blocks=blocks, n_heads=2, cond_dim=8, max_length=8
    )
    objective = SUBS(LogLinear(), mask_id=3, vocab_size=vocab_size)
    return DiffusionModule(backbone, objective, optimizer=torch.optim.SGD, ema_decay=0.9)


def test_init_weights_copies_the_pretrained_ema_and_keeps_new_vocabulary_rows_fresh(tmp_path):
    torch.manual_seed(0)
    old = tiny_module(10)
    with torch.no_grad():  # the EMA differs from the raw weights: SFT starts from the EMA
        for p in old.ema.module.parameters():
            p.add_(1.0)
        old.ema.n_averaged.fill_(500)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": old.state_dict(), "unmask_config": {"model": "x"}}, path)
    new = tiny_module(13)
    fresh = new.backbone.embed.weight[10:].clone()
    grown = init_weights(new, path, vocab_size=13)
    assert "backbone.embed.weight" in grown and "backbone.final.linear.weight" in grown
    assert torch.equal(new.backbone.embed.weight[:10], old.ema.module.embed.weight)
    assert torch.equal(new.backbone.embed.weight[10:], fresh)
    assert torch.equal(new.ema.module.embed.weight, new.backbone.embed.weight)
    qkv = new.backbone.blocks[0].qkv.weight
    assert torch.equal(qkv, old.ema.module.blocks[0].qkv.weight)
    assert int(new.ema.n_averaged) == 0  # the EMA restarts its warm-up on the new run

    with pytest.raises(CheckpointError, match=r"init_from_ckpt=.*\(10, 16\).*only vocabulary"):
        init_weights(tiny_module(13, hidden=32), path, vocab_size=13)
    with pytest.raises(CheckpointError, match=r"init_from_ckpt=.*does not fit.*blocks\.1\."):
        init_weights(tiny_module(13, blocks=2), path, vocab_size=13)
    with pytest.raises(CheckpointError, match=r"training.init_from_ckpt=.*checkpoint not found"):
        init_weights(new, tmp_path / "missing.ckpt", vocab_size=13)


# ---- a tiny SFT run through main.py ---------------------------------------------------------


def answer_nelbo(cfg) -> float:
    """Validation NELBO per answer token of the weights training.init_from_ckpt gives (what
    ppl_eval.json reports after training, measured before any step)."""
    from diffusion.build import build_datamodule, build_module

    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    init_weights(module, cfg.training.init_from_ckpt, vocab_size=dm.vocab_size)
    module.on_validation_epoch_start()
    for batch in dm.dataloader("validation", batch_size=cfg.loader.eval_batch_size):
        module.validation_step(batch, 0)
    return module.val_meter.compute()["nelbo"]


def test_sft_from_a_pretrained_checkpoint_lowers_the_answer_loss(tmp_path):
    from diffusion.build import build_datamodule, build_module

    # a "pretrained" checkpoint (weights untrained: pretraining is not tested here), on characters
    # so that the token counts below are character counts
    pre_cfg = load(["debug=tiny_cpu", "data=shakespeare_char"])
    module = build_module(pre_cfg, build_datamodule(pre_cfg))
    pretrained = tmp_path / "pre.ckpt"
    config = OmegaConf.to_container(pre_cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), "unmask_config": config}, pretrained)

    rows = [{"prompt": f"{t}?", "response": f"the {t} is {c}."} for t, c in THINGS.items()]
    overrides = [
        "experiment=sft_shakespeare",
        f"training.init_from_ckpt={pretrained}",
        f"data.source.data_files.train={write_jsonl(tmp_path / 'train.jsonl', rows * 10)}",
        f"data.source.data_files.validation={write_jsonl(tmp_path / 'val.jsonl', rows)}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "optim.lr=3e-3",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "trainer.log_every_n_steps=20",
        "checkpointing.every_n_train_steps=0",  # last.ckpt at the final step only
        "eval.max_batches=null",
        "eval.samples_after_train=0",
    ]
    before = answer_nelbo(load(["debug=tiny_cpu", *overrides]))
    main_in_process(tmp_path / "sft", "debug=tiny_cpu", *overrides)
    stats = json.loads((tmp_path / "sft" / "ppl_eval.json").read_text())
    prompt_tokens = [7 + len(t) for t in THINGS]  # [BOS] <|user|> \n t ? [EOS] <|assistant|> \n
    assert stats["steps"] == 60 and stats["tokens"] == sum(32 - n for n in prompt_tokens)
    assert stats["nelbo"] < 0.8 * before, (before, stats["nelbo"])
