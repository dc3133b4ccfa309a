"""fairbench: compare fairness methods for medical image classification on equal terms."""

__version__ = "0.1.0"
