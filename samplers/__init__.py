"""Samplers: turn a trained denoiser into text (one algorithm per file, see `base.Denoiser`)."""
