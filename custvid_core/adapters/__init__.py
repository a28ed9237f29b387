"""What customizes a backbone, as parts (`parts.Part`): LoRA by role (peft, in ComfyUI's native LoRA file form),
the trigger embedding, the alignment projector."""

from .embedding import TriggerEmbeddingPart
from .lora import LoraAdapters, LoraPart, LoraSpec, LoraWeights, motion_lora, read_lora, save_lora, subject_lora
from .parts import Exported, Part, ProjectorPart, attached

__all__ = ["Exported", "LoraAdapters", "LoraPart", "LoraSpec", "LoraWeights", "Part", "ProjectorPart",
           "TriggerEmbeddingPart", "attached", "motion_lora", "read_lora", "save_lora", "subject_lora"]
