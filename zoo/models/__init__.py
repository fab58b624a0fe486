"""Layer 3: models built from a registered backbone: construction, head swap, layer groups and
the freeze strategies that plan which groups learn. Imports the layers below.
"""
