"""Evaluation home: what a trained model is measured by.

- `likelihood`: the NELBO / perplexity of a split (`mode=ppl_eval`) and MDLM's zero-shot table.
- `sampling`: the sampling loop (samples, timings, trajectories) and `mode=sample_eval`.
- `judges`: generative perplexity under a judge LM, and sample entropy.
- `prompted`: prompted generation (`mode=generate`): prompts in, answers out, the live view.
- `lm_eval`: a checkpoint as lm-evaluation-harness's model "unmask" (imports lm_eval).
- `output`: the run directory's JSON and sample files.

Every entry point builds through `diffusion/build.py`; nothing here imports main.py.
"""

from diffusion.evaluation.judges import (
    GenPPLJudge,
    JudgeLoadError,
    ModelJudge,
    judge_texts,
    judge_windows,
    sample_entropy,
)

__all__ = [
    "GenPPLJudge",
    "JudgeLoadError",
    "ModelJudge",
    "judge_texts",
    "judge_windows",
    "sample_entropy",
]
