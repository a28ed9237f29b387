"""CustVid core: the host-free library under the CustVid ComfyUI node pack.

It learns a user's subject (from a few photos) and a motion (from a few clips) on a video
diffusion model and generates with both. Importing this package is cheap: heavy libraries
(transformers, diffusers, torchvision models) are imported by the functions that need them.
"""

__version__ = "0.1.0"
