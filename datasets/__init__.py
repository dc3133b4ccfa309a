"""Built-in datasets, registered through the ``fairbench.datasets`` entry-point group."""
