"""Export a checkpoint of an HF backbone (hf_mlm, hf_causal_bidirectional) to a Hugging Face folder.

    python scripts/export_hf.py --ckpt outputs/.../checkpoints/last.ckpt --out exported/diffugpt

The folder holds `model.safetensors`, `config.json` and the tokenizer, and reloads with plain
`AutoModelForMaskedLM` / `AutoModelForCausalLM.from_pretrained(out)` (no trust_remote_code).
LoRA adapters are merged into the weights. A causal model reloaded that way is causal again:
bidirectionality (and the shift) come from our adapter, which restores them when the folder is
trained or sampled from again with `backbone.pretrained=<out>`; `config.json` records the recipe
under `unmask_adapter`. The EMA weights are exported when the checkpoint has them (they are the
ones validation and sampling use); `--weights model` takes the raw training weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADAPTER_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
TRAINED_TOKENIZERS = ("bpe", "char")  # the data module's own trained vocabularies


def read(path: str) -> dict:
    from diffusion.checkpoint import check_targets, read_checkpoint

    ckpt = read_checkpoint(path)  # weights_only=True, safe advice on a pickle payload
    if "unmask_config" not in ckpt:
        raise SystemExit(f"{path}: not an unmask checkpoint (needs state_dict and unmask_config)")
    check_targets(ckpt["unmask_config"], path)  # the stored config never chooses code
    return ckpt


def is_hf_backbone(target: object) -> bool:
    """Whether a (checked) backbone `_target_` names a Hugging Face adapter class (models/hf.py)."""
    from hydra.utils import get_class

    from models.hf import HFAdapter

    try:
        cls = get_class(str(target))
    except Exception:  # not importable: not a backbone of ours
        return False
    return isinstance(cls, type) and issubclass(cls, HFAdapter)


def backbone_state(state_dict: dict, weights: str) -> tuple[dict, str]:
    """The backbone's tensors with their prefix removed: `ema.module.` when present, else `backbone.`."""
    prefixes = ["ema.module.", "backbone."] if weights == "ema" else ["backbone."]
    for prefix in prefixes:
        state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if state:
            return state, prefix
    raise SystemExit(f"no backbone weights under {prefixes} in the checkpoint")


def embedding_name(backbone: torch.nn.Module) -> str:
    emb = backbone.hf_model.get_input_embeddings().weight
    return next(name for name, p in backbone.named_parameters() if p is emb)


def load_tokenizer(cfg: dict, backbone, name: str | None):
    """The data's HF tokenizer (else the backbone's), with the [MASK] the model was trained with."""
    data_tok = (cfg.get("data") or {}).get("tokenizer")
    tok = None
    if name is None and isinstance(data_tok, Mapping):
        # a spec (a release's special ids, the ModernBERT LDM's chat tokens, ...): built as the
        # data module builds it, so the folder ships the ids the model was trained with
        from diffusion.data.tokenizers import _Trained, from_spec

        spec = from_spec(dict(data_tok))
        if isinstance(spec, _Trained):  # trained on the corpus: not a tokenizer to ship
            name = backbone.pretrained
        else:
            tok = spec.build(None, str(cfg.get("data", {}).get("cache_dir") or "."), "export")
            name = spec.describe()
    if name is None:
        name = data_tok if data_tok and data_tok not in TRAINED_TOKENIZERS else backbone.pretrained
    if tok is None:
        tok = transformers.AutoTokenizer.from_pretrained(name)
    if tok.mask_token is None:
        reused = getattr(backbone, "mask_token_id", None)
        if reused is not None:  # DiffuGPT-s: an existing token serves as [MASK]
            tok.mask_token = tok.convert_ids_to_tokens(reused)
        else:  # the data module's [MASK] is len(tokenizer): the row the adapter added
            tok.add_special_tokens({"mask_token": "<|mask|>"})
    if tok.mask_token_id >= backbone.vocab_size:
        raise SystemExit(
            f"tokenizer {name}: mask id {tok.mask_token_id} is outside the model's "
            f"vocabulary ({backbone.vocab_size})"
        )
    if len(tok) > backbone.vocab_size:
        raise SystemExit(
            f"tokenizer {name}: {len(tok)} ids, more than the model's {backbone.vocab_size} "
            "embedding rows (pass --tokenizer with the one it was trained with)"
        )
    return tok


@torch.no_grad()
def verify(backbone, out: Path, cfg_backbone: dict) -> float:
    """Rebuild the adapter from the exported folder and compare logits (eval mode)."""
    kwargs = {k: v for k, v in cfg_backbone.items() if k not in ADAPTER_ONLY}
    kwargs.update(pretrained=str(out), vocab_size=None)
    reloaded = instantiate(kwargs).eval()
    backbone.eval()
    x = torch.randint(0, backbone.vocab_size, (2, min(16, backbone.max_positions or 16) - 1))
    return (reloaded(x) - backbone(x)).abs().max().item()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="an unmask Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer (default: the data's)")
    parser.add_argument("--no-verify", action="store_true", help="skip the reload check")
    args = parser.parse_args(argv)

    ckpt = read(args.ckpt)
    cfg = ckpt["unmask_config"]
    cfg_backbone = dict(cfg["backbone"])
    if not is_hf_backbone(cfg_backbone.get("_target_")):
        raise SystemExit(f"backbone {cfg_backbone.get('_target_')} is not a Hugging Face backbone")
    state, prefix = backbone_state(ckpt["state_dict"], args.weights)

    backbone = instantiate(cfg_backbone, vocab_size=None)  # the pretrained vocabulary, then ours
    backbone.set_vocab_size(state[embedding_name(backbone)].shape[0])
    backbone.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(cfg, backbone, args.tokenizer)

    out = Path(args.out)
    backbone.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"exported {prefix.rstrip('.')} weights of {args.ckpt} to {out}")
    if not args.no_verify:
        diff = verify(backbone, out, cfg_backbone)
        print(f"reload check: max |logit difference| = {diff:.3g}")
        if diff > 1e-4:
            raise SystemExit("the exported folder does not reproduce the checkpoint's logits")
    return out


if __name__ == "__main__":
    main()
