"""Layer 2: datasets and their preprocessing: sources, splits, transforms, augmentation and the
feature cache. Imports ``zoo.core`` and ``zoo.plugins``.
"""
