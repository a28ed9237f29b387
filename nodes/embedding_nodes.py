"""A subject's trigger embedding (learned by Train Subject LoRA): added to a prompt's conditioning at the
trigger words, saved to and loaded from models/custvid/trigger_embeddings."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..custvid_core.adapters.embedding import add_at, load_trigger_embedding, save_trigger_embedding
from ..custvid_core.errors import InputError
from . import representation_nodes, schedule_nodes, training_nodes, types
from .host import model_files, safetensors_path, token_roles

FOLDER = "custvid_trigger_embeddings"


def _learned(trigger_embedding):
    if trigger_embedding is None:
        raise InputError("trigger_embedding", "the train node learned none",
                         "trigger_embedding turned on in Train Subject LoRA, or a file from Load Trigger Embedding")
    return trigger_embedding


class ApplyTriggerEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_ApplyTriggerEmbedding",
            display_name="Apply Trigger Embedding",
            category=schedule_nodes.CATEGORY,
            description="Adds a subject's trigger embedding to a prompt's conditioning at its trigger words, as it "
                        "was added while the subject LoRA learned. The input conditioning is not changed.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive prompt, encoded by your text encoder."),
                types.TriggerEmbedding.Input("trigger_embedding",
                                             tooltip="From Train Subject LoRA or Load Trigger Embedding."),
                io.String.Input("prompt", default="", multiline=True,
                                tooltip="The prompt exactly as encoded into conditioning; its trigger words are "
                                        "found in it with the text encoder's tokenizer."),
                io.String.Input("trigger_words", default="",
                                tooltip="The trigger words as they appear in the prompt, with as many tokens as "
                                        "in training (e.g. 'sks dog'). Empty: the words it was trained at."),
                *types.tokenizer_inputs("trigger words"),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def execute(cls, conditioning, trigger_embedding, prompt, trigger_words="", clip=None,
                world_text=None) -> io.NodeOutput:
        learned = _learned(trigger_embedding)
        if not prompt.strip():
            raise InputError("prompt", "it is empty", "the prompt exactly as encoded into conditioning")
        words = " ".join(trigger_words.split()) or learned.trigger_words
        positions = token_roles(prompt, words, clip or world_text, words_input="trigger_words").subject
        rows = learned.residual.shape[0]
        if len(positions) != rows:
            raise InputError("trigger_words", f"'{words}' is {len(positions)} tokens in this prompt",
                             f"the words it was trained at ('{learned.trigger_words}', {rows} tokens)")
        out = []
        for context, extras in conditioning:
            if max(positions) >= context.shape[1]:
                raise InputError("prompt", f"its trigger words sit past the conditioning's {context.shape[1]} rows",
                                 "the prompt that was encoded into conditioning")
            out.append([add_at(context, positions, learned.residual), dict(extras)])
        return io.NodeOutput(out)


class SaveTriggerEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_SaveTriggerEmbedding",
            display_name="Save Trigger Embedding",
            category=training_nodes.CATEGORY_TRAIN,
            description="Writes a trigger embedding to models/custvid/trigger_embeddings, with the words it was "
                        "learned at. Keep it with the subject LoRA it was trained with.",
            is_output_node=True,
            inputs=[types.TriggerEmbedding.Input("trigger_embedding", tooltip="From Train Subject LoRA."),
                    io.String.Input("filename", default="custvid/my_subject",
                                    tooltip="Name under models/custvid/trigger_embeddings (sub-folders allowed); "
                                            ".safetensors is added. Naming it as its LoRA keeps the pair together."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name.")],
            outputs=[io.String.Output(display_name="trigger_embedding_name")],
        )

    @classmethod
    def execute(cls, trigger_embedding, filename, overwrite) -> io.NodeOutput:
        learned = _learned(trigger_embedding)
        root, path = safetensors_path(FOLDER, filename, "filename", overwrite)
        save_trigger_embedding(path, learned)
        return io.NodeOutput(path.relative_to(root).as_posix())


class LoadTriggerEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CustVid_LoadTriggerEmbedding",
            display_name="Load Trigger Embedding",
            category=representation_nodes.CATEGORY_LOADERS,
            description="Loads a trigger embedding saved by Save Trigger Embedding.",
            inputs=[io.Combo.Input("trigger_embedding_name", options=model_files(FOLDER),
                                   tooltip="A file in models/custvid/trigger_embeddings.")],
            outputs=[types.TriggerEmbedding.Output(display_name="trigger_embedding")],
        )

    @classmethod
    def execute(cls, trigger_embedding_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, trigger_embedding_name)
        return io.NodeOutput(load_trigger_embedding(path, "trigger_embedding_name"))


NODES = [ApplyTriggerEmbedding, SaveTriggerEmbedding, LoadTriggerEmbedding]
