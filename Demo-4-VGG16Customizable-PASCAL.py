"""Demo-4: VGG16Customizable on PASCAL, the grid conv_type x vgginit (6 runs).

    python Demo-4-VGG16Customizable-PASCAL.py --data-dir data/VOC --sbd-dir data/SBD
    python Demo-4-VGG16Customizable-PASCAL.py --conv-types 512to64_1x1 --vgginits random

Each cell of the grid is a child run of one parent MLflow run, whose summary table
(`summary/children.csv`) lists every cell's best validation AUROC and AP.
Settings: experiments/demo4_vgg16customizable_pascal.toml.
"""

import sys
from pathlib import Path

from models.components import CONV_TYPES
from src.config import load_from_args
from src.multirun import run_children
from src.run_experiment import make_parser, one_line, user_errors

VGGINITS = ("random", "pretrained")

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def main(argv: list[str] | None = None) -> int:
    config_path = (
        Path(__file__).resolve().parent / "experiments" / "demo4_vgg16customizable_pascal.toml"
    )
    parser = make_parser(str(config_path), __doc__.splitlines()[0])
    parser.add_argument("--conv-types", nargs="+", default=list(CONV_TYPES), choices=CONV_TYPES)
    parser.add_argument("--vgginits", nargs="+", default=list(VGGINITS), choices=VGGINITS)
    args = parser.parse_args(argv)
    try:
        config = load_from_args(args.config, args)
        cells = [
            (f"{conv}-{init}", {"model.args.conv_type": conv, "model.args.vgginit": init})
            for conv in args.conv_types
            for init in args.vgginits
        ]
        run_children(config, cells, f"{config.run.run_name}-grid", {"grid": "conv_type x vgginit"})
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
