"""MDLM's own Lightning checkpoints (mdlm.ckpt, sedd.ckpt, ar.ckpt), and BD3-LM's and DUO's.

Layout, as MDLM's `Diffusion` module saves it:
- `state_dict`: `backbone.*` in MDLM's DiT layout (the AR baseline: `DDIT`, causal, no
  sigma map or adaLN), plus the persistent rotary buffer `backbone.rotary_emb.inv_freq`;
- `ema`: {decay, num_updates, shadow_params}, the shadow params a list in the order of
  `chain(backbone.parameters(), noise.parameters())` (requires_grad only);
- `hyper_parameters`: {config: MDLM's OmegaConf config, tokenizer: a HF tokenizer object},
  read with the restricted unpickler (stand-ins, no code runs).
The EMA weights are loaded by default (what MDLM evaluates), the raw ones with use_ema=False
(`eval.disable_ema=true`).

BD3-LM's repository (a fork of MDLM's) saves the same layout with its model described under
`algo` (`algo.name: bd3lm | mdlm`, `algo.backbone`, `algo.time_conditioning`, `algo.T`,
`algo.var_min`), the block size at the top (`block_size`), its rows' switches in `data`
(`insert_train_special`, `insert_train_eos`) and, with var_min, the learned clipping as two
scalar buffers `sampling_eps_min` / `sampling_eps_max` beside `backbone.*`.

DUO's repository (s-sahoo/duo, also MDLM's fork) saves the same layout with `algo.*` too:
`algo.name: duo_base | duo | distillation` (uniform-state diffusion, the student of a
distillation; its teacher is dropped on save) and its baselines `mdlm | ar | sedd`; the AR
baseline is its DiT with `algo.causal_attention` (no sigma map, no adaLN: MDLM's AR layout).
DUO's uniform noise ranges over every id of its tokenizer, `len(tokenizer)`: GPT-2's 50 257
ids plus the [PAD] its get_tokenizer adds (50 258, [PAD] = 50 257 where ours holds [MASK]),
BERT's 30 522 with its [MASK]; so a DUO checkpoint is rebuilt with
`parameterization.states=vocab` (the mask id one more state, K = V), exactly its process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion.data.base import MASK
from diffusion.data.tokenizers import MDLM_CHAR_SPECIALS, MDLMChar
from models.formats.bd3lm_hf import CLIP_KEYS, UNCLIPPED, clip_setup, objective_overrides
from models.formats.common import FormatError, make_checkpoint, strict_match
from models.formats.mdlm_hf import check_inv_freq, dit_layout, model_overrides
from models.formats.safe_pickle import load_restricted, plain

NAME = "mdlm_ckpt"
DUO_OVERRIDES = [
    "parameterization=duo",
    "parameterization.states=vocab",
    "sampler=uniform",
    "noise=loglinear",
    "T=0",
    "time_conditioning=true",
]
PARAMETERIZATIONS = {"subs": "subs", "sedd": "sedd", "d3pm": "d3pm", "ar": "ar"}
# BD3-LM's and DUO's algo.name -> the parameterization (DUO's distillation: its student)
ALGOS = {
    "bd3lm": "bd3lm",
    "mdlm": "subs",
    "ar": "ar",
    "sedd": "sedd",
    "duo_base": "duo",
    "duo": "duo",
    "distillation": "duo",
}
LOGLINEAR = ("loglinear", "log-linear")  # MDLM's / BD3-LM's name, DUO's
INV_FREQ = "backbone.rotary_emb.inv_freq"


def detect(path: Path) -> bool:
    """A torch zip whose pickle has MDLM's `hyper_parameters` and `backbone.*` weights."""
    if not path.is_file() or path.suffix not in (".ckpt", ".pt", ".pth"):
        return False
    try:
        head = load_restricted(path, tensors=False)
    except FormatError:
        return False
    if not isinstance(head, dict) or "unmask_config" in head:
        return False
    sd = head.get("state_dict")
    return isinstance(sd, dict) and any(str(k).startswith("backbone.vocab_embed") for k in sd)


def get(cfg: dict[str, Any], dotted: str, source: str, default: Any = ...) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is not ...:
                return default
            raise FormatError(f"{source}: MDLM config key {dotted!r} missing in hyper_parameters")
        node = node[part]
    return node


def ema_weights(
    ckpt: dict[str, Any], backbone: dict[str, torch.Tensor], order: list[str], source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """Shadow params matched to the backbone's parameters in `parameters()` order (`order`:
    the file's state_dict order less buffers); the counts and every shape must agree."""
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
        raise FormatError(
            f"{source}: no ema.shadow_params (pass eval.disable_ema=true for raw weights)"
        )
    shadow = list(ema["shadow_params"])
    names = order
    if len(shadow) != len(names):
        raise FormatError(
            f"{source}: ema.shadow_params holds {len(shadow)} tensors but the backbone has "
            f"{len(names)} parameters (a learned noise schedule, or another model?)"
        )
    out = {}
    for i, (name, t) in enumerate(zip(names, shadow)):
        if not isinstance(t, torch.Tensor) or t.shape != backbone[name].shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise FormatError(
                f"{source}: ema.shadow_params[{i}] has shape {shape} but {name} "
                f"is {tuple(backbone[name].shape)}"
            )
        out[name] = t
    return out, int(ema.get("num_updates") or 0)


@dataclass(frozen=True)
class Architecture:
    """What an MDLM config says of the model: backbone kind (dit | ar), parameterization,
    width C, blocks N, heads H, conditioning width, length, time conditioning and T."""

    kind: str
    param: str
    C: int
    N: int
    H: int
    cond: int
    length: int
    time_conditioning: bool
    T: int
    block_size: int | None = None  # BD3-LM's checkpoints (param "bd3lm")

    @property
    def causal(self) -> bool:
        return self.kind == "ar"


def read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the checkpoint, MDLM's config from its hyper_parameters), read without running code."""
    ckpt = load_restricted(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise FormatError(f"{path}: no state_dict: not a Lightning checkpoint")
    cfg = plain((ckpt.get("hyper_parameters") or {}).get("config"))
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: hyper_parameters.config (MDLM's config) is missing")
    return ckpt, cfg


def architecture(cfg: dict[str, Any], source: str) -> Architecture:
    """The model MDLM's config describes; a backbone, parameterization or schedule we have
    not ported is refused."""
    if isinstance(cfg.get("algo"), dict):
        return algo_architecture(cfg, source)
    kind = str(get(cfg, "backbone", source))
    if kind not in ("dit", "ar"):
        raise FormatError(f"{source}: backbone={kind!r}; only MDLM's dit and ar load")
    param = str(get(cfg, "parameterization", source))
    if param not in PARAMETERIZATIONS:
        raise FormatError(
            f"{source}: parameterization={param!r} is not one of {sorted(PARAMETERIZATIONS)}"
        )
    noise = str(get(cfg, "noise.type", source, "loglinear"))
    if param != "ar" and noise != "loglinear":
        raise FormatError(
            f"{source}: noise.type={noise!r}; only MDLM's loglinear schedule is ported"
        )
    C, N, H = (int(get(cfg, f"model.{k}", source)) for k in ("hidden_size", "n_blocks", "n_heads"))
    cond, length = int(get(cfg, "model.cond_dim", source)), int(get(cfg, "model.length", source))
    tc = bool(get(cfg, "time_conditioning", source, False)) and kind != "ar"
    T = int(get(cfg, "T", source, 0))
    return Architecture(kind, param, C, N, H, cond, length, tc, T)


def algo_architecture(cfg: dict[str, Any], source: str) -> Architecture:
    """The model of a BD3-LM or DUO config (`algo.*`) on MDLM's DiT (the AR baseline: its
    causal DiT); an algorithm, backbone or schedule we have not ported is refused."""
    name = str(get(cfg, "algo.name", source))
    if name not in ALGOS:
        raise FormatError(
            f"{source}: algo.name={name!r}; of BD3-LM's and DUO's algorithms only "
            f"{sorted(ALGOS)} load"
        )
    param = ALGOS[name]
    kind = str(get(cfg, "algo.backbone", source))
    if kind not in ("dit", "hf_dit"):
        raise FormatError(f"{source}: algo.backbone={kind!r}; only the DiT (dit) loads")
    noise = str(get(cfg, "noise.type", source, "loglinear"))
    if param != "ar" and noise not in LOGLINEAR:
        raise FormatError(f"{source}: noise.type={noise!r}; only the loglinear schedule is ported")
    eps = float(get(cfg, "noise.eps", source, 1e-3))  # DUO's noise.eps; BD3-LM's: fixed 1e-3
    if param != "ar" and abs(eps - 1e-3) > 1e-12:
        raise FormatError(
            f"{source}: noise.eps={eps}; the loglinear schedule is ported at eps = 1e-3 "
            "(alpha_1 = 1e-3), which every released model uses"
        )
    causal = bool(get(cfg, "algo.causal_attention", source, param == "ar"))
    if causal != (param == "ar"):
        raise FormatError(
            f"{source}: algo.causal_attention={causal} with algo.name={name!r}; only the AR "
            "baseline is causal"
        )
    tc = bool(get(cfg, "algo.time_conditioning", source, False))
    need = {"bd3lm": False, "ar": False, "duo": True}.get(param)
    if need is not None and tc != need:
        raise FormatError(
            f"{source}: algo.time_conditioning={tc}; {name} models are "
            f"{'' if need else 'not '}time-conditioned"
        )
    C, N, H = (int(get(cfg, f"model.{k}", source)) for k in ("hidden_size", "n_blocks", "n_heads"))
    cond, length = int(get(cfg, "model.cond_dim", source)), int(get(cfg, "model.length", source))
    block = int(get(cfg, "block_size", source, length))
    if name == "bd3lm" and (block < 1 or length % block):
        raise FormatError(f"{source}: block_size={block} must divide model.length={length}")
    T = int(get(cfg, "algo.T", source, 0))
    if name == "distillation":
        T = 0  # its algo.T is the distillation's grid; the student is a continuous-time DUO
    if param in ("bd3lm", "duo") and T != 0:
        raise FormatError(f"{source}: algo.T={T}; ours has {name} in continuous time only")
    kind = "ar" if param == "ar" else "dit"
    return Architecture(kind, param, C, N, H, cond, length, tc, T, block)


def backbone_weights(
    ckpt: dict[str, Any], arch: Architecture, use_ema: bool, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, int]:
    """(raw weights, the weights to load, EMA updates, vocabulary size V): `backbone.*` matched
    strictly against MDLM's DiT layout, the EMA shadow in its place when use_ema."""
    sd = {k: v for k, v in ckpt["state_dict"].items() if k not in CLIP_KEYS}
    others = [k for k in sd if not str(k).startswith("backbone.")]
    if others:
        raise FormatError(f"{source}: unexpected tensor {others[0]!r} outside backbone.*")
    found = {k: (v, source) for k, v in sd.items()}
    inv = found.pop(INV_FREQ, None)
    if inv is not None:
        check_inv_freq(inv[0], arch.C // arch.H, source)
    emb = found.get("backbone.vocab_embed.embedding")
    if emb is None:
        raise FormatError(f"{source}: tensor 'backbone.vocab_embed.embedding' is missing")
    V = int(emb[0].shape[0])
    layout = dit_layout(V, arch.C, arch.N, arch.H, arch.cond, arch.length, arch.causal)
    expected = {f"backbone.{k}": s for k, s in layout.items()}
    raw = {k.removeprefix("backbone."): v for k, v in strict_match(expected, found, source).items()}
    if not use_ema:
        return raw, raw, 0, V
    order = [k.removeprefix("backbone.") for k in sd if k != INV_FREQ]
    weights, updates = ema_weights(ckpt, raw, order, source)
    return raw, weights, updates, V


def data_and_tokenizer(
    cfg: dict[str, Any], overrides: tuple[str, ...], source: str
) -> tuple[list[str], str]:
    """Our data overrides and tokenizer for MDLM's data section; a corpus with no counterpart
    is refused unless the caller passes data=... itself."""
    from diffusion.compat import mdlm_data_overrides

    try:
        return mdlm_data_overrides(cfg.get("data") or {}, source)
    except Exception as e:  # ConfigError: no counterpart of its data
        if not any(o.startswith("data=") for o in overrides):
            raise FormatError(str(e)) from e
        return [], str(get(cfg, "data.tokenizer_name_or_path", source, "?"))


def config_overrides(
    cfg: dict[str, Any], arch: Architecture, data: list[str], mask_id: int, source: str
) -> list[str]:
    """Our overrides that rebuild the model MDLM's config describes."""
    dropout = float(get(cfg, "model.dropout", source, 0.1))
    if arch.param == "bd3lm":
        var_min = bool(get(cfg, "algo.var_min", source, True))
        model = objective_overrides(int(arch.block_size or arch.length), var_min)
    elif arch.param == "duo":  # DUO's process: every id a state (see the module docstring)
        model = DUO_OVERRIDES
    else:
        model = [
            f"parameterization={PARAMETERIZATIONS[arch.param]}",
            "noise=loglinear",
            f"T={arch.T}",
            f"time_conditioning={str(arch.time_conditioning).lower()}",
        ]
    out = [
        "backbone=hf_dit",
        *model,
        f"training.ema={float(get(cfg, 'training.ema', source, 0.9999))}",
        *model_overrides(arch.C, arch.N, arch.H, arch.cond, arch.length, dropout),
        *data,
    ]
    if arch.param in ("subs", "d3pm"):  # MDLM embeds sigma = 0 (or sigma(t)), no mask statistic
        out.append("parameterization.mask_conditioning=false")
    if "algo" in cfg:  # BD3-LM's switches of its training rows (ours: one layout for all splits)
        from diffusion.compat import INSERT_FLAGS

        for flag, ours in INSERT_FLAGS.items():
            if not bool(get(cfg, f"data.insert_train_{flag}", source, True)):
                out.append(f"++data.layout.{ours}=false")
    if arch.causal:
        out += ["backbone.causal=true", f"backbone.mask_index={mask_id}"]
    return out


def load(path: Path, use_ema: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """An MDLM Lightning checkpoint as our checkpoint dict (config overrides, weights, info)."""
    source = str(path)
    ckpt, cfg = read(path)
    arch = architecture(cfg, source)
    raw, weights, updates, V = backbone_weights(ckpt, arch, use_ema, source)
    data_name = str(get(cfg, "data.train", source))
    data, tokenizer = data_and_tokenizer(cfg, overrides, source)
    mask_id = V - 1  # MDLM appends [MASK] when the tokenizer has none (GPT-2)
    if tokenizer.startswith("bert"):
        mask_id = 103
    if tokenizer == "text8":  # MDLM's own 35-id character layout, [MASK] = 4
        data = [*data, f"data.tokenizer._target_={MDLMChar.__module__}.MDLMChar"]
        mask_id = MDLM_CHAR_SPECIALS.index(MASK)
        if V != len(MDLM_CHAR_SPECIALS) + 27:
            raise FormatError(
                f"{source}: a text8 checkpoint with {V} embedding rows; MDLM's text8 tokenizer "
                f"has {len(MDLM_CHAR_SPECIALS) + 27}"
            )
    ov = config_overrides(cfg, arch, data, mask_id, source)
    state: dict[str, torch.Tensor] = {}
    if arch.param == "bd3lm":
        noise, state = clip_setup(bd3lm_clip(ckpt, cfg, source), source)
        ov += noise
    ov += list(overrides)
    info = {
        "format": NAME,
        "source": source,
        "mdlm_backbone": arch.kind,
        "mdlm_data": data_name,
        "mask_id": mask_id,
        "shift": False,
        "time_conditioning": arch.time_conditioning,
        "tokenizer": tokenizer,
        "length": arch.length,
        "ema": f"EMA ({updates} updates)" if use_ema else "raw (EMA disabled)",
        "global_step": ckpt.get("global_step"),
    }
    return make_checkpoint(ov, weights, info, raw=raw, ema_updates=updates, extra_state=state)


def bd3lm_clip(ckpt: dict[str, Any], cfg: dict[str, Any], source: str) -> tuple[float, float]:
    """BD3-LM's learned interval of training mask rates: the two saved scalars (var_min), else
    its training.sampling_eps_min / max, else the full interval."""
    sd = ckpt["state_dict"]
    if all(k in sd for k in CLIP_KEYS):
        return float(sd[CLIP_KEYS[0]]), float(sd[CLIP_KEYS[1]])
    if any(k in sd for k in CLIP_KEYS):
        raise FormatError(f"{source}: only one of {list(CLIP_KEYS)} in the state_dict")
    lo = float(get(cfg, "training.sampling_eps_min", source, UNCLIPPED[0]))
    return lo, float(get(cfg, "training.sampling_eps_max", source, UNCLIPPED[1]))
