"""Backbones: pure `nn.Module`s with the call `(x_t, sigma=None, attention_mask=None) -> logits`.

Nothing here imports the rest of unmask; objectives and samplers import models, never the reverse.
"""
