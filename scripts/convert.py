"""Convert a published checkpoint into one of our .ckpt files, which every mode then uses.

    python scripts/convert.py --from mdlm_hf kuleshov-group/mdlm-owt --out mdlm-owt.ckpt
    python scripts/convert.py --from mdlm_ckpt mdlm.ckpt --out mdlm-ours.ckpt
    python scripts/convert.py --from auto sedd.ckpt --out sedd-ours.ckpt --disable-ema
    python main.py mode=ppl_eval eval.checkpoint_path=mdlm-owt.ckpt

SRC is a local file or folder, or a Hugging Face repo id (fetched into the hub cache).
`--from auto` detects the format from the files. The output is written atomically (a
temporary file, fsync, rename): an interrupted conversion never leaves a partial .ckpt.
`--override key=value` adjusts the composed config (e.g. `data=wikitext103`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from diffusion.checkpoint import AtomicCheckpointIO
    from models.formats import FORMATS, OURS, FormatError, load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from", dest="fmt", required=True, choices=["auto", OURS, *FORMATS], help="source format"
    )
    parser.add_argument("src", help="file, folder or Hugging Face repo id")
    parser.add_argument("--out", required=True, help="our .ckpt to write")
    parser.add_argument(
        "--disable-ema", action="store_true", help="evaluate the raw weights (MDLM .ckpt)"
    )
    parser.add_argument("--override", action="append", default=[], help="config override k=v")
    args = parser.parse_args(argv)
    try:
        ckpt = load_checkpoint(
            args.src,
            None if args.fmt == "auto" else args.fmt,
            use_ema=not args.disable_ema,
            overrides=args.override,
        )
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    AtomicCheckpointIO().save_checkpoint(ckpt, out)
    info = ckpt.get("unmask_format", {"format": OURS})
    n = sum(t.numel() for k, t in ckpt["state_dict"].items() if k.startswith("backbone."))
    print(f"wrote {out}: {info.get('format')} from {args.src}, {n / 1e6:.2f}M backbone parameters")
    for key in ("mask_id", "shift", "time_conditioning", "tokenizer", "length", "ema"):
        if key in info:
            print(f"  {key}: {info[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
