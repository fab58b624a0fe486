"""Layer 5: fine-tuning: the run configuration, the device context, the Trainer and its
callbacks, evaluation, optimizers, schedulers, EMA and loggers. Imports the layers below.
"""
