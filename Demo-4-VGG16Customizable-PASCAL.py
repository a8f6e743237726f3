"""Demo-4: VGG16Customizable on PASCAL, the grid conv_type x vgginit (6 runs).

    python Demo-4-VGG16Customizable-PASCAL.py --voc-dir data/voc --sbd-dir data/sbd
    python Demo-4-VGG16Customizable-PASCAL.py --conv-types 512to64_1x1 --vgginits random
    python Demo-4-VGG16Customizable-PASCAL.py --no-pretrained     # the 3 random-init cells

    python Demo-4-VGG16Customizable-PASCAL.py --workers 6 --devices 0,1,2,3,4,5  # 6 cells at once

Each cell of the grid is a child run of one parent MLflow run, whose summary table
(`summary/children.csv`) lists every cell's best validation AUROC and AP. The grid runs on
Optuna's GridSampler (src/sweep/): `--workers K` trains K cells at a time, each in its own
process, `--devices` gives each worker its own GPU; the same command after a stop goes on
(finished cells are kept, a stopped one resumes).
Settings: experiments/demo4_vgg16customizable_pascal.toml.
"""

import sys
from pathlib import Path

from models.components import CONV_TYPES
from models.custom_models_base import VGGINITS
from src.cli import group_hint, load_from_args, make_parser
from src.errors import ConfigError, UserError, print_user_error
from src.interrupts import exit_code
from src.sweep.command import WorkerFailed, add_sweep_flags, options_from_args, run_sweep
from src.sweep.multirun import log_summary
from src.sweep.report import cell_results
from src.sweep.space import grid_space

CONFIG = Path(__file__).resolve().parent / "experiments" / "demo4_vgg16customizable_pascal.toml"


def grid_vgginits(vgginits: list[str] | None, no_pretrained: bool) -> list[str]:
    """The vgginit values of the grid: both, or only 'random' with --no-pretrained."""
    if not no_pretrained:
        return vgginits or list(VGGINITS)
    if vgginits and "pretrained" in vgginits:
        raise ConfigError("--no-pretrained and --vgginits pretrained contradict each other.")
    return ["random"]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(str(CONFIG), __doc__.splitlines()[0])
    parser.add_argument("--conv-types", nargs="+", default=list(CONV_TYPES), choices=CONV_TYPES)
    parser.add_argument("--vgginits", nargs="+", choices=VGGINITS, help="default: both")
    add_sweep_flags(parser, grid=True)
    args = parser.parse_args(argv)
    try:
        if args.resume or args.seeds:
            flag = "--resume" if args.resume else "--seeds"
            raise ConfigError(
                f"{flag} does not apply to the Demo-4 grid; to go on with a stopped grid, run "
                "the same command again (finished cells are skipped, the stopped one resumes)."
            )
        config = load_from_args(args.config, args)
        vgginits = grid_vgginits(args.vgginits, args.no_pretrained)
        grid = {"model.args.conv_type": args.conv_types, "model.args.vgginit": vgginits}
        parent_id, children = run_grid(config, grid, options_from_args(args))
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt as e:  # the grid said how it stopped and how to go on
        return exit_code(e)
    except WorkerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if children:
        print(f"\nParent run of the grid: {parent_id}")
        print(group_hint(config, children[0].experiment_id, parent_id))
    return 0


def run_grid(config, grid: dict[str, list[str]], options) -> tuple[str, list]:
    """The grid's cells as trials of one sweep; the parent gets the summary table with one
    row per cell, in grid order. Returns the parent run id and the cells' results."""
    space = grid_space(grid)
    cells = [("-".join(cell.values()), cell) for cell in space.grid_cells()]
    results: list = []

    def summary(parent, outcome) -> None:
        results.extend(cell_results(outcome, cells))
        log_summary(parent, cells, results)

    options.parent_name = f"{config.run.run_name}-grid"
    options.parent_tags = {"grid": "conv_type x vgginit"}
    options.child_names = "values"
    outcome = run_sweep(config, space, options, on_finish=summary)
    return outcome.parent_run_id, results


if __name__ == "__main__":
    sys.exit(main())
