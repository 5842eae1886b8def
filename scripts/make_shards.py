"""Write an ImageFolder tree or a torchvision-style dataset as WebDataset shards + index.json.

    python scripts/make_shards.py data/flowers data/flowers-shards --num_shards=64 --workers=4
    python scripts/make_shards.py torchvision.datasets.CIFAR10 out/ --root=data/cifar --train=True

The same as `python -m launcher shards ...`; `--help` lists every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launcher.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["shards", *sys.argv[1:]])
