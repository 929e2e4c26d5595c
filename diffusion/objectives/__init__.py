"""Objectives (parameterizations): one class per objective, sharing `AbsorbingDiffusion`."""
