"""lm-evaluation-harness's own CLI with our checkpoints registered as `--model unmask`.

    python scripts/lm_eval.py --model unmask --batch_size 32 \
        --model_args checkpoint=outputs/<run>/checkpoints/last.ckpt,mc_num=128 \
        --tasks lambada_openai,hellaswag,piqa,arc_easy

Every lm-eval option works (`--limit`, `--num_fewshot`, `--output_path`, `--include_path`,
`--gen_kwargs`, ...); `diffusion/evaluation/lm_eval.py` documents the model_args. Needs the
optional extra: `pip install -r requirements-extras.txt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named lm_eval.py: drop its folder from the path so `import lm_eval` finds the
# package, and put the repository first so our modules import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]
sys.path.insert(0, str(ROOT))

from lm_eval.__main__ import cli_evaluate  # noqa: E402

import diffusion.evaluation.lm_eval  # noqa: E402,F401  (registers --model unmask)

if __name__ == "__main__":
    cli_evaluate()
