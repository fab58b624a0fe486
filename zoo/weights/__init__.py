"""Layer 2: pretrained weights: where they come from (URL, file, package, Hugging Face Hub),
download, hash check, cache and key conversion. Imports ``zoo.core`` and ``zoo.plugins``.
"""
