"""Built-in methods, registered through the ``fairbench.methods`` entry-point group."""
