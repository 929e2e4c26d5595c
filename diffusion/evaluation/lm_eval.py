"""lm-evaluation-harness adapter: a checkpoint of ours as the `lm_eval` model named "unmask".

    python scripts/lm_eval.py --model unmask --batch_size 32 \
        --model_args checkpoint=outputs/.../last.ckpt,mc_num=128 --tasks lambada_openai,piqa

The checkpoint's own config (`unmask_config`) rebuilds the tokenizer, backbone and objective
through `diffusion/build.py`, so no overrides are needed. What each request type computes:

- `loglikelihood(context, continuation)`: the row is [BOS] context continuation, cut on the
  left to the model length (the continuation is kept). Diffusion objectives: the Monte-Carlo
  NELBO of the continuation with the context clean (LLaDA, Nie et al. 2025, and SMDM, Nie et
  al. 2024, arXiv:2410.18514), i.e. the objective's own loss with `loss_mask` on the
  continuation, over `mc_num` draws whose times are stratified; the score is minus the mean
  over draws of the summed per-token NELBO, a lower bound on log p(continuation | context).
  Every request reuses the same seeded draws (common random numbers), so the choices of one
  question are compared under the same times and masks. AR checkpoints: the exact log p.
- `is_greedy`: diffusion: one pass with the whole continuation masked (t = 1) and the argmax
  of log p(x0 | x_t) at every position equal to the continuation: parallel greedy decoding,
  an approximation of the iterative greedy decoders (they unmask one token at a time and
  condition on it). AR: the exact greedy test.
- `loglikelihood_rolling(text)`: the NELBO bound (exact for AR) of the whole text, scored in
  lm-eval's rolling windows of the model length (`get_rolling_token_windows`, one token of
  context per window, the last window with as much context as fits); each token once.
- `generate_until(context, gen_kwargs)`: [BOS] context as a clean prefix, `max_gen_toks`
  (bounded by the model length) drawn by the configured sampler (default: LLaDA's block
  low-confidence decoding for diffusion, the KV-cached AR sampler for AR), greedy unless
  `do_sample`, cut at the first EOS and at the first `until` string.

`cfg_scale > 0` applies SMDM's unsupervised classifier-free guidance: the unconditional pass
is the same x_t with the context (BOS included) masked, and the logits are u + (1 + w)(c - u)
(for softmax parameterizations this is guidance on log p(x0 | x_t)). A guided score is no
longer a bound; SMDM uses it to rank choices. `loglikelihood_rolling` is never guided.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from diffusion.build import build_sampler, module_from_checkpoint
from diffusion.data.tokenizers import encode_text

log = logging.getLogger("unmask")
SAMPLER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sampler"


def load_checkpoint(path: str | Path) -> tuple[Any, Any, Any]:
    """(saved config, data module, module with the checkpoint's weights) from a .ckpt of ours,
    through the builder the judges use too."""
    return module_from_checkpoint(path, "checkpoint")


class ContextGuidedBackbone(nn.Module):
    """SMDM's unsupervised CFG around a backbone: the first `n_context` positions of x_t are the
    condition; the unconditional pass masks them. Logits u + (1 + w)(c - u), float32.

    The unconditional pass is conditioned as the objective conditions that x_t: sigma(t) when
    time-conditioned, else `backbone_sigma` of the masked x_t (mask conditioning) or nothing."""

    supports_span_cache: ClassVar[bool] = False  # two passes per call: no span KV cache

    def __init__(self, backbone: nn.Module, objective: Any, n_context: int, cfg_scale: float):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.n_context = n_context
        self.cfg_scale = cfg_scale

    def forward(
        self, x_t: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        cond = self.backbone(x_t, sigma, attention_mask).float()  # (B, L, V)
        x_u = x_t.clone()
        x_u[:, : self.n_context] = self.objective.mask_id
        if not self.objective.time_conditioned:  # t is unused then: only x_u may matter
            sigma = self.objective.backbone_sigma(None, x_u)
        uncond = self.backbone(x_u, sigma, attention_mask).float()  # (B, L, V)
        return uncond + (1.0 + self.cfg_scale) * (cond - uncond)


def cut_text(text: str, until: Iterable[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


@register_model("unmask")
class UnmaskLM(LM):
    """An unmask checkpoint (diffusion or AR) behind lm-eval's three request types."""

    def __init__(
        self,
        checkpoint: str,
        mc_num: int = 128,
        batch_size: int | str = 32,
        cfg_scale: float = 0.0,
        sampler: str | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        add_bos: bool = True,
        device: str | None = None,
        max_batch_size: int | None = None,
        **sampler_overrides: Any,
    ) -> None:
        """`batch_size`: rows per forward pass (the `mc_num` draws of a request are split into
        chunks of it, with the same draws whatever the chunking; generation batches prompts of
        equal length). `sampler`: a configs/sampler/*.yaml name; other keyword arguments
        (steps, block_length, strategy, temperature, ...) override that file's keys.
        `max_batch_size` is accepted for lm-eval's CLI and unused."""
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: pass a positive integer (no 'auto')")
        if int(mc_num) < 1:
            raise ValueError(f"mc_num={mc_num}: need at least one Monte-Carlo draw")
        self.config, self.dm, self.module = load_checkpoint(checkpoint)
        self.tokenizer = self.dm.tokenizer
        self.mc_num, self.batch_size = int(mc_num), int(batch_size)
        self.cfg_scale, self.seed = float(cfg_scale), int(seed)
        self.max_gen_toks, self.add_bos = int(max_gen_toks), _as_bool(add_bos)
        self.max_length = int(self.config.model.length)
        self._device = pick_device(device)
        self.module.to(self._device)
        self.denoiser = self.module.denoiser()  # EMA weights, eval mode
        self.objective = self.module.objective
        self.autoregressive = "next_token" in self.denoiser.capabilities
        if self.autoregressive and self.cfg_scale > 0:
            raise ValueError(f"cfg_scale={cfg_scale}: guidance needs a diffusion checkpoint")
        name = sampler or ("ar" if self.autoregressive else "confidence")
        self.sampler = lm_eval_sampler(name, sampler_overrides, self.cfg_scale, self.tokenizer)
        self.sampler.validate(self.denoiser)
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id

    # ---- parts -------------------------------------------------------------------------------
    def _backbone(self, n_context: int, cfg_scale: float) -> nn.Module:
        backbone = self.module.eval_backbone
        if cfg_scale > 0:
            return ContextGuidedBackbone(backbone, self.objective, n_context, cfg_scale)
        return backbone

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(self.seed)

    # ---- tokens ------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, [text])[0]  # a literal "[MASK]" stays text

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok_encode, context, continuation)

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            return [self.bos_id, *ids]
        return ids

    def fit_row(self, context: list[int], continuation: list[int]) -> tuple[Tensor, int]:
        """(row (n,), context length): context + continuation cut on the left to the model
        length, keeping the continuation (its last `length - 1` tokens if it alone is longer)."""
        if not continuation:
            raise ValueError("an empty continuation has nothing to score")
        continuation = continuation[-(self.max_length - 1) :]
        context = context[-(self.max_length - len(continuation)) :]
        if not context:
            raise ValueError("a row needs at least one context token (add_bos=true gives BOS)")
        return torch.tensor(context + continuation, dtype=torch.long), len(context)

    # ---- scores ------------------------------------------------------------------------------
    @torch.no_grad()
    def nelbo_draws(
        self, context: list[int], continuation: list[int], cfg_scale: float | None = None
    ) -> Tensor:
        """(mc_num,) float64: each draw's summed NELBO terms over the continuation tokens.

        One (t, mask) draw per row of mc_num copies of the row, times stratified over all
        mc_num rows (`rows=`), the same draws for every chunk size and every request."""
        row, n_context = self.fit_row(context, continuation)
        k, n = self.mc_num, row.numel()
        x0 = row.to(self._device).expand(k, n)
        attention = torch.ones_like(x0)
        loss_mask = torch.zeros_like(x0)
        loss_mask[:, n_context:] = 1
        backbone = self._backbone(n_context, self.cfg_scale if cfg_scale is None else cfg_scale)
        generator, sums = self._generator(), []
        for lo in range(0, k, self.batch_size):
            hi = min(lo + self.batch_size, k)
            generator.manual_seed(self.seed)  # every chunk draws the same k rows, keeps its own
            out = self.objective.loss(
                backbone,
                x0[lo:hi],
                attention[lo:hi],
                generator,
                loss_mask=loss_mask[lo:hi],
                rows=(torch.arange(lo, hi, device=self._device), k),
            )
            sums.append((out.nll.double() * out.mask.double()).sum(-1))
        return torch.cat(sums)

    @torch.no_grad()
    def diffusion_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether one pass with the whole continuation masked argmaxes to the continuation."""
        row, n_context = self.fit_row(context, continuation)
        x_t = row.to(self._device)[None].clone()
        x_t[:, n_context:] = self.denoiser.mask_id
        denoiser = self.objective.denoiser(self._backbone(n_context, self.cfg_scale))
        log_p = denoiser.log_p_x0(x_t, torch.ones(1, device=x_t.device))  # (1, n, V), t = 1
        guess = log_p[0, n_context:].argmax(-1).cpu()  # (m,)
        return bool((guess == row[n_context:]).all())

    @torch.no_grad()
    def ar_score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Exact log p(continuation | context) and whether greedy decoding gives it."""
        row, n_context = self.fit_row(context, continuation)
        x0 = row.to(self._device)[None]
        loss_mask = torch.zeros_like(x0)
        loss_mask[:, n_context:] = 1
        backbone = self.module.eval_backbone
        out = self.objective.loss(backbone, x0, torch.ones_like(x0), loss_mask=loss_mask)
        log_p = self.denoiser.log_p_next(x0[:, :-1])  # (1, n - 1, V): position i -> token i + 1
        greedy = log_p[0, n_context - 1 :].argmax(-1).cpu() == row[n_context:]
        return -float((out.nll.double() * out.mask.double()).sum()), bool(greedy.all())

    def score(
        self, context: list[int], continuation: list[int], guided: bool = True
    ) -> tuple[float, bool]:
        """(log-likelihood or its NELBO bound, is_greedy) of `continuation` after `context`."""
        if self.autoregressive:
            return self.ar_score(context, continuation)
        draws = self.nelbo_draws(context, continuation, None if guided else 0.0)
        return -float(draws.mean()), self.diffusion_greedy(context, continuation)

    # ---- lm-eval's interface -----------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple]:
        results = []
        for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = request.args
            ctx, cont = self.encode_pair(context, continuation)
            result = self.score(self.with_bos(ctx), cont)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list:
        results = []
        prefix = self.bos_id if self.bos_id is not None else self.eos_id
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            total = 0.0
            windows = get_rolling_token_windows(
                self.tok_encode(text), prefix, self.max_length - 1, 1
            )
            for inputs, targets in windows:
                full = [*inputs, targets[-1]]  # what the window holds: its context, then targets
                total += self.score(full[: len(full) - len(targets)], targets, guided=False)[0]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs = [self._generation_job(i, *r.args) for i, r in enumerate(requests)]
        results: list[str] = [""] * len(jobs)
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for job in jobs:  # one sampler call per chunk of equal prompt length and settings
            groups.setdefault((len(job["prompt"]), job["gen"], job["temperature"]), []).append(job)
        bar = tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm)
        for (_, gen, temperature), group in groups.items():
            for lo in range(0, len(group), self.batch_size):
                chunk = group[lo : lo + self.batch_size]
                for job, text in zip(chunk, self.generate(chunk, gen, temperature)):
                    results[job["index"]] = text
                    self.cache_hook.add_partial("generate_until", job["args"], text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generation_job(self, index: int, context: str, gen_kwargs: dict) -> dict[str, Any]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        wanted = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        sample = _as_bool(kwargs.pop("do_sample", False))  # lm-eval's default is greedy
        temperature = float(kwargs.pop("temperature", self.sampler.temperature))
        if kwargs:
            log.warning("generate_until: ignoring gen_kwargs %s", sorted(kwargs))
        prompt = self.with_bos(self.tok_encode(context))
        # the answer gets `wanted` tokens when they fit after the prompt, else what is left but
        # at least min(wanted, length / 2): then the prompt is cut on the left
        gen = max(min(wanted, self.max_length - len(prompt)), min(wanted, self.max_length // 2))
        prompt = prompt[-(self.max_length - gen) :]
        return {
            "index": index,
            "args": (context, gen_kwargs),
            "prompt": prompt,
            "gen": gen,
            "until": until,
            "temperature": temperature if sample else 0.0,
        }

    @torch.no_grad()
    def generate(self, jobs: list[dict[str, Any]], gen: int, temperature: float) -> list[str]:
        """Draw `gen` tokens after each job's prompt (all of one length) and cut the answers."""
        prefix = torch.tensor([job["prompt"] for job in jobs], dtype=torch.long)  # (B, P)
        saved, self.sampler.temperature = self.sampler.temperature, temperature
        try:
            out = self.sampler.sample(
                self.denoiser,
                num_samples=len(jobs),
                length=prefix.shape[1] + gen,
                prefix=prefix,
                generator=self._generator(),
                device=self._device,
            )
        finally:
            self.sampler.temperature = saved
        texts = []
        for job, row in zip(jobs, out.tokens[:, prefix.shape[1] :].tolist()):
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            text = self.tokenizer.decode(
                row, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            texts.append(cut_text(text, job["until"]))
        return texts

    # ---- what lm-eval may ask about the model ------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "unmask")).replace("/", "__")

    @property
    def eot_token_id(self) -> int | None:
        return self.eos_id


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split from the encoding of the whole string (so merges
    across the boundary match training); trailing context spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    n_context = len(encode(context))
    if n_context >= len(whole):  # the boundary merged away: fall back to separate encodings
        return encode(context), encode(continuation)
    return whole[:n_context], whole[n_context:]


def lm_eval_sampler(name: str, overrides: dict[str, Any], cfg_scale: float, tokenizer: Any):
    """configs/sampler/`name`.yaml with the model_args that override its keys (and the
    model's `cfg_scale` unless one is given), built with the tokenizer's special tokens;
    answers stop at EOS."""
    path = SAMPLER_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SAMPLER_CONFIGS.glob("*.yaml"))
        raise ValueError(f"sampler={name!r}: no {path}; choose one of {known}")
    cfg = OmegaConf.load(path)
    unknown = [k for k in overrides if k not in cfg]
    if unknown:
        raise ValueError(
            f"unknown model_args {unknown}: not a key of the UnmaskLM constructor nor of "
            f"{path} ({sorted(k for k in cfg if k != '_target_')})"
        )
    cfg = OmegaConf.merge(cfg, {k: _literal(v) for k, v in overrides.items()})
    if "cfg_scale" in cfg and "cfg_scale" not in overrides:
        cfg.cfg_scale = cfg_scale
    return build_sampler(cfg, tokenizer, stop_at_eos=True)


def pick_device(device: str | None) -> torch.device:
    """`device`, or CUDA when available; lm-eval's CLI asks for cuda:0 by default, so a CUDA
    request on a machine without one falls back to the CPU with a warning."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    return torch.device(device)


def _as_bool(value: Any) -> bool:
    """lm-eval passes model_args as strings or literals: "true"/"false"/True/1 ..."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _literal(value: Any) -> Any:
    """A sampler value from model_args as its YAML file would hold it ("null" -> None)."""
    return yaml.safe_load(value) if isinstance(value, str) else value
