"""Measures of generated video that hold for any model (the product's metrics). The shapes world's analytic
measures, which know its colours and shapes, are `custvid_core.world.measures`.

`metrics`: the papers' metrics as batched tensor functions; `measure`: all those a clip's inputs allow, each
encoder run once; `report`: scores as text, tables and a chart; `clip`: CLIP from a local folder."""
