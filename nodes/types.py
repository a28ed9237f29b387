"""CustVid's socket types. Their names are part of saved workflows: never rename them."""

from comfy_api.latest import io

DinoModel = io.Custom("CUSTVID_DINO")
RaftModel = io.Custom("CUSTVID_RAFT")
SubjectRepresentation = io.Custom("CUSTVID_SUBJECT_REP")
MotionRepresentation = io.Custom("CUSTVID_MOTION_REP")
WorldText = io.Custom("CUSTVID_WORLD_TEXT")
VideoDataset = io.Custom("CUSTVID_VIDEO_DATASET")
SubjectDataset = io.Custom("CUSTVID_SUBJECT_DATASET")
Boxes = io.Custom("CUSTVID_BOXES")
TriggerEmbedding = io.Custom("CUSTVID_TRIGGER_EMBEDDING")
DualReal = io.Custom("CUSTVID_DUALREAL")
SynMotionEmbeddings = io.Custom("CUSTVID_SYNMOTION_EMBEDDINGS")
ClipModel = io.Custom("CUSTVID_CLIP")


def tokenizer_inputs(words: str) -> list:
    """The optional text encoder whose tokenizer finds `words` in a prompt (`token_roles` in host.py).

    Workflows saved before the shapes world's text encoder became a CLIP link a `world_text` input here (from the
    deprecated Load Shapes World). The frontend keeps such a saved link and sends it, so the nodes still take a
    `world_text` argument and use it as their clip."""
    return [io.Clip.Input("clip", optional=True,
                          tooltip=f"The text encoder of the prompt; its tokenizer finds the {words}.")]
