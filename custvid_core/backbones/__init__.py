"""Backbone descriptions: which modules of a video transformer play which role."""

from .wan import ROLES, WanBackbone, describe, diffusers_to_native_key

__all__ = ["ROLES", "WanBackbone", "describe", "diffusers_to_native_key"]
