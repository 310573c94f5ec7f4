#!/usr/bin/env python
"""Former path of `examples/multistage/train_text_to_image.py` (same arguments): this file runs that script."""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multistage",
                                "train_text_to_image.py"), run_name="__main__")  # fmt: skip
