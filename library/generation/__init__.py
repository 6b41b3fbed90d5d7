"""Image generation helpers (``gen_img.py``): prompt syntax (dynamic prompts, A1111 weights, BREAK)
and prompt encoding into text-encoder conditioning."""
