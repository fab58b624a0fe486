"""Layer 4: a trained model on disk and on a Hub: checkpoint folders, model cards, validation
of untrusted files, push and pull. Imports the layers below.
"""
