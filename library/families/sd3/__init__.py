"""Stable Diffusion 3 / 3.5 (Medium, Large, 3.5 Medium): the MMDiT in the SAI layout, the 16-channel
VAE, CLIP-L + CLIP-G + T5-XXL text conditioning, and the family plug-in of the shared training loop."""
