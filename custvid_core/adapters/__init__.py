"""What customizes a backbone, as parts (`parts.Part`): LoRA by role (peft, in ComfyUI's native LoRA file form),
the trigger embedding, the alignment projector, DualReal's adapters and StageBlender controller."""

from .dualreal import DualAdapterPart, DualRealWeights, load_dualreal, save_dualreal
from .embedding import TriggerEmbeddingPart
from .lora import (
    LoraAdapters,
    LoraPart,
    LoraSpec,
    LoraWeights,
    motion_lora,
    read_lora,
    save_lora,
    subject_lora,
    synmotion_motion_lora,
)
from .parts import Exported, Part, ProjectorPart, attached
from .stage_blender import StageBlenderPart, dualreal_parts

__all__ = ["DualAdapterPart", "DualRealWeights", "Exported", "LoraAdapters", "LoraPart", "LoraSpec", "LoraWeights",
           "Part", "ProjectorPart", "StageBlenderPart", "TriggerEmbeddingPart", "attached", "dualreal_parts",
           "load_dualreal", "motion_lora", "read_lora", "save_dualreal", "save_lora", "subject_lora",
           "synmotion_motion_lora"]
