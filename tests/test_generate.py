"""mode=generate end to end through main.py on a tiny trained model, and its helpers:
prompt tokens held fixed, answers cut at EOS, prompts files, the live view, clear errors."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

import diffusion.evaluation.prompted as generation
from diffusion.checkpoint import CheckpointError
from diffusion.config import ConfigError
from diffusion.data import chat
from tests.tiny_lm import TinyLM, main_in_process

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def tiny(tiny_lm) -> TinyLM:
    return tiny_lm


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    return tiny_lm.tokenizer


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


def test_prompts_file_keeps_prompt_tokens_and_cuts_answers_at_eos(
    tiny, tokenizer, tmp_path, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\nthe cat sat\n")  # the empty line is skipped
    run_in_process(
        tiny,
        tmp_path,
        f"generate.prompts_file={prompts}",
        "generate.chat_template=false",
        "sampler.temperature=0",
        "sampler.steps=16",
    )
    rows = records(tmp_path)
    assert [r["prompt"] for r in rows] == [PROMPT, "the cat sat"]
    eos = tokenizer.eos_token_id
    for row in rows:
        prompt = [
            tokenizer.bos_token_id,
            *tokenizer(row["prompt"], add_special_tokens=False)["input_ids"],
        ]
        assert row["prompt_tokens"] == prompt
        assert row["tokens"][: len(prompt)] == prompt  # the sampler never wrote the prompt
        answer = row["answer_tokens"]
        assert row["tokens"][len(prompt) : len(prompt) + len(answer)] == answer
        assert eos not in answer
        assert row["sampler"] == "confidence"  # the mode's default, not the global ddpm_cache
    first = rows[0]
    assert first["ended_with_eos"] and first["tokens"][len(first["prompt_tokens"]) + 5] == eos
    assert first["answer"] == " mat."
    assert rows[1]["ended_with_eos"] and rows[1]["answer"] == " on the mat."  # learned it
    assert " mat." in capsys.readouterr().out


def run_in_process(tiny, run_dir: Path, *overrides: str, checkpoint: Path | None = None) -> None:
    """main.py mode=generate through main() in this process (tests/tiny_lm.py)."""
    ckpt = f"eval.checkpoint_path={checkpoint or tiny.ckpt}"
    main_in_process(run_dir, *tiny.overrides, "mode=generate", ckpt, *overrides)


def test_prompt_with_a_chosen_sampler_and_the_live_view(tiny, tmp_path, capsys):
    run_in_process(
        tiny,
        tmp_path,
        f"generate.prompt={PROMPT}",
        "generate.chat_template=false",
        "generate.max_new_tokens=8",
        "generate.live=true",
        "generate.live_delay=0",
        "sampler=ddpm",
        "sampler.steps=8",
    )
    (row,) = records(tmp_path)
    assert row["sampler"] == "ddpm" and len(row["tokens"]) == len(row["prompt_tokens"]) + 8
    assert f"[BOS]{PROMPT}" in capsys.readouterr().out  # the live view's last frame


def test_missing_checkpoint_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        run_in_process(
            tiny,
            tmp_path,
            f"generate.prompt={PROMPT}",
            "generate.chat_template=false",
            checkpoint=tmp_path / "nope.ckpt",
        )


def test_prompt_longer_than_the_model_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="prompt 0 is 38 tokens.*model.length=32"):
        run_in_process(
            tiny, tmp_path, f"generate.prompt={PROMPT} {PROMPT}", "generate.chat_template=false"
        )


def test_prompt_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of generate.prompt"):
        generation.read_prompts(OmegaConf.create({"prompt": None, "prompts_file": None}))
    with pytest.raises(ConfigError, match="exactly one of generate.prompt"):
        generation.read_prompts(OmegaConf.create({"prompt": "a", "prompts_file": "b"}))
    with pytest.raises(ConfigError, match="generate.prompts_file=.*no such file"):
        generation.read_prompts(OmegaConf.create({"prompt": None, "prompts_file": "nope.txt"}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        generation.read_prompts(OmegaConf.create({"prompt": None, "prompts_file": str(empty)}))
    assert generation.read_prompts(OmegaConf.create({"prompt": 42})) == ["42"]


def test_answer_length_fits_the_model():
    assert generation.answer_length(10, 32, None, 0) == 22
    assert generation.answer_length(10, 32, 5, 0) == 5
    with pytest.raises(ConfigError, match="generate.max_new_tokens=30.*1..22"):
        generation.answer_length(10, 32, 30, 0)
    with pytest.raises(ConfigError, match="prompt 3 is 32 tokens.*model.length=32"):
        generation.answer_length(32, 32, None, 3)


def test_chat_template_or_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match="generate.chat_template=false"):
        generation.encode_prompt(tokenizer, "hi", chat_template=True)
    raw = generation.encode_prompt(tokenizer, "hi", chat_template=False)
    assert raw == [tokenizer.bos_token_id, *tokenizer("hi", add_special_tokens=False)["input_ids"]]
    templated = chat.ensure_chat_template(copy.deepcopy(tokenizer))  # adds role tokens
    assert generation.encode_prompt(templated, "hi", True) == chat.prompt_ids(templated, "hi")


def test_cut_answer():
    assert generation.cut_answer([1, 5, 6, 2, 7], 1, eos_id=2) == ([5, 6], True)
    assert generation.cut_answer([1, 5, 6], 1, eos_id=2) == ([5, 6], False)
    assert generation.cut_answer([1, 5, 6], 1, eos_id=None) == ([5, 6], False)


def test_live_view_redraws_masks_as_placeholders(tokenizer):
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    mask = len(tokenizer)  # any id that is not a character
    frame = torch.tensor([*ids, mask, ids[0], mask])
    text = generation.render_canvas(frame, tokenizer, mask, n_prompt=len(ids))
    assert text.plain == f"the cat{generation.MASK_GLYPH}t{generation.MASK_GLYPH}"
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80)
    frames = [frame[None], torch.tensor([[*ids, ids[1], ids[0], ids[2]]])]
    with generation.LiveCanvas(tokenizer, mask, len(ids), delay=0, console=console) as view:
        for x_t in frames:
            view.show(x_t)
    shown = out.getvalue()
    assert generation.MASK_GLYPH in shown and "the cat" in shown and "hte" in shown
