"""Any-to-any generation: ``<GEN>``/``<h>`` markers, the diffusers bridge, chat with images.

Nothing here imports diffusers until an image is generated.
"""
