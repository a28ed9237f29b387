"""Adapters that customize a backbone: LoRA by role (peft), in ComfyUI's native LoRA file form."""

from .lora import LoraAdapters, LoraSpec, LoraWeights, motion_lora, read_lora, save_lora, subject_lora

__all__ = ["LoraAdapters", "LoraSpec", "LoraWeights", "motion_lora", "read_lora", "save_lora", "subject_lora"]
