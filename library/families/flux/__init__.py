"""FLUX.1 (dev/schnell): the DiT in the BFL layout, its 16-channel autoencoder, CLIP-L + T5-XXL
text conditioning, and the family plug-in of the shared training loop."""
