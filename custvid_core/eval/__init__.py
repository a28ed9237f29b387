"""Measures of generated video that hold for any model (the product's metrics). The shapes world's analytic
measures, which know its colours and shapes, are `custvid_core.world.measures`."""
