"""Applying LoRAs with a strength that changes over the sampling steps (SMRABooth's sparse timing)."""

from __future__ import annotations

import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..custvid_core.control.strength import ScheduledStrengths, StrengthSchedule, UnmergedLora
from ..custvid_core.errors import InputError
from ..custvid_core.files import load_state_dict
from .comfy_sampling import drive_controls

CATEGORY = "CustVid/apply"
PRESETS = {"custom": None, "smrabooth_subject": "0:0.6, 0.3:0.8", "smrabooth_motion": "1.0"}


class ApplyLoRASchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_ApplyLoRASchedule",
            display_name="Apply LoRA with Step Schedule",
            category=CATEGORY,
            description="Applies a LoRA whose strength follows the sampling steps. A constant strength uses "
                        "ComfyUI's own LoRA patching (merged); a changing one is applied unmerged per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the LoRA to (not changed; a copy is returned)."),
                io.Combo.Input("lora_name", options=["(use lora input)", *folder_paths.get_filename_list("loras")],
                               tooltip="A LoRA file in models/loras, unless the lora input is connected."),
                io.Combo.Input("preset", options=list(PRESETS), default="custom",
                               tooltip="smrabooth_subject: 0.6 for the first 30% of steps, then 0.8. "
                                       "smrabooth_motion: 1.0 throughout. custom: the schedule below."),
                io.String.Input("schedule", default="1.0",
                                tooltip="Strength, or 'start:strength' pairs over the fraction of steps done, "
                                        "e.g. '0:0.6, 0.3:0.8'. Used when preset is custom."),
                io.LoraModel.Input("lora", optional=True, tooltip="A LoRA from a CustVid train node (optional)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_name, preset, schedule, lora=None) -> io.NodeOutput:
        source = "lora"
        if lora is None:
            if lora_name == "(use lora input)":
                raise InputError("lora_name", "no LoRA file chosen and the lora input is not connected",
                                 "a file from models/loras, or a connected lora input")
            source = "lora_name"
            lora = load_state_dict(folder_paths.get_full_path_or_raise("loras", lora_name), "lora_name")
        text = PRESETS[preset] or schedule
        try:
            parsed = StrengthSchedule.parse(text)
        except InputError as e:
            raise InputError("schedule", e.problem, e.expected) from e
        _check_fits(model, lora, source)
        if parsed.is_constant:  # merged, exactly as the stock LoRA loader does it
            return io.NodeOutput(comfy.sd.load_lora_for_models(model, None, lora, parsed.at(0.0), 0)[0])
        unmerged = UnmergedLora(lora, input_name=source)
        patched = drive_controls(model, [ScheduledStrengths(unmerged, {unmerged.name: parsed})],
                                 f"custvid_lora_schedule_{id(unmerged)}")
        for module in unmerged.layers:
            patched.add_weight_wrapper(f"{module}.weight", unmerged.weight_function(module))
        return io.NodeOutput(patched)


def _check_fits(model, lora: dict, input_name: str) -> None:
    """Every layer of the LoRA is a layer of this model, with its sizes: ComfyUI's loader would skip the others
    with only a console warning, and the LoRA would apply as less than it is, or as nothing."""
    import comfy.lora

    expected = "a LoRA made for this model (the same architecture and size)"
    if not isinstance(lora, dict) or not lora:
        raise InputError(input_name, "holds no LoRA weights", expected)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    layers = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in lora}  # '<layer>.lora_up.weight' etc.
    stray = sorted(layers - set(key_map))
    if stray:
        raise InputError(input_name, f"{len(stray)} of its {len(layers)} layers are not in this model, e.g. "
                         f"'{stray[0]}'", expected)
    weights = model.model.state_dict()
    for key, patch in comfy.lora.load_lora(lora, key_map, log_missing=False).items():
        weight = weights.get(key) if isinstance(key, str) else None
        if weight is None or getattr(patch, "name", None) != "lora":
            continue
        up, down = patch.weights[0], patch.weights[1]
        if up.shape[1] != down.shape[0]:
            raise InputError(input_name, f"its layer '{key.removesuffix('.weight')}' has factors of ranks "
                             f"{up.shape[1]} and {down.shape[0]}", "a LoRA whose up and down factors share a rank")
        if up.shape[0] != weight.shape[0] or down.shape[1:].numel() != weight.shape[1:].numel():
            raise InputError(input_name, f"its layer '{key.removesuffix('.weight')}' is {up.shape[0]} x "
                             f"{down.shape[1:].numel()}, the model's {weight.shape[0]} x {weight.shape[1:].numel()}",
                             expected)


NODES = [ApplyLoRASchedule]
