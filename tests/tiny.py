"""Command-line arguments of a tiny run: timm's test model at 32 px on the CPU, 64 training images.

Later options override earlier ones, so a test appends what it needs (``--epochs 1``, …).
Groups of a tiny split are far below the default minimum count, so every group enters the gaps
(``--min-group-count 1``); the minimum itself is tested in tests/test_metrics.py.
"""

TINY_RUN = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "32", "--device", "cpu",
            "--num-workers", "0", "--bootstrap", "20", "--min-group-count", "1"]  # fmt: skip
TINY_DATA = ["-D", "n_train=64", "-D", "n_val=48", "-D", "n_test=48"]
