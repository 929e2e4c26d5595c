"""Train ar, subs, sedd, d3pm (T=1000), bd3lm (blocks 4 and 16) and duo on the embedded default
with the same steps, batch and seed, evaluate each on the whole validation split, and print one
markdown table.

    python scripts/compare_parameterizations.py                 # the embedded default's budget
    python scripts/compare_parameterizations.py trainer.max_steps=300 --out runs/compare

Each run is a plain `main.py` subprocess (the same path a user takes); extra arguments are
Hydra overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run key (its folder and `--only` name) -> (table label, overrides)
RUNS = {
    "ar": ("ar", ["experiment=ar_shakespeare"]),
    "subs": ("subs (MDLM)", []),
    "sedd": ("sedd", ["parameterization=sedd", "time_conditioning=true", "sampler=analytic"]),
    "d3pm": (
        "d3pm (T=1000)",
        ["parameterization=d3pm", "T=1000", "time_conditioning=true", "sampler=ddpm"],
    ),
    "bd3lm4": ("bd3lm (block 4)", ["experiment=bd3lm_shakespeare"]),
    "bd3lm16": (
        "bd3lm (block 16)",
        ["experiment=bd3lm_shakespeare", "parameterization.block_size=16"],
    ),
    "duo": ("duo", ["experiment=duo_shakespeare"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "compare_parameterizations")
    p.add_argument(
        "--reuse", action="store_true", help="keep runs whose ppl_eval.json already exists"
    )
    p.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these rows")
    args = p.parse_args()
    rows = []
    for key, (name, extra) in RUNS.items():
        if args.only and key not in args.only:
            continue
        run_dir = args.out / key
        cmd = [
            sys.executable,
            "main.py",
            f"hydra.run.dir={run_dir}",
            "eval.samples_after_train=0",
            "checkpointing.resume_from_ckpt=false",
            *extra,
            *args.overrides,
        ]
        start = time.perf_counter()
        if not (args.reuse and (run_dir / "ppl_eval.json").exists()):
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        stats = json.loads((run_dir / "ppl_eval.json").read_text())
        stats.update(name=name, minutes=(time.perf_counter() - start) / 60)
        rows.append(stats)
    print(
        "\n| parameterization | val ppl | kind | nelbo/token | steps | tokens scored | minutes* |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kind = "bound" if r["bound"] else "exact"
        print(
            f"| {r['name']} | {r['ppl']:.2f} | {kind} | {r['nelbo']:.4f} | {r['steps']} | "
            f"{r['tokens']} | {r['minutes']:.1f} |"
        )
    print(f"\nunigram ppl of the validation split: {rows[0]['unigram_ppl']:.2f}")
    print("* wall minutes of this invocation (near 0 for reused runs)")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
