"""The shapes world: synthetic clips with exact ground truth, a tiny Wan base model, its encoders."""
