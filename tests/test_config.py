"""src.config: TOML + flags -> a validated, resolved ExperimentConfig."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

import src.cli as cli
import src.config as cfg

REPO = Path(__file__).resolve().parent.parent
DEMO2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
DEMO3 = REPO / "experiments" / "demo3_vgg16_pascal.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def _parser(config: Path | None = DEMO2) -> cli.FlagParser:
    """The parser of a Demo (`--config` with a default) or, for None, of
    `python -m src.run_experiment` (the experiment file as a positional)."""
    parser = cli.FlagParser(prog="demo")
    if config is None:
        parser.add_argument("config")
    else:
        parser.add_argument("--config", default=str(config))
    cli.add_config_flags(parser)
    return parser


def _parse(argv: list[str], config: Path | None = DEMO2) -> argparse.Namespace:
    return _parser(config).parse_args(argv)


def test_every_experiment_file_loads():
    files = sorted(p for p in (REPO / "experiments").glob("*.toml") if ".sweep." not in p.name)
    assert len(files) >= 2  # a sweep's space file (X.sweep.toml) is checked by src.sweep.command
    for path in files:
        c = cfg.load(path)
        assert ":" in c.data.dataset and ":" in c.model.model


def test_tutorial_defaults_and_demo2_values():
    c = cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml")
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.momentum) == ("SGD", 1e-3, 0.99)
    assert c.optimizer.weight_decay == 1e-7
    assert c.model.model == "models.custom_models_base:TinyConv"
    assert c.run.results_dir == str(REPO / "results")  # relative to the repo, not the cwd


def test_unknown_key_names_the_key(tmp_path):
    path = _write(tmp_path, "[train]\nepochs = 3\nepochz = 4\n")
    with pytest.raises(cfg.ConfigError, match=r"\[train\] epochz"):
        cfg.load(path)


def test_unknown_section_names_it(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"\[trainer\]"):
        cfg.load(_write(tmp_path, "[trainer]\nepochs = 3\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"\[data\] batch_size must be of type int"):
        cfg.load(_write(tmp_path, '[data]\nbatch_size = "16"\n'))
    with pytest.raises(cfg.ConfigError, match=r"\[run\] use_test_set must be of type bool"):
        cfg.load(_write(tmp_path, "[run]\nuse_test_set = 1\n"))


def test_int_is_accepted_for_float_and_num_workers_auto(tmp_path):
    c = cfg.load(_write(tmp_path, '[optimizer]\nlr = 1\n[data]\nnum_workers = "auto"\n'))
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
    assert c.data.num_workers == "auto"
    with pytest.raises(cfg.ConfigError, match="num_workers"):
        cfg.load(_write(tmp_path, '[data]\nnum_workers = "many"\n'))


def test_predict_on_test_needs_use_test_set(tmp_path):
    with pytest.raises(cfg.ConfigError, match="use_test_set"):
        cfg.load(_write(tmp_path, '[run]\ntask = "predict_on_test"\n'))
    c = cfg.load(_write(tmp_path, '[run]\ntask = "predict_on_test"\nuse_test_set = true\n'))
    assert c.run.task == "predict_on_test"


def test_bad_choice_and_import_path(tmp_path):
    with pytest.raises(cfg.ConfigError, match="amp"):
        cfg.load(_write(tmp_path, '[train]\namp = "fp8"\n'))
    with pytest.raises(cfg.ConfigError, match="package.module:ClassName"):
        cfg.load(_write(tmp_path, '[model]\nmodel = "models.TinyConv"\n'))


def test_import_object_errors():
    with pytest.raises(cfg.ConfigError, match="module 'nosuchpkg' not found"):
        cfg.import_object("nosuchpkg.mod:X", "model")
    with pytest.raises(cfg.ConfigError, match="has no 'NoSuchNet'"):
        cfg.import_object("src.config:NoSuchNet", "model")


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.toml")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(_write(tmp_path, "[run\n"))


def test_flags_override_and_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _parse(
        [
            "--epochs",
            "7",
            "--lr",
            "0.5",
            "--num-workers",
            "2",
            "--data-dir",
            "mydata",
            "--results-dir",
            "out",
            "--set",
            "model.args.n_outputs=4",
            "--set",
            "run.run_name=x y",
        ]
    )
    c = cli.load_from_args(args.config, args)
    assert c.train.epochs == 7 and c.optimizer.lr == 0.5 and c.data.num_workers == 2
    assert c.data.args["data_dir"] == str(tmp_path / "mydata")
    assert c.run.results_dir == str(tmp_path / "out")
    assert c.model.args == {"n_outputs": 4}
    assert c.run.run_name == "x y"


def test_flat_and_toml_round_trip(tmp_path):
    c = cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml")
    flat = c.flat()
    assert flat["run.seed"] == 0 and flat["model.args.n_outputs"] == 3
    again = cfg.load(_write(tmp_path, cfg.to_toml(c)))
    assert again == c
    assert c.replace(**{"run.seed": 5}).run.seed == 5


def test_a_stored_config_holds_paths_inside_the_repository_relative_to_it(tmp_path):
    """What a run stores (params, config.toml, last.pt) reads the same in a moved clone: a path
    inside the repository relative to it, after `{repo}/` where a relative path means another
    folder (TinyData's labels_csv: the data folder's file); a path outside stays absolute."""
    tiny = REPO / "load_dataset" / "tiny_data"
    weights = {"class": "torchvision.transforms:Resize", "weights": str(REPO / "w.pt")}
    c = cfg.load(
        DEMO2,
        {
            "data.args.data_dir": "load_dataset/tiny_data",
            "data.args.labels_csv": str(tiny / "tiny_labels.csv"),
            "data.args.cache_dir": str(tmp_path / "cache"),
            "data.args.transform": {"class": "torchvision.transforms:Compose", "t": [weights]},
            "run.checkpoint": str(REPO / "results" / "x" / "best.pt"),
        },
    )
    assert c.run.results_dir == str(REPO / "results")  # the run itself uses absolute paths
    assert c.data.args["data_dir"] == str(tiny)
    stored = c.to_dict()
    assert (stored["run"]["results_dir"], stored["run"]["checkpoint"]) == (
        "results",
        "results/x/best.pt",
    )
    assert stored["data"]["args"] == {
        "data_dir": "load_dataset/tiny_data",
        "labels_csv": "{repo}/load_dataset/tiny_data/tiny_labels.csv",
        "cache_dir": str(tmp_path / "cache"),
        "transform": {
            "class": "torchvision.transforms:Compose",
            "t": [{**weights, "weights": "{repo}/w.pt"}],
        },
    }
    assert c.flat()["data.args.labels_csv"] == "{repo}/load_dataset/tiny_data/tiny_labels.csv"
    text = cfg.to_toml(c)
    assert str(REPO) not in text
    assert cfg.load(_write(tmp_path, text)) == c


def test_a_config_stored_with_absolute_paths_inside_the_repository_still_fits(tmp_path):
    """A run stored by an older version (absolute paths inside the repository) still resumes:
    its checkpoint's config and its MLflow params are compared as a run stores them now. A
    path that is not the config's is still a mismatch."""
    c = cfg.load(DEMO2, {"data.args.data_dir": "load_dataset/tiny_data"})
    old = cfg.flatten(dataclasses.asdict(c))
    assert old["data.args.data_dir"] == str(REPO / "load_dataset" / "tiny_data")
    assert cfg.config_mismatch(old, c) is None
    assert cfg.config_mismatch({k: str(v) for k, v in old.items()}, c, as_params=True) is None
    other = str(tmp_path / "tiny_data")
    assert cfg.config_mismatch({**old, "data.args.data_dir": other}, c) == (
        "data.args.data_dir",
        other,
        "load_dataset/tiny_data",
    )


def test_pascal_flags_set_dataset_and_model_arguments():
    argv = ["--voc-dir", "v", "--image-size", "128", "--no-pretrained", "--max-batches", "3"]
    args = _parse(argv, DEMO3)
    demo3 = cli.load_from_args(DEMO3, args)
    assert demo3.data.args["voc_dataset_dir"] == str(Path("v").resolve())
    assert demo3.data.args["image_size"] == demo3.model.args["image_size"] == 128
    assert demo3.model.args["pretrained"] is False  # VGG16 takes `pretrained`
    assert demo3.train.max_batches == 3
    demo4 = cli.load_from_args(REPO / "experiments" / "demo4_vgg16customizable_pascal.toml", args)
    assert demo4.model.args["vgginit"] == "random"  # VGG16Customizable takes `vgginit`
    assert cfg.load(REPO / "experiments" / "demo3_vgg16_pascal.toml").train.max_batches == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "64"], "--image-size does not apply to"),
        (["--no-pretrained"], "--no-pretrained does not apply to the model"),
        (["--max-batches", "-1"], r"\[train\] max_batches must be 0"),
    ],
)
def test_flags_that_do_not_apply_are_errors_not_silent(argv, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cli.load_from_args(DEMO2, _parse(argv))


def test_an_empty_sbd_dir_flag_leaves_sbd_out():
    args = _parse(["--sbd-dir", ""], DEMO3)
    assert cli.load_from_args(DEMO3, args).data.args["sbd_dataset_dir"] == ""
    default = cli.load_from_args(DEMO3, _parse([], DEMO3)).data.args["sbd_dataset_dir"]
    assert default == str(REPO / "data" / "sbd")


def test_help_lists_the_folder_flags_of_the_experiments_dataset(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"], DEMO3)
    pascal = capsys.readouterr().out
    assert "folders of the dataset load_dataset.custom_pascal:PascalVOC2012" in pascal
    for line in ["--voc-dir DIR", "--sbd-dir DIR", "--cache-dir DIR", "VOCdevkit/VOC2012"]:
        assert line in pascal
    assert "--data-dir" not in pascal
    with pytest.raises(SystemExit):
        _parse(["--help"], DEMO2)
    tiny = capsys.readouterr().out
    assert "--data-dir DIR" in tiny and "tiny_labels.csv" in tiny and "--voc-dir" not in tiny


def test_a_folder_flag_of_another_dataset_is_one_line_naming_the_dataset(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(["--voc-dir", "x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "error: --voc-dir is not a flag of this command and does not apply to the dataset "
        "load_dataset.custom_tiny:TinyData (its path flags: --data-dir, --labels-csv); see "
        "--help.\n"
    )


def test_a_command_reads_its_experiment_file_once(monkeypatch):
    """The parser reads the TOML for the dataset's folder flags; the config is made from the
    same tree, not from a second reading (a file edited in between would give two configs)."""
    reads = []

    def counted(path):
        reads.append(Path(path))
        return cfg.read_toml(path)

    monkeypatch.setattr(cli, "read_toml", counted)
    args = _parse(["--epochs", "2", "--voc-dir", "v"], DEMO3)
    c = cli.load_from_args(args.config, args)
    assert reads == [DEMO3]
    assert c.train.epochs == 2 and c.data.dataset == "load_dataset.custom_pascal:PascalVOC2012"
    cli.load_from_args(DEMO2, args)  # another file than the parser read: read here
    assert reads == [DEMO3, DEMO2]


def test_the_positional_experiment_file_may_follow_its_folder_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _parse(["--voc-dir", "v", "--epochs", "2", str(DEMO3), "--cache-dir", "c"], None)
    c = cli.load_from_args(args.config, args)
    assert c.data.args["voc_dataset_dir"] == str(tmp_path / "v")
    assert c.data.args["cache_dir"] == str(tmp_path / "c")
    assert c.train.epochs == 2


def test_an_unreadable_experiment_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse([str(tmp_path / "nope.toml"), "--voc-dir", "v"], None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: Config file ")


@pytest.mark.parametrize(
    "toml, arg, expected",
    [
        ("imagefolder_tinyconv.toml", "root", "d/{setname}"),  # the TOML's root has {setname}
        ("cifar10_tinyconv.toml", "root", "d"),  # TorchvisionClassification declares it
        ("demo2_tinyconv_tinydata.toml", "data_dir", "d"),
    ],
)
def test_data_dir_sets_the_datasets_folder_argument(tmp_path, monkeypatch, toml, arg, expected):
    monkeypatch.chdir(tmp_path)
    path = REPO / "experiments" / toml
    c = cli.load_from_args(path, _parse(["--data-dir", "d"], path))
    assert c.data.args[arg] == str(tmp_path / expected)


def test_the_flags_follow_a_dataset_set_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--set", "data.dataset=torchvision.datasets:ImageFolder", "--data-dir", "d"]
    c = cli.load_from_args(DEMO3, _parse(argv, DEMO3))
    assert c.data.dataset == "torchvision.datasets:ImageFolder"
    assert c.data.args["root"] == str(tmp_path / "d")
    with pytest.raises(SystemExit):
        _parse([*argv, "--voc-dir", "v"], DEMO3)
    assert "--voc-dir is not a flag" in capsys.readouterr().err


FORK = """
from torch.utils.data import Dataset


class Shapes(Dataset):
    path_flags = {"--labels-csv": ("labels_path", "the CSV of labels")}

    def __init__(self, setname, labels_path, root="data/shapes"):
        self.setname = setname


class Broken(Shapes):
    path_flags = {"--labels-csv": ("label_path", "a typo of labels_path")}
"""


def test_a_forked_dataset_brings_its_own_folder_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "fork_shapes.py").write_text(FORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    toml = DEMO2.read_text().replace("load_dataset.custom_tiny:TinyData", "fork_shapes:Shapes")
    path = _write(tmp_path, toml)
    args = _parse(["--labels-csv", "l.csv", "--data-dir", "d"], path)
    c = cli.load_from_args(path, args)
    assert c.data.args["labels_path"] == str(tmp_path / "l.csv")
    assert c.data.args["root"] == str(tmp_path / "d")  # the generic --data-dir: its `root`
    with pytest.raises(SystemExit):
        _parse(["--help"], path)
    assert "--labels-csv PATH" in capsys.readouterr().out
    broken = _write(tmp_path, toml.replace("fork_shapes:Shapes", "fork_shapes:Broken"))
    with pytest.raises(SystemExit):
        _parse([], broken)
    assert capsys.readouterr().err == (
        "error: fork_shapes:Broken.path_flags gives --labels-csv for the argument "
        "'label_path', which the class does not take.\n"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_that_are_accepted(device):
    assert cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml", {"run.device": device})


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "tpu"])
def test_other_device_names_are_one_line_naming_the_choices(device):
    with pytest.raises(cfg.ConfigError, match="is not one of auto, cpu, cuda, cuda:N"):
        cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml", {"run.device": device})


# The ends of the ranges src/config.py checks; one past each: tests/test_hostile_config.py.
RANGE_ENDS = [
    ("run.seed", 0),
    ("run.seed", 2**32 - 1),
    ("run.experiment_name", "e"),
    ("run.experiment_name", "e" * 255),
    ("run.run_name", ""),  # MLflow picks a name
    ("run.run_name", "r" * 250),
    ("run.register_model", "m" * 256),
    ("run.results_dir", "/tmp/" + "é" * 127 + "a"),  # a folder name of 255 bytes
    ("data.batch_size", 2**63 - 1),
]


@pytest.mark.parametrize(
    "key, value",
    RANGE_ENDS,
    ids=[f"{k}={len(v) if isinstance(v, str) else v}" for k, v in RANGE_ENDS],
)
def test_the_ends_of_each_range_are_accepted(key, value):
    assert cfg.load(DEMO2, {key: value}).flat()[key] == value


def test_the_seed_range_is_numpys():
    import numpy as np

    from src.train.build import seed_everything

    seed_everything(2**32 - 1)
    first = np.random.rand()
    seed_everything(2**32 - 1)
    assert np.random.rand() == first
    with pytest.raises(ValueError):
        seed_everything(2**32)


def test_devices_this_machine_lacks_are_one_clear_error():
    import torch

    from src.config import ConfigError
    from src.train.build import pick_device

    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda:0")
    else:
        with pytest.raises(ConfigError, match="numbered from 0"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_a_transform_table_in_data_args_survives_the_stored_toml():
    tomllib = cfg.tomllib  # tomli on Python 3.10

    c = cfg.load(REPO / "experiments" / "imagefolder_tinyconv.toml")
    transform = c.data.args["transform"]
    assert transform["class"] == "torchvision.transforms:Compose"
    assert transform["transforms"][0] == {
        "class": "torchvision.transforms:Resize",
        "size": [32, 32],
    }
    assert c.data.args["root"] == str(REPO / "data" / "my_images" / "{setname}")
    assert cfg.from_dict(tomllib.loads(cfg.to_toml(c))) == c


def test_the_old_name_data_task_is_read_as_data_problem_with_a_note(tmp_path, capsys):
    old = (REPO / "experiments" / "demo2_tinyconv_tinydata.toml").read_text()
    path = tmp_path / "old.toml"
    path.write_text(old.replace('problem = "multilabel"', 'task = "multiclass"'))
    cfg._renames_noted.clear()
    assert cfg.load(path).data.problem == "multiclass"
    cfg.load(path)
    assert capsys.readouterr().err.count("note: [data] task is now called [data] problem") == 1
    both = old.replace('problem = "multilabel"', 'problem = "multilabel"\ntask = "multilabel"')
    path.write_text(both)
    with pytest.raises(cfg.ConfigError, match="keep only problem"):
        cfg.load(path)


def test_an_optimizer_or_scheduler_name_is_checked_against_its_table(tmp_path):
    """The allowed names are the keys of src/train/build.py's tables, checked before any data
    is read, in the one-line form of every other choice."""
    from src.train.build import check_names

    c = cfg.load(DEMO2, {"optimizer.name": "Adamm", "data.args.data_dir": str(tmp_path / "none")})
    with pytest.raises(cfg.ConfigError) as e:
        check_names(c)
    assert str(e.value) == "Config key [optimizer] name = 'Adamm' is not one of SGD, Adam, AdamW."
    c = cfg.load(DEMO2, {"optimizer.scheduler": "linear"})
    with pytest.raises(cfg.ConfigError, match=r"\[optimizer\] scheduler = 'linear' is not one of"):
        check_names(c)


def test_a_fork_adds_an_optimizer_with_one_line_in_the_table(monkeypatch):
    """An optimizer gets the [optimizer] numbers its constructor takes: SGD lr, momentum and
    weight decay; Adam no momentum; a class added to the table the same way."""
    import torch

    import src.train.build as build

    model = torch.nn.Linear(2, 3)
    numbers = {"optimizer.lr": 0.5, "optimizer.momentum": 0.25, "optimizer.weight_decay": 0.125}
    sgd = build.build_optimizer(cfg.load(DEMO2, numbers), model).defaults
    assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (0.5, 0.25, 0.125)
    adam = build.build_optimizer(cfg.load(DEMO2, {**numbers, "optimizer.name": "Adam"}), model)
    assert isinstance(adam, torch.optim.Adam) and "momentum" not in adam.defaults
    monkeypatch.setitem(build.OPTIMIZERS, "RMSprop", torch.optim.RMSprop)
    rms = build.build_optimizer(cfg.load(DEMO2, {**numbers, "optimizer.name": "RMSprop"}), model)
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["momentum"] == 0.25
    step = cfg.load(DEMO2, {"optimizer.scheduler": "step", "optimizer.step_size": 2})
    assert isinstance(build.build_scheduler(step, adam), torch.optim.lr_scheduler.StepLR)
    assert build.build_scheduler(cfg.load(DEMO2), adam) is None


def test_the_loss_of_each_problem():
    """multilabel: BCE with logits; multiclass: cross-entropy of the one-hot label's class."""
    import torch

    from src.train.loop import make_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    assert make_loss("multiclass")(logits, one_hot) == expected
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot)
    assert make_loss("multilabel")(logits, one_hot) == bce
