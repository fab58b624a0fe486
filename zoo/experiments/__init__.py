"""Layer 6: comparisons of backbones and strategies against training from scratch: the sweep,
its analysis, the report, the plots and the demo. Imports the layers below.
"""
