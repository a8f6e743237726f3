"""Demo-3: VGG-16 on PASCAL VOC 2012 + SBD (20-class multi-label classification).

    python Demo-3-VGG16-PASCAL.py --voc-dir data/voc --sbd-dir data/sbd
    torchrun --nproc_per_node=4 Demo-3-VGG16-PASCAL.py        # several GPUs
    python Demo-3-VGG16-PASCAL.py --resume results/Demo-3-VGG16-PASCAL/<run id>

Settings: experiments/demo3_vgg16_pascal.toml (the tutorial's: SGD lr 1e-3, momentum 0.99,
weight decay 1e-7, batch 64, up to 100 epochs, patience 15). Data: data_README.md.
"""

import sys
from pathlib import Path

from src.cli import main

if __name__ == "__main__":
    config = Path(__file__).resolve().parent / "experiments" / "demo3_vgg16_pascal.toml"
    sys.exit(main(default_config=str(config), description=__doc__.splitlines()[0]))
