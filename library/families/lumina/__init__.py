"""Lumina-Image 2.0: the NextDiT in the original single-file layout, Gemma-2 text conditioning (with
the optional system prompt), the FLUX.1 autoencoder, and the family plug-in of the shared training loop."""
