"""Applying LoRAs with a strength that changes over the sampling steps (SMRABooth's sparse timing)."""

from __future__ import annotations

import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..custvid_core.control.strength import ScheduledLora, StrengthSchedule, step_fraction
from ..custvid_core.errors import InputError

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
        if lora is None:
            if lora_name == "(use lora input)":
                raise InputError("lora_name", "no LoRA file chosen and the lora input is not connected",
                                 "a file from models/loras, or a connected lora input")
            lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
        text = PRESETS[preset] or schedule
        try:
            parsed = StrengthSchedule.parse(text)
        except InputError as e:
            raise InputError("schedule", e.problem, e.expected) from e
        if parsed.is_constant:  # merged, exactly as the stock LoRA loader does it
            return io.NodeOutput(comfy.sd.load_lora_for_models(model, None, lora, parsed.at_fraction(0.0), 0)[0])
        scheduled = ScheduledLora(lora, parsed)
        patched = model.clone()
        known = set(patched.model.state_dict())
        missing = [m for m in scheduled.layers if f"{m}.weight" not in known]
        if missing:
            raise InputError("lora", f"'{missing[0]}' is not a layer of this model",
                             "a LoRA made for this model (same architecture and size)")
        for module in scheduled.layers:
            patched.add_weight_wrapper(f"{module}.weight", scheduled.weight_function(module))

        def follow_schedule(executor, x, t, *args, **kwargs):
            options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
            scheduled.set_progress(step_fraction(float(t.max()), options.get("sample_sigmas")))
            return executor(x, t, *args, **kwargs)

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                     f"custvid_lora_schedule_{id(scheduled)}", follow_schedule)
        return io.NodeOutput(patched)


NODES = [ApplyLoRASchedule]
