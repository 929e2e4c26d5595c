"""Prompted generation (`mode=generate`): prompts in, answers out, and the live view.

A prompt becomes the sampler's clean prefix: one user turn and the assistant header under the
tokenizer's chat template (`chat.prompt_ids`), or with `generate.chat_template=false` [BOS] and
the raw text, as documents start in training. Samplers never write prefix positions, so the
prompt tokens come back unchanged; the answer is what follows, cut at the first EOS. The
mode's sampler is `generate.sampler` (LLaDA's block low-confidence decoding, Nie et al. 2025)
unless the command line or an experiment picked one with `sampler=...`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.live import Live
from rich.text import Text
from torch import Tensor

from diffusion.build import build_sampler, names_group
from diffusion.checkpoint import load_weights
from diffusion.config import ConfigError, validate_config
from diffusion.data import chat
from diffusion.data.tokenizers import encode_text
from diffusion.evaluation.output import run_dir

log = logging.getLogger("unmask")
MASK_GLYPH = "░"  # what a masked position looks like in the live view


def read_prompts(gen: DictConfig) -> list[str]:
    """The prompts of `generate.prompt` (one) or `generate.prompts_file` (one per non-empty line)."""
    prompt, path = gen.get("prompt"), gen.get("prompts_file")
    if (prompt is None) == (path is None):
        raise ConfigError(
            "mode=generate needs exactly one of generate.prompt='...' or "
            "generate.prompts_file=path/to/prompts.txt (one prompt per line)"
        )
    if prompt is not None:
        return [str(prompt)]
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"generate.prompts_file={path}: no such file")
    prompts = [line for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"generate.prompts_file={path} holds no prompt (every line is empty)")
    return prompts


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """The clean prefix of one prompt: chat-rendered, or [BOS] + the raw text's tokens."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"generate.chat_template=true but tokenizer {tokenizer.name_or_path!r} has no chat "
                "template (the model was not instruction-tuned with data=sft_local/alpaca); set "
                "generate.chat_template=false to continue the raw prompt"
            )
        return chat.prompt_ids(tokenizer, text)
    (ids,) = encode_text(tokenizer, [text])  # a typed "[MASK]" stays characters
    return [tokenizer.bos_token_id, *ids] if tokenizer.bos_token_id is not None else ids


def answer_length(n_prompt: int, length: int, max_new_tokens: int | None, index: int) -> int:
    """Tokens to generate after a prompt of `n_prompt` tokens within `model.length`."""
    room = length - n_prompt
    if room < 1:
        raise ConfigError(
            f"prompt {index} is {n_prompt} tokens (template and BOS included) and model.length="
            f"{length} leaves no room for an answer; shorten the prompt"
        )
    if max_new_tokens is None:
        return room
    if not 1 <= int(max_new_tokens) <= room:
        raise ConfigError(
            f"generate.max_new_tokens={max_new_tokens}: prompt {index} ({n_prompt} tokens) leaves "
            f"room for 1..{room} new tokens within model.length={length}"
        )
    return int(max_new_tokens)


def sampler_config(cfg: DictConfig) -> DictConfig:
    """mode=generate's sampler config: `cfg.sampler` when `sampler=` was chosen (command line or
    experiment), else the `generate.sampler` file with the same overrides, validated."""
    hc = HydraConfig.get()
    task = list(hc.overrides.task)
    on_command_line = names_group(task, "sampler")
    default = compose(hc.job.config_name, return_hydra_config=True).hydra.runtime.choices.sampler
    if on_command_line or hc.runtime.choices.get("sampler") != default or not cfg.generate.sampler:
        return cfg.sampler
    composed = compose(hc.job.config_name, overrides=[*task, f"sampler={cfg.generate.sampler}"])
    composed.mode = cfg.mode
    validate_config(composed)  # e.g. sedd + confidence: say which sampler= to pass
    return composed.sampler


def cut_answer(tokens: Sequence[int], n_prompt: int, eos_id: int | None) -> tuple[list[int], bool]:
    """(answer tokens after the prompt up to the first EOS, whether an EOS ended it)."""
    answer = list(tokens[n_prompt:])
    if eos_id is not None and eos_id in answer:
        return answer[: answer.index(eos_id)], True
    return answer, False


def render_canvas(row: Tensor, tokenizer: Any, mask_id: int, n_prompt: int) -> Text:
    """One x_t as rich Text: the prompt dim, masks as MASK_GLYPH, revealed tokens bold."""
    text = Text(no_wrap=False)
    ids = row.tolist()
    text.append(tokenizer.decode(ids[:n_prompt], skip_special_tokens=False), style="dim")
    run: list[int] = []  # decode runs of revealed tokens together (multi-byte BPE pieces)
    for token in [*ids[n_prompt:], None]:
        if token is not None and token != mask_id:
            run.append(token)
            continue
        if run:
            text.append(tokenizer.decode(run, skip_special_tokens=False), style="bold")
            run = []
        if token is not None:
            text.append(MASK_GLYPH, style="grey50")
    return text


def answer_prompt(
    sampler: Any,
    denoiser: Any,
    tokenizer: Any,
    prefix: list[int],
    new_tokens: int,
    generator: torch.Generator,
    live: bool = False,
    delay: float = 0.05,
    console: Console | None = None,
) -> dict[str, Any]:
    """Generate `new_tokens` after `prefix`; the record written to generations.jsonl.

    With `live`, the canvas is redrawn in the terminal at every sampler step while it runs.
    """
    kwargs = dict(
        num_samples=1,
        length=len(prefix) + new_tokens,
        prefix=torch.tensor(prefix, dtype=torch.long),
        generator=generator,
        device=generator.device,
    )
    if live:
        with LiveCanvas(tokenizer, denoiser.mask_id, len(prefix), delay, console) as view:
            out = sampler.sample(denoiser, on_step=view.show, **kwargs)
    else:
        out = sampler.sample(denoiser, **kwargs)
    tokens = out.tokens[0].tolist()
    answer, ended = cut_answer(tokens, len(prefix), tokenizer.eos_token_id)
    return {
        "answer": tokenizer.decode(answer, skip_special_tokens=True),
        "ended_with_eos": ended,
        "prompt_tokens": prefix,
        "answer_tokens": answer,
        "tokens": tokens,
        "sampler": sampler.name,
        "nfe": out.nfe,
    }


class LiveCanvas:
    """A rich Live view of one sample's canvas, redrawn as the sampler calls `show` each step;
    the last frame stays on screen."""

    def __init__(
        self,
        tokenizer: Any,
        mask_id: int,
        n_prompt: int,
        delay: float,
        console: Console | None = None,
    ) -> None:
        self.tokenizer, self.mask_id, self.n_prompt, self.delay = (
            tokenizer,
            mask_id,
            n_prompt,
            delay,
        )
        self.console = console or Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=False)

    def __enter__(self) -> LiveCanvas:
        self.live.__enter__()
        return self

    def show(self, x_t: Tensor) -> None:
        """Draw the first row of x_t (B, L), then wait `delay` seconds so steps can be seen."""
        frame = render_canvas(x_t[0].cpu(), self.tokenizer, self.mask_id, self.n_prompt)
        self.live.update(frame, refresh=True)
        if self.delay > 0:
            time.sleep(self.delay)

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)
        if not self.console.is_terminal:  # rich writes the last frame to a file without a newline
            self.console.line()


def answer_prompts(cfg: DictConfig, dm: Any, module: Any) -> None:
    """mode=generate: answer `generate.prompt` or each line of `generate.prompts_file` with the
    prompt tokens held fixed; answers stop at the first EOS. Writes generations.jsonl."""
    from rich.markup import escape
    from rich.panel import Panel

    from diffusion.evaluation.sampling import eval_device

    gen, tokenizer, length = cfg.generate, dm.tokenizer, int(cfg.model.length)
    prompts = read_prompts(gen)
    prefixes = [encode_prompt(tokenizer, p, gen.chat_template) for p in prompts]
    new = [answer_length(len(ids), length, gen.max_new_tokens, i) for i, ids in enumerate(prefixes)]
    load_weights(module, cfg.eval.checkpoint_path, dm)
    device = eval_device(cfg)
    denoiser = module.to(device).denoiser()
    sampler = build_sampler(sampler_config(cfg), tokenizer, stop_at_eos=True)
    sampler.validate(denoiser)
    generator = torch.Generator(device=device).manual_seed(int(cfg.eval.sample_seed))
    console = Console()
    with open(run_dir() / "generations.jsonl", "w") as f:
        for prompt, ids, n in zip(prompts, prefixes, new):
            record = answer_prompt(
                sampler, denoiser, tokenizer, ids, n, generator, gen.live, gen.live_delay, console
            )
            console.print(Panel(escape(record["answer"]), title=escape(prompt[:80]), expand=False))
            f.write(json.dumps({"prompt": prompt, **record}) + "\n")
    log.info("wrote %s", run_dir() / "generations.jsonl")
