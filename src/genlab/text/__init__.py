"""Masked discrete diffusion for text (MDLM): models, objective, samplers, recipes."""
