"""CustVid's ComfyUI nodes (V3 API). Thin: each node turns graph inputs into a custvid_core call."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import (
    control_nodes,
    dataset_nodes,
    dualreal_nodes,
    embedding_nodes,
    metric_nodes,
    representation_nodes,
    schedule_nodes,
    synmotion_nodes,
    training_nodes,
    world_nodes,
)
from .host import register_model_folders

# Before any schema lists files from these folders.
register_model_folders()


class CustVidExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*representation_nodes.NODES, *training_nodes.NODES, *embedding_nodes.NODES, *schedule_nodes.NODES,
                *world_nodes.NODES, *control_nodes.NODES, *dualreal_nodes.NODES,
                *synmotion_nodes.NODES, *metric_nodes.NODES, *dataset_nodes.NODES]


async def comfy_entrypoint() -> CustVidExtension:
    return CustVidExtension()
