"""CustVid for ComfyUI: customized video generation (your subject, a given motion) on Wan.

ComfyUI loads this file; the nodes live in `nodes/`, the host-free library in `custvid_core/`.
"""

try:
    import comfy_api  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    # Imported as a plain package (the test runner, a Python user of custvid_core): no nodes.
    comfy_api = None

if comfy_api is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
