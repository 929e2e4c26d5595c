"""MDLM's command line, verbatim: translate MDLM's override names into ours.

    ours, lines = translate(["mode=sample_eval", "sampling.predictor=ddpm_cache", ...])

A pure function of the override list (no config is read, nothing is imported from Hydra).
A command is MDLM's when it uses a name only MDLM has (`sampling.*`, `data=openwebtext-split`,
`backbone=ar`, `model=small-ar`, `+wandb.offline=true`, `loader.eval_global_batch_size`, ...);
then every MDLM name maps onto ours with one printed line (`MDLM name sampling.steps ->
sampler.steps`), names both share in spelling but not in meaning take MDLM's meaning
(`backbone=dit` is MDLM's DiT, our `backbone=hf_dit`), and MDLM's defaults where ours differ
are added (one line each). Any other command passes through untouched, so our own names keep
their documented meaning. A name we cannot honour raises ConfigError naming what to use instead.

Samples: MDLM draws `sampling.num_sample_batches` batches of `loader.eval_batch_size` on every
device, so sampler.num_samples = batches x eval batch size x devices x nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from diffusion.config import ConfigError

# MDLM data option -> (our overrides, tokenizer)
MDLM_DATA: dict[str, tuple[list[str], str]] = {
    "openwebtext-split": (["data=openwebtext"], "gpt2"),
    "openwebtext-streaming": (["data=openwebtext", "data.streaming=true"], "gpt2"),
    "lm1b": (["data=lm1b"], "bert-base-uncased"),
    "lm1b-streaming": (["data=lm1b", "data.streaming=true"], "bert-base-uncased"),
    "lm1b-wrap": (["data=lm1b_wrap"], "bert-base-uncased"),
    "lm1b-gpt2": (["data=lm1b_wrap", "data.tokenizer=gpt2"], "gpt2"),
    # MDLM cuts text8 into pieces of its model.length, whatever that is
    "text8": (["data=text8", "data.source.chunk_chars=${model.length}"], "text8"),
    # text8-crop: train pieces of 4 x model.length, rows of 2x cropped to model.length
    "text8-crop": (
        [
            "data=text8_crop",
            "data.source.chunk_chars.train='${mul:4,${model.length}}'",
            "data.source.chunk_chars.validation=${model.length}",
            "data.source.chunk_chars.test=${model.length}",
        ],
        "text8",
    ),
    "wikitext2": (["data=wikitext2"], "gpt2"),
    "wikitext103": (["data=wikitext103"], "gpt2"),
    "ptb": (["data=ptb"], "gpt2"),
    "ag_news": (["data=ag_news"], "gpt2"),
    "lambada": (["data=lambada"], "gpt2"),
    "scientific_papers_arxiv": (["data=scientific_papers_arxiv"], "gpt2"),
    "scientific_papers_pubmed": (["data=scientific_papers_pubmed"], "gpt2"),
}
# MDLM's data.train names (what its pickled config records) -> its data option
MDLM_TRAIN_NAMES = {
    "openwebtext-train": "openwebtext-split",
    "openwebtext": "openwebtext-split",
    "lm1b": "lm1b",
    "text8": "text8",
    "text8-crop": "text8-crop",
    "wikitext2": "wikitext2",
    "wikitext103": "wikitext103",
    "ptb": "ptb",
    "ag_news": "ag_news",
    "lambada": "lambada",
    "scientific_papers_arxiv": "scientific_papers_arxiv",
    "scientific_papers_pubmed": "scientific_papers_pubmed",
}
# corpora the MDLM line scores its OWT models on zero-shot (BD3-LM's and DUO's zero_shot
# scripts: `mode=ppl_eval data=<corpus> eval.checkpoint_path=...`): ours eval.datasets=[...]
ZERO_SHOT_DATA = ("ag_news", "scientific_papers_pubmed", "scientific_papers_arxiv", "lambada",
                  "wikitext2", "wikitext103", "ptb", "lm1b-gpt2")  # fmt: skip
REFUSED_DATA = {
    "openwebtext": "MDLM's data=openwebtext validates on wikitext103; use data=openwebtext-split "
    "(held-out OWT, as in MDLM's paper) and eval.datasets=[wikitext103] for that table",
}
MDLM_MODELS = {  # MDLM model option -> our model option (+ extra overrides)
    "small": ["model=small"],
    "medium": ["model=medium"],
    "tiny": ["model=mdlm_tiny"],
    "small-ar": ["model=small"],
    "tiny-ar": ["model=mdlm_tiny"],
}
SAMPLERS = {
    "ddpm": "ddpm",
    "ddpm_cache": "ddpm_cache",
    "analytic": "analytic",
    "ancestral": "ddpm",
    "ancestral_cache": "ddpm_cache",
}  # fmt: skip (+ DUO's names)
# names that only MDLM has (a command with one of them is MDLM's)
MDLM_ONLY_PREFIXES = ("sampling.", "wandb.", "callbacks.", "data.tokenizer_name_or_path")
MDLM_ONLY_NAMES = {
    "loader.eval_global_batch_size",
    "loader.pin_memory",
    "eval.perplexity_batch_size",
    "eval.compute_perplexity_on_sanity",
    "eval.generate_samples",
    "training.antithetic_sampling",
    "training.importance_sampling",
    "training.change_of_variables",
    "subs_masking",
    "diffusion",
    "model.scale_by_sigma",
    "model.causal",
    "model.tie_word_embeddings",
    "model.type",
}
# BD3-LM's and DUO's main.py (kuleshov-group/bd3lms, s-sahoo/duo) are MDLM's with these
# names added: their commands are translated by the same rules, the model named by `algo`
# (their defaults, bd3lm / duo_base, are not assumed: a command without `algo=` is MDLM's)
ALGOS: dict[str, tuple[list[str], str | None]] = {  # algo -> (ours, its sampler)
    "bd3lm": (["parameterization=bd3lm"], "block"),
    "mdlm": (["parameterization=subs"], None),  # MDLM's sampling.predictor decides
    "ar": (["parameterization=ar", "backbone=hf_dit", "backbone.causal=true"], "ar"),
    "sedd": (["parameterization=sedd", "time_conditioning=true"], "analytic"),
    # DUO's: uniform-state diffusion (over every id of the vocabulary, as DUO's code draws
    # over len(tokenizer): models/formats/mdlm_lightning.py), its curriculum, distillation
    "duo_base": (["parameterization=duo", "parameterization.states=vocab"], "uniform"),
    "duo": (
        [
            "parameterization=duo",
            "parameterization.states=vocab",
            "parameterization.curriculum=true",
        ],
        "uniform",
    ),
    "distillation": (["parameterization=duo_distill", "parameterization.states=vocab"], "uniform"),
}
DUO_ALGOS = ("duo_base", "duo", "distillation")
DUO_T_MIN = 1e-5  # eps of DUO's (and MDLM's) _sample: the grid ends there, then noise removal
REFERENCE_GRID = f"sampler.t_min={DUO_T_MIN}"  # MDLM's and DUO's grid: steps end at t = eps
# DUO's defaults where ours differ (its configs/algo/*.yaml), added in mode=train
DUO_TRAIN_DEFAULTS = {
    "duo": {
        "algo.curriculum.start": ("parameterization.curriculum_start", "100000"),
        "algo.curriculum.end": ("parameterization.curriculum_end", "200000"),
        "algo.curriculum.gumbel_tau_log10_start": ("parameterization.gumbel_tau_log10_start", "-1.0"),
        "algo.curriculum.gumbel_tau_log10_end": ("parameterization.gumbel_tau_log10_end", "-2.0"),
    },
    "distillation": {"algo.T": ("parameterization.distill_T", "64")},
}  # fmt: skip
BD3LM_REDRAW_BELOW = 4.0  # nats over the last 256 tokens: BD3-LM's _check_stop_conds
BD3LM_ONLY_PREFIXES = ("algo.", "data.insert_")
BD3LM_ONLY_NAMES = {"algo", "block_size", "model.attn_backend", "training.resample",
                    "training.from_pretrained", "wandb", "training.finetune_path",
                    "training.loss_precision", "training.class_dropout_p",
                    "eval.generated_samples_path"}  # fmt: skip
BD3LM_SAMPLING = ("sampling.nucleus_p", "sampling.kv_cache", "sampling.logdir",
                  "sampling.var_length", "sampling.first_hitting")  # fmt: skip
DUO_SAMPLING = ("sampling.p_nucleus", "sampling.use_float64", "sampling.guid_weight")
DUO_NOISE_REMOVAL = ("ancestral", "greedy", "none")  # DUO's sampling.noise_removal values
INSERT_FLAGS = {"special": "special_tokens", "eos": "doc_eos"}  # data.insert_<split>_<flag>
MDLM_ONLY_VALUES = {
    "data": set(MDLM_DATA) - {"lm1b", "text8", "wikitext2", "wikitext103", "ptb", "ag_news",
                              "lambada", "scientific_papers_arxiv", "scientific_papers_pubmed"},
    "model": {"small-ar", "tiny-ar", "tiny-dimamba"},
    "backbone": {"ar", "dimamba"},
}  # fmt: skip
DROPPED = {  # accepted MDLM names that change nothing here, and why
    "sampling.num_sample_log": "ours writes every sample to samples.jsonl and prints the first 4",
    "loader.pin_memory": "our loaders pin memory on CUDA themselves",
    "eval.compute_perplexity_on_sanity": "ours runs no sanity validation (trainer.num_sanity_val_steps=0)",
    "eval.generate_samples": "sample_eval always generates; mode=train prints eval.samples_after_train",
    "model.scale_by_sigma": "SEDD's sigma scaling is part of parameterization=sedd",
    "model.type": "the backbone option picks the architecture",
    "diffusion": "absorbing_state is the only diffusion of MDLM's main.py",
    "training.loss_precision": "ours computes each loss in float32 (DUO's NELBO in float64)",
    "training.class_dropout_p": "class-conditional training (DUO's CIFAR-10) is not ported",
    "eval.generated_samples_path": "ours writes samples.jsonl into the run directory",
}
FALSE_ONLY = {  # MDLM switches ours has no implementation of: false is accepted, true refused
    "training.importance_sampling": "training.antithetic=true (stratified t) is the variance reduction ours has",
    "training.change_of_variables": "ours trains in t; no change of variables is implemented",
    "model.tie_word_embeddings": "the DiT's head is untied (MDLM's default)",
}


def _split(override: str) -> tuple[str, str, str]:
    """'+a.b=c' -> ('+', 'a.b', 'c'); '~a' -> ('~', 'a', '')."""
    prefix = ""
    while override[:1] in "+~":
        prefix += override[0]
        override = override[1:]
    key, _, value = override.partition("=")
    return prefix, key, value


def is_mdlm_command(overrides: list[str]) -> bool:
    for o in overrides:
        _, key, value = _split(o)
        if key.startswith(MDLM_ONLY_PREFIXES) or key in MDLM_ONLY_NAMES:
            return True
        if key.startswith(BD3LM_ONLY_PREFIXES) or key in BD3LM_ONLY_NAMES:
            return True
        if value in MDLM_ONLY_VALUES.get(key, ()):
            return True
    return False


def _truthy(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ConfigError(f"MDLM name {key}={value}: expected True or False")


def _int(value: str, key: str) -> int:
    try:
        return int(value.replace("_", ""))
    except ValueError as e:
        raise ConfigError(f"MDLM name {key}={value}: expected an integer") from e


def mdlm_data_overrides(data_cfg: dict, source: str) -> tuple[list[str], str]:
    """Our data overrides and tokenizer for the `data` section of an MDLM config (a
    checkpoint's pickled one): by its option name when known, else by its train name."""
    train = str(data_cfg.get("train", ""))
    tokenizer = str(data_cfg.get("tokenizer_name_or_path", "gpt2"))
    option = MDLM_TRAIN_NAMES.get(train)
    if option == "lm1b" and tokenizer == "gpt2":
        option = "lm1b-gpt2"
    elif option == "lm1b" and data_cfg.get("wrap"):
        option = "lm1b-wrap"
    if option is None or option not in MDLM_DATA:
        raise ConfigError(
            f"{source}: MDLM data.train={train!r} has no counterpart among our data options "
            f"(known: {sorted(MDLM_TRAIN_NAMES)}); pass data=... to the converter"
        )
    return list(MDLM_DATA[option][0]), MDLM_DATA[option][1]


HYDRA_VALUE_FLAGS = {
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--info", "-i", "--experimental-rerun",
}  # fmt: skip


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, Hydra's own flags with their values): flags are kept apart, in order."""
    overrides, flags = [], []
    take_value = False
    for token in argv:
        if take_value:
            flags.append(token)
            take_value = False
        elif token.startswith("-") and not token.startswith(("~", "+")):
            flags.append(token)
            take_value = token in HYDRA_VALUE_FLAGS
        else:
            overrides.append(token)
    return overrides, flags


def translate(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(our overrides, one printed line per MDLM name mapped or default added). Hydra's own
    flags (--cfg job, -m, ...) pass through, after the overrides."""
    overrides, flags = split_flags(list(overrides))
    if not is_mdlm_command(overrides):
        return [*overrides, *flags], []
    ours, lines = _translate(overrides)
    return [*ours, *flags], lines


@dataclass
class _Translation:
    """One MDLM command being translated: the names it gives (key -> value), our overrides so
    far and the printed lines; the sampler option chosen and whether a backbone was named."""

    given: dict[str, str]
    out: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    sampler: str = ""
    semi_ar: bool = False
    backbone_set: bool = False
    origin: str = "MDLM"  # whose command it is (MDLM's, BD3-LM's, DUO's): the lines say so

    def say(self, mdlm: str, ours: list[str] | str) -> None:
        """Record the line `<origin> name <mdlm> -> <ours>`."""
        target = ours if isinstance(ours, str) else " ".join(ours) or "(nothing)"
        self.lines.append(f"{self.origin} name {mdlm} -> {target}")

    def default(self, text: str) -> None:
        """Record the line `<origin> default <text>` (a default of theirs where ours differs)."""
        self.lines.append(f"{self.origin} default {text}")


DUO_ONLY_NAMES = ("training.finetune_path", "sampling.p_nucleus", "sampling.use_float64",
                  "sampling.guid_weight")  # fmt: skip


def _origin(given: dict[str, str]) -> str:
    """DUO's command (its algo or one of its names), BD3-LM's (`algo=`, a BD3-LM name: its
    MDLM / AR / SEDD baselines are also DUO's, read as BD3-LM's), else MDLM's."""
    if given.get("algo") in DUO_ALGOS or any(k in given for k in DUO_ONLY_NAMES):
        return "DUO"
    if given.get("sampling.noise_removal", "").strip().lower() in DUO_NOISE_REMOVAL:
        return "DUO"
    if any(k.startswith(BD3LM_ONLY_PREFIXES) or k in BD3LM_ONLY_NAMES for k in given):
        return "BD3-LM"
    return "MDLM"


def _translate(overrides: list[str]) -> tuple[list[str], list[str]]:
    """An MDLM command's overrides -> (ours, printed lines): the sampler first, then every
    other name in order, then MDLM's defaults where ours differ."""
    t = _Translation(given={_split(o)[1]: _split(o)[2] for o in overrides})
    t.origin = _origin(t.given)
    t.out += _sampler_overrides(t)
    for o in overrides:
        _translate_one(t, o)
    if any(_split(o)[1].startswith("wandb.") for o in overrides):
        t.out.insert(0, "logger=wandb")
    for key, value in _mdlm_defaults(t):
        t.out.append(f"{key}={value}")
        t.default(f"{key}={value} (ours differs)")
    return t.out, t.lines


# ---- the sampler: predictor / semi-AR / steps / number of samples, composed together -------
SAMPLING_NAMES = (
    "sampling.predictor", "sampling.steps", "sampling.num_sample_batches", "sampling.semi_ar",
    "sampling.stride_length", "sampling.num_strides", "sampling.noise_removal", *BD3LM_SAMPLING,
    *DUO_SAMPLING,
)  # fmt: skip


def _sampler_overrides(t: _Translation) -> list[str]:
    """Our sampler overrides for the command's sampling.* names (MDLM's defaults filled in)."""
    ov = _sampler_choice(t)
    ov += _sampler_steps(t)
    ov += _sample_count(t)
    ov += _semi_ar_strides(t)
    ov += _noise_removal(t)
    ov += _bd3lm_sampling(t)
    ov += _duo_sampling(t)
    return ov


def _duo_sampling(t: _Translation) -> list[str]:
    """DUO's sampling.* names: use_float64 needs nothing (our posteriors are float64),
    guid_weight must be null (no class-conditional models here); p_nucleus is read with
    BD3-LM's nucleus_p."""
    g = t.given
    if "sampling.use_float64" in g:
        t.say("sampling.use_float64", "(nothing: our samplers compute posteriors in float64)")
    weight = g.get("sampling.guid_weight", "null").strip().lower()
    if weight not in ("null", "none", "~"):
        raise ConfigError(
            f"DUO name sampling.guid_weight={g['sampling.guid_weight']}: classifier-free "
            "guidance of class-conditional models (DUO's CIFAR-10) is not ported"
        )
    if "sampling.guid_weight" in g:
        t.say("sampling.guid_weight=null", "(nothing: the default)")
    return []


def _bd3lm_sampling(t: _Translation) -> list[str]:
    """BD3-LM's sampling.* names: nucleus_p -> sampler.top_p, var_length -> stop_at_eos (its
    default false: samples run to their full length), first_hitting -> the block sampler's
    (its default true); the KV cache and the log folder need nothing (said in a line each)."""
    ov = []
    g = t.given
    for key in ("sampling.nucleus_p", "sampling.p_nucleus"):  # BD3-LM's name, DUO's
        if key in g:
            p = float(g[key])
            if p < 1.0:
                ov.append(f"sampler.top_p={p}")
            t.say(key, "sampler.top_p" if p < 1.0 else "(nothing: 1.0 keeps all)")
    if t.sampler == "block":
        ov.append(_switch(t, "sampling.var_length", "sampler.stop_at_eos", default=False))
        ov.append(_switch(t, "sampling.first_hitting", "sampler.first_hitting", default=True))
    elif "sampling.var_length" in g and _truthy(g["sampling.var_length"], "sampling.var_length"):
        raise ConfigError("BD3-LM name sampling.var_length=True needs algo=bd3lm (sampler=block)")
    notes = {
        "sampling.kv_cache": "sampler=block always decodes with its exact KV cache",
        "sampling.logdir": "samples.jsonl is written into the run directory (hydra.run.dir)",
    }
    if t.sampler != "block":
        notes["sampling.first_hitting"] = f"sampler={t.sampler} has its own schedule"
    for key, note in notes.items():
        if key in g:
            t.say(key, f"(nothing: {note})")
    var_length = _truthy(g.get("sampling.var_length", "false"), "sampling.var_length")
    if t.origin == "BD3-LM" and _mode(t) == "sample_eval" and not var_length:
        # its loop's rejection of samples (with var_length it cuts the low tail off instead)
        ov.append(f"eval.redraw_entropy_below={BD3LM_REDRAW_BELOW}")
        t.default(
            "BD3-LM redraws a sample whose last 256 tokens have entropy < 4 -> "
            f"eval.redraw_entropy_below={BD3LM_REDRAW_BELOW}"
        )
    return ov


def _switch(t: _Translation, theirs: str, ours: str, default: bool) -> str:
    """A true/false name of theirs -> `ours=<value>`, their `default` when not given (said)."""
    value = _truthy(t.given.get(theirs, str(default)), theirs)
    if theirs in t.given:
        t.say(theirs, ours)
    else:
        t.default(f"{theirs}={default} -> {ours}={str(value).lower()}")
    return f"{ours}={str(value).lower()}"


def _sampler_choice(t: _Translation) -> list[str]:
    """sampling.predictor (+ sampling.semi_ar) -> sampler=<option> (+ sampler.cache)."""
    algo = t.given.get("algo", "")
    algo_sampler = ALGOS.get(algo, ([], None))[1]
    predictor = t.given.get("sampling.predictor")
    if predictor == "psi":
        return _psi_sampler(t, algo)
    if algo in DUO_ALGOS and predictor not in (None, "ancestral", "ancestral_cache"):
        raise ConfigError(
            f"DUO name sampling.predictor={predictor} with algo={algo}: of DUO's samplers "
            "ours has the ancestral one (sampler=uniform) and the Psi-samplers "
            "(sampling.predictor=psi); its analytic sampler is not ported"
        )
    if algo_sampler is not None and (predictor is None or algo in DUO_ALGOS):
        t.sampler = algo_sampler
        t.lines.append(f"algo={algo} samples with sampler={algo_sampler}")
        if algo in DUO_ALGOS:  # DUO's grid: steps to eps = 1e-5, then its noise-removal step
            t.lines.append(f"DUO's schedule -> sampler.t_min={DUO_T_MIN} (steps + 1 calls)")
            return [f"sampler={algo_sampler}", REFERENCE_GRID]
        return [f"sampler={algo_sampler}"]
    predictor = predictor or "ddpm_cache"
    if predictor not in SAMPLERS:
        raise ConfigError(
            f"MDLM name sampling.predictor={predictor}: ours has {sorted(SAMPLERS)} "
            "(and sampler=first_hitting|confidence|semi_ar by our own names)"
        )
    if "sampling.semi_ar" in t.given:
        t.semi_ar = _truthy(t.given["sampling.semi_ar"], "sampling.semi_ar")
    t.sampler = "semi_ar" if t.semi_ar else SAMPLERS[predictor]
    ov = [f"sampler={t.sampler}"]
    if t.semi_ar:
        if predictor == "analytic":
            raise ConfigError(
                "MDLM names sampling.semi_ar=True with sampling.predictor=analytic: our semi_ar "
                "sampler runs ddpm / ddpm_cache windows; use sampling.predictor=ddpm_cache"
            )
        ov.append(f"sampler.cache={'true' if predictor == 'ddpm_cache' else 'false'}")
    source = "sampling.predictor" + (" + sampling.semi_ar" if t.semi_ar else "")
    if "sampling.predictor" in t.given or t.semi_ar:
        t.say(f"{source}={predictor}", ov)
    else:
        t.default(f"sampling.predictor=ddpm_cache -> {' '.join(ov)}")
    return ov


PSI_NAMES = ("time_profile", "high_mode", "middle_mode", "low_mode", "high_frac", "middle_frac")


def _psi_sampler(t: _Translation, algo: str) -> list[str]:
    """DUO's sampling.predictor=psi (+ sampling.psi.*) -> sampler=psi on its grid; uniform-state
    models only (its masked variant: our sampler=remdm)."""
    if algo not in DUO_ALGOS:
        raise ConfigError(
            f"DUO name sampling.predictor=psi with algo={algo or 'mdlm'}: ours has the "
            "Psi-samplers for uniform-state models (algo=duo_base); for masked models use "
            "sampler=remdm (ReMDM's cap / rescale / loop schedules)"
        )
    t.sampler = "psi"
    ov = ["sampler=psi", REFERENCE_GRID]
    for name in PSI_NAMES:
        key = f"sampling.psi.{name}"
        if key in t.given:
            ov.append(f"sampler.{name}={t.given[key]}")
    t.say("sampling.predictor=psi (+ sampling.psi.*)", ov)
    return ov


def _sampler_steps(t: _Translation) -> list[str]:
    """sampling.steps (MDLM's default 128) -> sampler.steps."""
    duo = t.given.get("algo") in DUO_ALGOS
    if (
        "algo.T" in t.given
        and "sampling.steps" not in t.given
        and _mode(t) == "sample_eval"
        and not duo
    ):
        t.say("algo.T (sample_eval: BD3-LM's steps per block)", "sampler.steps")
        return [f"sampler.steps={_int(t.given['algo.T'], 'algo.T')}"]
    if t.sampler == "ar":
        return []  # one network call per token: no steps
    steps = t.given.get("sampling.steps", "1000" if duo else "128")  # DUO's default / MDLM's
    ov = [f"sampler.steps={_int(steps, 'sampling.steps')}"]
    if "sampling.steps" in t.given:
        t.say("sampling.steps", "sampler.steps")
    elif duo:
        t.default(f"sampling.steps=1000 -> sampler.steps={steps}")
    return ov


def _mode(t: _Translation) -> str:
    return t.given.get("mode", "train")


def _world_size(given: dict[str, str]) -> str:
    """devices x nodes: a number when the command fixes it, else our interpolation of it."""
    devices, nodes = given.get("trainer.devices"), given.get("trainer.num_nodes")
    if devices is not None and nodes is not None and "loader.eval_batch_size" in given:
        return str(_int(devices, "trainer.devices") * _int(nodes, "trainer.num_nodes"))
    if devices is None and nodes is None:
        return "1"  # our trainer.devices default (MDLM: every visible GPU)
    return "${mul:${trainer.devices},${trainer.num_nodes}}"


def _sample_count(t: _Translation) -> list[str]:
    """sampling.num_sample_batches -> sampler.num_samples = batches x eval batch x world."""
    duo = t.given.get("algo") in DUO_ALGOS
    default = "1" if "algo" in t.given and not duo else "2"  # BD3-LM's default / MDLM's, DUO's
    batches = _int(
        t.given.get("sampling.num_sample_batches", default), "sampling.num_sample_batches"
    )
    if batches == 0:  # MDLM's / DUO's ppl_eval scripts: no samples
        if _mode(t) == "sample_eval":
            raise ConfigError("MDLM name sampling.num_sample_batches=0: sample_eval draws none")
        t.say("sampling.num_sample_batches=0", "(nothing: this mode draws no samples)")
        return []
    eval_bs = t.given.get("loader.eval_batch_size")
    world = _world_size(t.given)
    if eval_bs is not None and world.isdigit():
        num = str(batches * _int(eval_bs, "loader.eval_batch_size") * int(world))
    else:
        num = f"'${{mul:{batches},${{mul:${{loader.eval_batch_size}},{world}}}}}'"  # quoted: Hydra keeps it
    what = f"sampler.num_samples={num} (batches x eval batch size x devices) sampler.batch_size=loader.eval_batch_size"
    if "sampling.num_sample_batches" in t.given:
        t.say(f"sampling.num_sample_batches={batches}", what)
    else:
        t.default(f"sampling.num_sample_batches={default} -> {what}")
    return [f"sampler.num_samples={num}", "sampler.batch_size='${loader.eval_batch_size}'"]


def _semi_ar_strides(t: _Translation) -> list[str]:
    """sampling.stride_length / num_strides -> the semi_ar sampler's (semi-AR only)."""
    ov = []
    for key in ("sampling.stride_length", "sampling.num_strides"):
        if key in t.given:
            if not t.semi_ar:
                raise ConfigError(f"MDLM name {key} needs sampling.semi_ar=True")
            ours = "sampler." + key.split(".", 1)[1]
            ov.append(f"{ours}={_int(t.given[key], key)}")
            t.say(key, ours)
    return ov


def _noise_removal(t: _Translation) -> list[str]:
    """sampling.noise_removal -> sampler.noise_removal where the sampler has it; True refused
    elsewhere, False dropped."""
    given = "sampling.noise_removal" in t.given
    value = t.given.get("sampling.noise_removal", "True").strip().lower()  # MDLM's default
    if value in DUO_NOISE_REMOVAL:
        return _duo_noise_removal(t, value)
    flag = _truthy(value, "sampling.noise_removal")
    if _sampler_accepts(t.sampler, "noise_removal"):
        # MDLM's: steps to t = 1e-5, then the argmax fills what is still masked there
        ov = [f"sampler.noise_removal={str(flag).lower()}"] + ([REFERENCE_GRID] if flag else [])
        if given:
            t.say("sampling.noise_removal", ov)
        else:
            t.default(f"sampling.noise_removal=True -> {' '.join(ov)}")
        return ov
    if not given:
        return []
    if flag:
        raise ConfigError(
            f"MDLM name sampling.noise_removal=True: sampler={t.sampler} has no final greedy "
            "step; its last step goes to t=0 and samples every remaining mask. Drop the "
            "flag, or use sampler=ddpm / ddpm_cache where noise_removal is an option"
        )
    t.say("sampling.noise_removal=False", "(nothing: ours has no final greedy step)")
    return []


def _duo_noise_removal(t: _Translation, value: str) -> list[str]:
    """DUO's sampling.noise_removal: greedy (the last step an argmax of x_theta) ->
    sampler.greedy_tail / MDLM's noise_removal; ancestral (its default: the last step drawn
    down to t = 0) -> ours by default; none (stop at t = eps) is refused: ours ends at t = 0."""
    if value == "none":
        raise ConfigError(
            "DUO name sampling.noise_removal=none (stop at t = eps, noisy tokens left) is not "
            "ported: ours always ends at t = 0; use ancestral (the default) or greedy"
        )
    greedy = str(value == "greedy").lower()
    if _sampler_accepts(t.sampler, "greedy_tail"):
        t.say(f"sampling.noise_removal={value}", f"sampler.greedy_tail={greedy}")
        return [f"sampler.greedy_tail={greedy}"]
    if _sampler_accepts(t.sampler, "noise_removal"):  # DUO's MDLM: MDLM's grid and removal
        ov = [f"sampler.noise_removal={greedy}"] + ([REFERENCE_GRID] if value == "greedy" else [])
        t.say(f"sampling.noise_removal={value}", ov)
        return ov
    if value == "greedy":
        raise ConfigError(
            f"DUO name sampling.noise_removal=greedy: sampler={t.sampler} has no final greedy "
            "step (sampler=uniform, ddpm and ddpm_cache have one)"
        )
    t.say("sampling.noise_removal=ancestral", "(nothing: ours ends with an ancestral step)")
    return []


# ---- everything else, name by name ---------------------------------------------------------
def _translate_one(t: _Translation, override: str) -> None:
    """One override of the command: sampling.* names were read already (unknown ones refused),
    removals pass through, MDLM names go to their handler, shared names pass through."""
    prefix, key, value = _split(override)
    if key in ("trainer.devices", "trainer.num_nodes"):
        t.out.append(f"{key}={value}")
    elif key.startswith("sampling."):
        if key in SAMPLING_NAMES:
            return
        if key.startswith("sampling.psi."):
            if t.sampler != "psi" or key.removeprefix("sampling.psi.") not in PSI_NAMES:
                raise ConfigError(
                    f"DUO name {key} needs sampling.predictor=psi and is one of "
                    f"sampling.psi.{{{','.join(PSI_NAMES)}}}"
                )
            return
        if key not in DROPPED:
            raise ConfigError(f"MDLM name {key} is not one MDLM's main.py reads")
        t.say(key, f"(nothing: {DROPPED[key]})")
    elif prefix == "~":
        t.out.append(override)
    else:
        handler = _handler(key)
        if handler is None:
            t.out.append(override)  # shared names: mode, eval.*, loader.*, training.*, T, ...
        else:
            handler(t, prefix, key, value)


Handler = Callable[[_Translation, str, str, str], None]


def _backbone(t: _Translation, prefix: str, key: str, value: str) -> None:
    t.backbone_set = True
    if value in ("dit", "hf_dit"):
        t.out.append("backbone=hf_dit")
        t.say(f"backbone={value}", "backbone=hf_dit (MDLM's DiT, parameter for parameter)")
    elif value == "ar":
        t.out += ["backbone=hf_dit", "backbone.causal=true"]
        t.say("backbone=ar", "backbone=hf_dit backbone.causal=true (MDLM's AR DDIT)")
    else:
        raise ConfigError(
            f"MDLM name backbone={value} is not ported: use backbone=dit (MDLM's DiT), "
            "backbone=ar, or our backbone=hf_causal_bidirectional / hf_mlm"
        )


def _model(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value not in MDLM_MODELS:
        raise ConfigError(
            f"MDLM name model={value} is not ported: use one of {sorted(MDLM_MODELS)}"
        )
    t.out += MDLM_MODELS[value]
    t.say(f"model={value}", MDLM_MODELS[value])


def _zero_shot_corpus(t: _Translation) -> str | None:
    """Our data option of the corpus a zero-shot command scores (ppl_eval of a checkpoint on
    one of ZERO_SHOT_DATA), else None."""
    value = t.given.get("data", "")
    if _mode(t) != "ppl_eval" or not t.given.get("eval.checkpoint_path"):
        return None
    if value not in ZERO_SHOT_DATA:
        return None
    return MDLM_DATA[value][0][0].removeprefix("data=")


def _data(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value in REFUSED_DATA:
        raise ConfigError(f"MDLM name data={value}: {REFUSED_DATA[value]}")
    if value not in MDLM_DATA:
        raise ConfigError(f"MDLM name data={value}: not an MDLM data option ({sorted(MDLM_DATA)})")
    corpus = _zero_shot_corpus(t)
    if corpus is not None:  # the model and its data are the checkpoint's: score another corpus
        t.out.append(f"eval.datasets=[{corpus}]")
        t.say(f"data={value} (ppl_eval of a checkpoint: zero-shot)", f"eval.datasets=[{corpus}]")
        return
    t.out += MDLM_DATA[value][0]
    t.say(f"data={value}", MDLM_DATA[value][0])


def _noise(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value == "log-linear":  # DUO's name of it
        value = "loglinear"
    if value != "loglinear":
        raise ConfigError(
            f"MDLM name noise={value} is not ported: use noise=loglinear (MDLM's default) "
            "or our noise=cosine"
        )
    t.out.append("noise=loglinear")


def _renamed_flag(ours: str, note: str = "") -> Handler:
    """A True/False MDLM name that is one of our flags under another name."""

    def handle(t: _Translation, prefix: str, key: str, value: str) -> None:
        t.out.append(f"{ours}={str(_truthy(value, key)).lower()}")
        t.say(key, ours + note)

    return handle


def _renamed_int(ours: str) -> Handler:
    """An integer MDLM name that is one of ours under another name."""

    def handle(t: _Translation, prefix: str, key: str, value: str) -> None:
        t.out.append(f"{ours}={_int(value, key)}")
        t.say(key, ours)

    return handle


def _false_only(t: _Translation, prefix: str, key: str, value: str) -> None:
    if _truthy(value, key):
        raise ConfigError(f"MDLM name {key}=True is not implemented: {FALSE_ONLY[key]}")
    t.say(f"{key}=False", "(nothing: the default)")


def _dropped(t: _Translation, prefix: str, key: str, value: str) -> None:
    t.say(key, f"(nothing: {DROPPED[key]})")


def _eval_global_batch(t: _Translation, prefix: str, key: str, value: str) -> None:
    t.out.append(
        f"loader.eval_batch_size='${{div_up:{_int(value, key)},"
        "${mul:${trainer.devices},${trainer.num_nodes}}}'"
    )
    t.say(key, "loader.eval_batch_size = eval_global_batch_size / (devices x nodes)")


def _tokenizer(t: _Translation, prefix: str, key: str, value: str) -> None:
    t.out.append(f"data.tokenizer={value}")
    t.say(key, "data.tokenizer")


def _betas(t: _Translation, prefix: str, key: str, value: str) -> None:
    raise ConfigError(f"MDLM name {key}: ours takes optim.betas=[b1,b2]")


WANDB_FIELDS = ("name", "project", "offline", "group", "tags", "notes", "id", "job_type")


def _wandb(t: _Translation, prefix: str, key: str, value: str) -> None:
    field_ = key.split(".", 1)[1]
    if field_ not in WANDB_FIELDS:
        raise ConfigError(f"MDLM name {key}: our wandb logger takes logger.<WandbLogger kwarg>")
    t.out.append(f"++logger.{field_}={value}")  # WandbLogger kwargs not in our yaml
    t.say(f"{prefix}{key}", f"logger=wandb logger.{field_}")


def _callbacks(t: _Translation, prefix: str, key: str, value: str) -> None:
    if not key.endswith("every_n_train_steps"):
        raise ConfigError(f"MDLM name {key}: our checkpoint callbacks are set by checkpointing.*")
    t.out.append(f"checkpointing.every_n_train_steps={_int(value, key)}")
    t.say(key, "checkpointing.every_n_train_steps")


def _algo(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value not in ALGOS:
        raise ConfigError(f"BD3-LM / DUO name algo={value}: ours ports {sorted(ALGOS)}")
    ours = ALGOS[value][0]
    t.backbone_set = t.backbone_set or any(o.startswith("backbone") for o in ours)
    t.out += ours
    t.say(f"algo={value}", ours)


def _algo_backbone(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value not in ("dit", "hf_dit"):
        raise ConfigError(f"BD3-LM name algo.backbone={value}: only its DiT is ported (dit)")
    if not t.backbone_set:  # algo=ar named MDLM's causal DiT already
        t.out.append("backbone=hf_dit")
    t.backbone_set = True
    t.say(f"algo.backbone={value}", "backbone=hf_dit (MDLM's DiT, BD3-LM's layout)")


def _algo_t(t: _Translation, prefix: str, key: str, value: str) -> None:
    if t.given.get("algo") == "distillation":
        t.out.append(f"parameterization.distill_T={_int(value, key)}")
        t.say(f"{key} (DUO's distillation grid)", "parameterization.distill_T")
    elif _mode(t) != "sample_eval" or t.given.get("algo") in DUO_ALGOS:
        t.out.append(f"T={_int(value, key)}")
        t.say(key, "T")


ALGO_KEYS = {  # BD3-LM's / DUO's algo.<key> -> ours (the value passed as it is)
    "algo.clip_search_widths": "parameterization.clip_search_widths",
    "algo.clip_search_delta": "parameterization.clip_search_delta",
    "algo.var_min": "parameterization.var_min",
    "algo.time_conditioning": "time_conditioning",
    "algo.curriculum.start": "parameterization.curriculum_start",
    "algo.curriculum.end": "parameterization.curriculum_end",
    "algo.curriculum.gumbel_tau_log10_start": "parameterization.gumbel_tau_log10_start",
    "algo.curriculum.gumbel_tau_log10_end": "parameterization.gumbel_tau_log10_end",
    "algo.curriculum.gamma_min": "parameterization.gamma_min",
    "algo.curriculum.gamma_max": "parameterization.gamma_max",
    "algo.gamma_min": "parameterization.gamma_min",  # distillation's
    "algo.gamma_max": "parameterization.gamma_max",
    "algo.update_teacher_every": "parameterization.update_teacher_every",
}
NO_CACHE = "ours computes DUO's operator T(gamma) by quadrature (no cache, no fitted series)"
ALGO_DROPPED = {
    "algo.ignore_bos": "ours reports ppl_excl_bos beside ppl (without BOS tokens and each "
    "row's first position)",
    "algo.cross_attn": "the x_t + x_0 pass is part of parameterization=bd3lm",
    "algo.parameterization": "the parameterization follows algo",
    "algo.causal_attention": "algo=ar is the causal one",
    "algo.curriculum.mode": NO_CACHE + "; DUO++'s poly9 approximates the same operator",
    "algo.curriculum.integral_cache_path": NO_CACHE,
    "algo.curriculum.top_k": NO_CACHE,
    "algo.curriculum.cache_dir": NO_CACHE,
    "algo.curriculum.n_series_terms": NO_CACHE,
    "algo.integral_cache_path": NO_CACHE,
    "algo.curriculum_start": "DUO's distillation runs no curriculum",
    "algo.curriculum_end": "DUO's distillation runs no curriculum",
    "algo.gumbel_tau_log10_start": "DUO's distillation runs no curriculum",
    "algo.gumbel_tau_log10_end": "DUO's distillation runs no curriculum",
    "algo.linear_growth_min": "used with algo.linear_growth_dt=True only",
    "algo.linear_growth_max": "used with algo.linear_growth_dt=True only",
}
ALGO_FALSE_ONLY = {  # DUO's switches ours has no implementation of
    "algo.subs_masking": "parameterization=d3pm has subs_masking (DUO's algos do not)",
    "algo.teacher_ema": "the teacher is a frozen copy of the student, refreshed every round",
    "algo.linear_growth_dt": "dt doubles every round (DUO's default schedule)",
}
# algo.loss_type values: ours (None: the objective's NELBO, nothing to set)
# (low_var: DUO's duo and mdlm losses never read it, its d3pm / sedd refuse it)
ALGO_LOSS_TYPES = {"elbo": None, "low_var": None, "kl-bwd": "kl-bwd", "kl-fwd": "kl-fwd"}


def _algo_key(t: _Translation, prefix: str, key: str, value: str) -> None:
    if key in ALGO_FALSE_ONLY:
        if _truthy(value, key):
            raise ConfigError(f"DUO name {key}=True is not implemented: {ALGO_FALSE_ONLY[key]}")
        t.say(f"{key}=False", "(nothing: the default)")
    elif key == "algo.loss_type":
        if value not in ALGO_LOSS_TYPES:
            raise ConfigError(
                f"DUO name algo.loss_type={value} is not ported (ours: {sorted(ALGO_LOSS_TYPES)})"
            )
        ours = ALGO_LOSS_TYPES[value]
        if ours is not None:
            t.out.append(f"parameterization.loss_type={ours}")
        if value == "low_var" and t.given.get("algo") not in ("duo_base", "duo", "mdlm"):
            raise ConfigError(
                f"DUO name {key}=low_var: DUO itself accepts it for duo and mdlm only"
            )
        t.say(key, "parameterization.loss_type" if ours else "(nothing: the NELBO either way)")
    elif key == "algo.posterior_loss_weight":
        if float(value) != 0.0:
            raise ConfigError(f"DUO name {key}={value}: the posterior loss is not ported")
        t.say(f"{key}=0", "(nothing: the default)")
    elif key in ALGO_KEYS:
        t.out.append(f"{ALGO_KEYS[key]}={value}")
        t.say(key, ALGO_KEYS[key])
    elif key in ALGO_DROPPED:
        t.say(key, f"(nothing: {ALGO_DROPPED[key]})")
    else:
        raise ConfigError(
            f"BD3-LM name {key} is not ported (ours: {sorted(ALGO_KEYS)}, algo.backbone, algo.T)"
        )


def _block_size(t: _Translation, prefix: str, key: str, value: str) -> None:
    if t.given.get("algo", "bd3lm") != "bd3lm":
        t.say(f"block_size={value}", f"(nothing: algo={t.given['algo']} has no blocks)")
        return
    t.out.append(f"parameterization.block_size={_int(value, key)}")
    t.say("block_size", "parameterization.block_size")


def _attn_backend(t: _Translation, prefix: str, key: str, value: str) -> None:
    if t.given.get("algo", "bd3lm") != "bd3lm":
        t.say(key, "(nothing: only bd3lm's block-causal mask has a backend choice)")
        return
    t.out.append(f"parameterization.attn_backend={value}")
    t.say(key, "parameterization.attn_backend")


def _insert(t: _Translation, prefix: str, key: str, value: str) -> None:
    """data.insert_{train,valid}_{special,eos}: the rows' bookends / EOS after documents. Ours
    has one layout for every split: the training split's switches in mode=train, else the
    validation split's."""
    parts = key.removeprefix("data.insert_").split("_")
    if len(parts) != 2 or parts[0] not in ("train", "valid") or parts[1] not in INSERT_FLAGS:
        raise ConfigError(
            f"BD3-LM name {key} is not one of its data.insert_<train|valid>_<special|eos>"
        )
    split, flag = parts
    if split != ("train" if _mode(t) == "train" else "valid"):
        other = "training" if split == "valid" else "evaluated"
        t.say(key, f"(nothing: ours cuts every split like the {other} one)")
        return
    ours = f"data.layout.{INSERT_FLAGS[flag]}"
    corpus = _zero_shot_corpus(t)
    if corpus is not None:  # the zero-shot corpus's rows
        ours = f"eval.dataset_overrides.{corpus}.layout.{INSERT_FLAGS[flag]}"
    if not _truthy(value, key):
        t.out.append(f"++{ours}=false")
    t.say(key, ours)


def _model_length(t: _Translation, prefix: str, key: str, value: str) -> None:
    """BD3-LM's sample_eval reads model.length as the number of tokens to generate (past the
    model's context its window slides): our sampler.max_length; elsewhere it is ours."""
    if t.given.get("algo") == "bd3lm" and _mode(t) == "sample_eval":
        t.out.append(f"sampler.max_length={_int(value, key)}")
        t.say("model.length (BD3-LM sample_eval: tokens to generate)", "sampler.max_length")
    else:
        t.out.append(f"{prefix}{key}={value}")


def _resample(t: _Translation, prefix: str, key: str, value: str) -> None:
    """training.resample: redraw a block's masks until its masked fraction lies in the
    clipping interval (bd3lm only; BD3-LM's default False)."""
    if not _truthy(value, key):
        t.say(f"{key}=False", "(nothing: the default)")
        return
    if t.given.get("algo", "bd3lm") != "bd3lm":
        raise ConfigError(f"BD3-LM name {key}=True needs algo=bd3lm (its blocks' masks)")
    t.out.append("parameterization.resample=true")
    t.say(key, "parameterization.resample")


def _from_pretrained(t: _Translation, prefix: str, key: str, value: str) -> None:
    """BD3-LM's training.from_pretrained, DUO's training.finetune_path ('' : none)."""
    if value.strip() in ("", "''", '""'):
        t.say(f"{key}=''", "(nothing: the default)")
        return
    t.out.append(f"training.init_from_ckpt={value}")
    t.say(key, "training.init_from_ckpt")


def _wandb_off(t: _Translation, prefix: str, key: str, value: str) -> None:
    if value.strip().lower() not in ("null", "none", "~"):
        raise ConfigError(f"BD3-LM name wandb={value}: ours takes logger=wandb logger.<kwarg>")
    t.out.append("logger=none")
    t.say("wandb=null", "logger=none")


HANDLERS: dict[str, Handler] = {
    "backbone": _backbone,
    "model": _model,
    "data": _data,
    "noise": _noise,
    "subs_masking": _renamed_flag("parameterization.subs_masking", " (parameterization=d3pm)"),
    "training.antithetic_sampling": _renamed_flag("training.antithetic"),
    "model.causal": _renamed_flag("backbone.causal"),
    "loader.eval_global_batch_size": _eval_global_batch,
    "eval.perplexity_batch_size": _renamed_int("eval.gen_ppl_batch_size"),
    "data.tokenizer_name_or_path": _tokenizer,
    "optim.beta1": _betas,
    "optim.beta2": _betas,
    **dict.fromkeys(FALSE_ONLY, _false_only),
    **dict.fromkeys(DROPPED, _dropped),
    "algo": _algo,
    "algo.backbone": _algo_backbone,
    "algo.T": _algo_t,
    "block_size": _block_size,
    "model.attn_backend": _attn_backend,
    "model.length": _model_length,
    "training.resample": _resample,
    "training.from_pretrained": _from_pretrained,
    "training.finetune_path": _from_pretrained,
    "wandb": _wandb_off,
}
PREFIX_HANDLERS: dict[str, Handler] = {
    "wandb.": _wandb,
    "callbacks.": _callbacks,
    "algo.": _algo_key,
    "data.insert_": _insert,
}


def _handler(key: str) -> Handler | None:
    """The handler of an MDLM name (by name, else by prefix); None for a shared name."""
    if key in HANDLERS:
        return HANDLERS[key]
    return next((h for p, h in PREFIX_HANDLERS.items() if key.startswith(p)), None)


# ---- MDLM's defaults where ours differ -------------------------------------------------------
def _mdlm_defaults(t: _Translation) -> list[tuple[str, str]]:
    """(key, value) of MDLM's defaults the command leaves unset where ours differ. Evaluating
    a checkpoint: the architecture comes from it (MDLM's defaults would contradict a
    checkpoint of ours); training: MDLM's architecture and optimiser defaults."""
    given = t.given
    mode = given.get("mode", "train")
    defaults: list[tuple[str, str]] = []
    if not (mode != "train" and bool(given.get("eval.checkpoint_path"))):
        if given.get("parameterization", "subs") in ("subs", "d3pm"):  # MDLM: no mask statistic
            defaults.append(("parameterization.mask_conditioning", "false"))
        if not t.backbone_set:
            defaults.append(("backbone", "hf_dit"))
        defaults += [
            (k, v) for k, v in (("model", "small"), ("data", "openwebtext")) if k not in given
        ]
    if "eval.compute_generative_perplexity" not in given:
        defaults.append(("eval.compute_generative_perplexity", "false"))
    if mode == "train":
        duo = DUO_TRAIN_DEFAULTS.get(given.get("algo", ""), {})
        for theirs, (ours, value) in duo.items():
            if theirs not in given:  # DUO's default of `theirs`
                defaults.append((ours, value))
        unset = (
            ("training.ema", "0.9999"),
            ("loader.global_batch_size", "512"),
            ("optim.lr", "3e-4"),
        )
        defaults += [(k, v) for k, v in unset if k not in given]
        defaults += [("optim.betas", "[0.9,0.999]"), ("training.random_length_fraction", "0.0")]
    return defaults


def _sampler_accepts(sampler: str, arg: str) -> bool:
    """Whether our sampler option `sampler` takes the keyword `arg` (read from its class)."""
    import importlib
    import inspect

    module = {"ddpm": "samplers.ddpm", "ddpm_cache": "samplers.ddpm_cache",
              "analytic": "samplers.analytic", "semi_ar": "samplers.semi_ar",
              "block": "samplers.block", "ar": "samplers.ar",
              "uniform": "samplers.uniform", "psi": "samplers.psi"}[sampler]  # fmt: skip
    mod = importlib.import_module(module)
    classes = [c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == module]
    return any(arg in inspect.signature(c.__init__).parameters for c in classes)


def translate_argv(argv: list[str]) -> list[str]:
    """sys.argv[1:] translated, each mapping printed (main.py calls this before Hydra parses)."""
    ours, lines = translate(argv)
    for line in lines:
        print(line)
    return ours
