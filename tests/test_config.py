"""src.config: TOML + flags -> a validated, resolved ExperimentConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from src import config as cfg
from src import flags

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_config_flags(parser)
    return parser.parse_args(argv)


def test_every_experiment_file_loads():
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert len(files) >= 2
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
    c = flags.load_from_args(REPO / "experiments" / "demo2_tinyconv_tinydata.toml", args)
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


def test_pascal_flags_set_dataset_and_model_arguments():
    args = _parse(
        ["--voc-dir", "v", "--image-size", "128", "--no-pretrained", "--max-batches", "3"]
    )
    demo3 = flags.load_from_args(REPO / "experiments" / "demo3_vgg16_pascal.toml", args)
    assert demo3.data.args["voc_dataset_dir"] == str(Path("v").resolve())
    assert demo3.data.args["image_size"] == demo3.model.args["image_size"] == 128
    assert demo3.model.args["pretrained"] is False  # VGG16 takes `pretrained`
    assert demo3.train.max_batches == 3
    demo4 = flags.load_from_args(REPO / "experiments" / "demo4_vgg16customizable_pascal.toml", args)
    assert demo4.model.args["vgginit"] == "random"  # VGG16Customizable takes `vgginit`
    assert cfg.load(REPO / "experiments" / "demo3_vgg16_pascal.toml").train.max_batches == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "64"], "--image-size does not apply to"),
        (["--no-pretrained"], "--no-pretrained does not apply to the model"),
        (["--voc-dir", "x"], "--voc-dir does not apply to the dataset"),
        (["--max-batches", "-1"], r"\[train\] max_batches must be 0"),
    ],
)
def test_flags_that_do_not_apply_are_errors_not_silent(argv, message):
    demo2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
    with pytest.raises(cfg.ConfigError, match=message):
        flags.load_from_args(demo2, _parse(argv))


def test_an_empty_sbd_dir_flag_leaves_sbd_out():
    demo3 = REPO / "experiments" / "demo3_vgg16_pascal.toml"
    assert flags.load_from_args(demo3, _parse(["--sbd-dir", ""])).data.args["sbd_dataset_dir"] == ""
    default = flags.load_from_args(demo3, _parse([])).data.args["sbd_dataset_dir"]
    assert default == str(REPO / "data" / "sbd")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_that_are_accepted(device):
    assert cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml", {"run.device": device})


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "tpu"])
def test_other_device_names_are_one_line_naming_the_choices(device):
    with pytest.raises(cfg.ConfigError, match="is not one of auto, cpu, cuda, cuda:N"):
        cfg.load(REPO / "experiments" / "demo2_tinyconv_tinydata.toml", {"run.device": device})


def test_devices_this_machine_lacks_are_one_clear_error():
    import torch

    from src.build import pick_device
    from src.config import ConfigError

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
