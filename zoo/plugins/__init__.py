"""Layer 1: the plugin layer: hook specifications, the pluggy manager, and the registry of
backbones and strategies the plugins register. Imports only ``zoo.core``.
"""
