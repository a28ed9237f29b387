"""The benchmark, on the shapes world: customization methods (`customization`, read from `methods.toml`),
training-free controls (`control`) and the training and sampling cost ratios (`perf`)."""
