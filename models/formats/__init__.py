"""Published checkpoint formats -> our checkpoint layout, one small module per format.

    ckpt = load_checkpoint("kuleshov-group/mdlm-owt")          # or a folder, or a .ckpt
    ckpt = load_checkpoint("mdlm.ckpt", fmt="mdlm_ckpt", use_ema=False)

`load_checkpoint` returns a dict laid out as one of our own `.ckpt` files (`state_dict` with
`backbone.*` / `ema.module.*`, `unmask_config`, plus `unmask_format`: what the converter
learned), so the module is rebuilt from it as from any checkpoint of ours. The format is
detected from the files (`detect_format`) or named (`eval.checkpoint_format`). Every converter
is strict: a missing, unexpected or wrongly shaped tensor, a cut file or a missing config
field is a FormatError naming the key and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.formats import (
    bd3lm_hf,
    diffugpt,
    dream,
    llada,
    mdlm_hf,
    mdlm_lightning,
    modernbert_ldm,
    smdm,
)
from models.formats.common import FormatError, read_json

# format name -> module with detect(path) and load(path, use_ema, overrides)
FORMATS: dict[str, Any] = {
    mdlm_hf.NAME: mdlm_hf,
    bd3lm_hf.NAME: bd3lm_hf,
    mdlm_lightning.NAME: mdlm_lightning,
    smdm.NAME: smdm,
    llada.NAME: llada,
    dream.NAME: dream,
    diffugpt.NAME: diffugpt,
    modernbert_ldm.NAME: modernbert_ldm,
}
OURS = "unmask"
# releases we know of but do not load (config.json model_type -> what to use instead)
UNPORTED = {
    "duo": "DUO's Hugging Face releases (s-sahoo/duo, s-sahoo/duo-distilled) are not ported "
    "(their modeling file is not available to verify the layout against); load DUO's "
    "Lightning .ckpt files (its Google Drive folder), which mdlm_ckpt reads",
}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]

__all__ = ["FORMATS", "FormatError", "as_ckpt_file", "detect_format", "load_checkpoint", "resolve"]


def resolve(path_or_name: str) -> Path:
    """A local file or folder as given, else a Hugging Face repo id fetched into the hub
    cache (config, weights and tokenizer files only; HF_HUB_OFFLINE=1 uses the cache)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if path_or_name.count("/") != 1 or path_or_name.startswith((".", "/")):
        raise FormatError(f"checkpoint {path_or_name} not found (not a file, folder or hub name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, no access
        raise FormatError(
            f"checkpoint {path_or_name} is not a local path and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {e}); download it and pass the folder"
        ) from e


def detect_format(path: str | Path) -> str:
    """The format of a local checkpoint file or folder, from the files present."""
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        from models.formats.safe_pickle import load_restricted

        head = load_restricted(path, tensors=False)
        if isinstance(head, dict) and "unmask_config" in head:
            return OURS
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    if path.is_file() and path.suffix == ".ckpt":
        return OURS  # let our own reader explain what is wrong with it
    model_type = (
        str(read_json(path / "config.json").get("model_type", ""))
        if (path / "config.json").is_file()
        else ""
    )
    if model_type.lower() in UNPORTED:
        raise FormatError(
            f"{path / 'config.json'}: model_type={model_type!r}: {UNPORTED[model_type.lower()]}"
        )
    raise FormatError(
        f"{path}: no known checkpoint format found (known: {[OURS, *FORMATS]}); "
        "name it with eval.checkpoint_format=..."
    )


def load_checkpoint(
    path_or_name: str,
    fmt: str | None = None,
    use_ema: bool = True,
    overrides: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Our checkpoint dict from any supported format. `use_ema=False` (eval.disable_ema)
    evaluates the raw training weights; `overrides` adjust the composed config (e.g. data=)."""
    path = resolve(str(path_or_name))
    fmt = fmt or detect_format(path)
    if fmt == OURS:
        from diffusion.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        if not use_ema:  # evaluate the raw weights: the EMA copy takes the backbone's values
            sd = ckpt["state_dict"]
            for key in [k for k in sd if k.startswith("ema.module.")]:
                sd[key] = sd["backbone." + key.removeprefix("ema.module.")]
        return ckpt
    if fmt not in FORMATS:
        raise FormatError(
            f"eval.checkpoint_format={fmt!r} is not a known format: {[OURS, *FORMATS]}"
        )
    return FORMATS[fmt].load(path, use_ema=use_ema, overrides=tuple(overrides))


def as_ckpt_file(
    path_or_name: str,
    fmt: str | None = None,
    use_ema: bool = True,
    cache_dir: str | Path | None = None,
) -> Path:
    """A `.ckpt` of ours for any supported checkpoint: our own file as it is (unless
    `use_ema=False`), else the conversion, written once (atomically) into `cache_dir`
    (default $UNMASK_CACHE or ~/.cache/unmask, under converted/) and reused while the source
    files are unchanged. Lets every mode that reads a .ckpt path take a published release."""
    import hashlib
    import os

    from diffusion.checkpoint import AtomicCheckpointIO

    path = resolve(str(path_or_name))
    fmt = fmt or detect_format(path)
    if fmt == OURS and use_ema:
        return path
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha1(repr((fmt, use_ema, stamp)).encode()).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("UNMASK_CACHE") or Path.home() / ".cache" / "unmask")
    out = root / "converted" / f"{fmt}-{key}.ckpt"
    if not out.is_file():
        AtomicCheckpointIO().save_checkpoint(load_checkpoint(str(path), fmt, use_ema), out)
    return out
