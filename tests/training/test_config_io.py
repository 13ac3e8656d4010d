"""Tests for training.config_io: nested sections, every supported type, every error, precedence and round trip."""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from training.config_io import ConfigError, config_to_dict, describe_keys, load_config, parse_override, save_config


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class DataConfig:
    kind: Literal["webdataset", "hf", "jsonl"] = "jsonl"
    paths: list[str] = field(default_factory=list)
    resolution: int = 512
    buckets: Optional[list[tuple[int, int]]] = None  # noqa: UP045 - the typing.Optional spelling is tested on purpose
    max_samples: int | None = None


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    compile: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tags: tuple[str, ...] = ()
    loss_weights: dict[str, float] = field(default_factory=dict)
    note: str | None = None


@dataclass
class Required:
    model_path: str
    steps: int = 10


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_without_yaml_or_overrides():
    assert load_config(Config, None, []) == Config()


def test_yaml_fills_nested_sections_and_every_type(tmp_path):
    path = write_yaml(
        tmp_path,
        """
name: exp1
seed: 3
compile: yes
optim:
  lr: 3e-4          # YAML 1.1 reads this as a string; float fields accept it
  betas: [0.8, 0.99]
  schedule: cosine
  weight_decay: 1   # an int is fine for a float field
data:
  kind: hf
  paths: [a, b]
  buckets: [[512, 512], [448, 576]]
  max_samples: null
tags: [x, y]
loss_weights: {mse: 1, aux: 0.5}
note: hello
""",
    )
    cfg = load_config(Config, path, [])
    assert cfg.name == "exp1" and cfg.seed == 3 and cfg.compile is True
    assert cfg.optim == OptimConfig(lr=3e-4, betas=(0.8, 0.99), weight_decay=1.0, schedule="cosine")
    assert isinstance(cfg.optim.weight_decay, float)
    assert cfg.data.paths == ["a", "b"] and cfg.data.kind == "hf" and cfg.data.max_samples is None
    assert cfg.data.buckets == [(512, 512), (448, 576)]
    assert cfg.tags == ("x", "y")
    assert cfg.loss_weights == {"mse": 1.0, "aux": 0.5}
    assert cfg.note == "hello"


def test_precedence_cli_beats_yaml_beats_defaults(tmp_path):
    path = write_yaml(tmp_path, {"seed": 5, "optim": {"lr": 0.01, "weight_decay": 0.1}})
    cfg = load_config(Config, path, ["--optim.lr=0.5", "seed=7"])
    assert cfg.optim.lr == 0.5  # CLI over YAML
    assert cfg.seed == 7  # dashes are optional
    assert cfg.optim.weight_decay == 0.1  # YAML over default
    assert cfg.optim.betas == (0.9, 0.999)  # default kept
    assert cfg.data == DataConfig()


def test_cli_mapping_replaces_a_mapping_field_but_updates_a_section(tmp_path):
    path = write_yaml(tmp_path, {"loss_weights": {"a": 1, "b": 2}, "optim": {"lr": 0.01, "weight_decay": 0.1}})
    cfg = load_config(Config, path, ["--loss_weights={c: 3}", "--optim={lr: 0.5}"])
    assert cfg.loss_weights == {"c": 3.0}  # a value: the command line's replaces the file's
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.5, 0.1)  # a section: updated key by key


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_non_finite_floats_are_refused_everywhere(tmp_path, value):
    for args in (["--optim.weight_decay=" + value], ["--optim.betas=[" + value + ", 0.9]"]):
        with pytest.raises(ConfigError, match=r"must be a finite number"):
            load_config(Config, None, args)
    with pytest.raises(ConfigError, match=r"'loss_weights.a' must be a finite number"):
        load_config(Config, write_yaml(tmp_path, f"loss_weights: {{a: {value}}}"), [])


def test_cli_values_of_each_type():
    cfg = load_config(
        Config,
        None,
        [
            "--name=123",  # str fields keep the raw text: no YAML int
            "--compile=1",
            "--optim.betas=[0.5, 0.6]",
            "--optim.schedule=cosine",
            "--data.paths=[s3/a.tar, b]",
            "--data.buckets=[[256, 256]]",
            "--data.max_samples=100",
            "--tags=[u]",
            "--loss_weights.mse=2",  # one key of a dict field
            "--note=none",  # Optional[str]: "none" means None
        ],
    )
    assert cfg.name == "123" and cfg.compile is True
    assert cfg.optim.betas == (0.5, 0.6) and cfg.optim.schedule == "cosine"
    assert cfg.data.paths == ["s3/a.tar", "b"] and cfg.data.buckets == [(256, 256)] and cfg.data.max_samples == 100
    assert cfg.tags == ("u",) and cfg.loss_weights == {"mse": 2.0} and cfg.note is None


@pytest.mark.parametrize("word,expected", [("true", True), ("no", False), ("0", False), ("YES", True)])
def test_cli_bool_words(word, expected):
    assert load_config(Config, None, [f"--compile={word}"]).compile is expected


def test_cli_none_for_optional_and_section_as_mapping(tmp_path):
    path = write_yaml(tmp_path, {"data": {"max_samples": 5, "resolution": 256}})
    cfg = load_config(Config, path, ["--data.max_samples=null", "--optim={lr: 0.2, schedule: cosine}"])
    assert cfg.data.max_samples is None and cfg.data.resolution == 256
    assert cfg.optim.lr == 0.2 and cfg.optim.schedule == "cosine"


def test_unknown_key_top_level(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'sed'; allowed keys at top level: .*'seed'") as e:
        load_config(Config, write_yaml(tmp_path, {"sed": 1}), [])
    assert "did you mean 'seed'" in str(e.value)


def test_unknown_key_nested_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Config, write_yaml(tmp_path, {"optim": {"lrr": 1}}), [])
    msg = str(e.value)
    assert "unknown config key 'optim.lrr'" in msg
    assert "allowed keys in 'optim': ['betas', 'lr', 'schedule', 'weight_decay']" in msg
    assert "did you mean 'optim.lr'" in msg


def test_unknown_key_nested_cli():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.resolutoin'.*allowed keys in 'data'"):
        load_config(Config, None, ["--data.resolutoin=3"])


def test_override_of_missing_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'model'; allowed keys at top level"):
        load_config(Config, None, ["--model.lr=1"])


def test_override_below_a_scalar_is_refused():
    with pytest.raises(ConfigError, match=r"cannot set 'seed.x': 'seed' holds a value of type int, not a section"):
        load_config(Config, None, ["--seed.x=1"])


@pytest.mark.parametrize(
    "data,pattern",
    [
        ({"seed": "abc"}, r"config key 'seed' expects int, got str 'abc'"),
        ({"seed": 1.5}, r"config key 'seed' expects int, got float 1.5"),
        ({"seed": True}, r"config key 'seed' expects int, got bool True"),
        ({"compile": 1}, r"config key 'compile' expects bool, got int 1"),
        ({"name": 5}, r"config key 'name' expects str, got int 5 \(quote it"),
        ({"optim": {"lr": "fast"}}, r"config key 'optim.lr' expects float, got str 'fast'"),
        ({"optim": {"betas": [0.9]}}, r"'optim.betas' expects tuple\[float, float\] \(2 items\), got 1"),
        ({"data": {"paths": "a"}}, r"config key 'data.paths' expects list\[str\], got str 'a'"),
        ({"data": {"paths": ["a", 3]}}, r"config key 'data.paths\[1\]' expects str, got int 3"),
        ({"data": {"max_samples": "x"}}, r"config key 'data.max_samples' expects int, got str 'x'"),
        ({"loss_weights": {"mse": "hi"}}, r"config key 'loss_weights.mse' expects float, got str 'hi'"),
        ({"loss_weights": [1]}, r"config key 'loss_weights' expects dict\[str, float\], got list"),
        ({"optim": 3}, r"section 'optim' must be a mapping of keys"),
    ],
)
def test_wrong_types_in_yaml(tmp_path, data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Config, write_yaml(tmp_path, data), [])


def test_wrong_types_on_cli():
    with pytest.raises(ConfigError, match=r"'seed' expects int, got str 'ten'"):
        load_config(Config, None, ["--seed=ten"])
    with pytest.raises(ConfigError, match=r"'compile' expects bool, got 'maybe'; use one of"):
        load_config(Config, None, ["--compile=maybe"])
    with pytest.raises(ConfigError, match=r"'seed' expects int, got NoneType None"):
        load_config(Config, None, ["--seed=null"])  # not Optional, so null is a wrong type
    with pytest.raises(ConfigError, match=r"could not parse the CLI value for 'data.paths'"):
        load_config(Config, None, ["--data.paths=[a, b"])


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'optim.schedule' must be one of \['constant', 'cosine'\], got"):
        load_config(Config, write_yaml(tmp_path, {"optim": {"schedule": "linear"}}), [])
    with pytest.raises(ConfigError, match=r"config key 'data.kind' must be one of \['webdataset', 'hf', 'jsonl'\]"):
        load_config(Config, None, ["--data.kind=tar"])


def test_post_init_validation_runs_and_names_section():
    with pytest.raises(ConfigError, match=r"invalid config in 'optim': lr must be > 0, got -1.0"):
        load_config(Config, None, ["--optim.lr=-1"])


def test_missing_required_key_and_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"missing required config key\(s\) \['model_path'\]"):
        load_config(Required, None, [])
    assert load_config(Required, None, ["--model_path=/m"]).model_path == "/m"
    with pytest.raises(ConfigError, match=r"bad override '--seed': expected the form --section.key=value"):
        load_config(Config, None, ["--seed"])
    with pytest.raises(ConfigError, match=r"bad override"):
        parse_override("--optim..lr=1")
    assert parse_override("a.b=c=d") == ("a.b", "c=d")


def test_yaml_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"must be a mapping of keys to values at top level, got list"):
        load_config(Config, write_yaml(tmp_path, "- 1\n- 2\n"), [])
    assert load_config(Config, write_yaml(tmp_path, ""), []) == Config()  # an empty file means all defaults


def test_round_trip(tmp_path):
    cfg = load_config(
        Config,
        None,
        [
            "--name=rt",
            "--optim.lr=2e-5",
            "--optim.schedule=cosine",
            "--data.buckets=[[512, 512], [384, 640]]",
            "--tags=[a, b]",
            "--loss_weights={mse: 1.5}",
            "--note=some text: with colon",
        ],
    )
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(Config, str(out), []) == cfg
    plain = config_to_dict(cfg)
    assert plain["optim"]["betas"] == [0.9, 0.999] and plain["tags"] == ["a", "b"]
    assert yaml.safe_load(out.read_text()) == plain


def test_non_init_fields_are_not_keys():
    @dataclass
    class WithDerived:
        steps: int = 2
        total: int = dataclasses.field(init=False, default=0)

        def __post_init__(self) -> None:
            self.total = self.steps * 2

    assert config_to_dict(WithDerived()) == {"steps": 2}
    with pytest.raises(ConfigError, match=r"unknown config key 'total'"):
        load_config(WithDerived, None, ["--total=3"])


@dataclass
class WithOptionalSection:
    ema: OptimConfig | None = None


def test_optional_section_is_created_by_an_override(tmp_path):
    assert load_config(WithOptionalSection, None, []).ema is None
    assert load_config(WithOptionalSection, None, ["--ema.lr=0.5"]).ema == OptimConfig(lr=0.5)
    path = write_yaml(tmp_path, {"ema": {"weight_decay": 0.2}})
    assert load_config(WithOptionalSection, path, ["--ema=null"]).ema is None
    assert load_config(WithOptionalSection, path, ["--ema.lr=0.5"]).ema == OptimConfig(lr=0.5, weight_decay=0.2)


def test_describe_keys_names_every_leaf_with_its_type_and_value():
    lines = describe_keys(load_config(Config, None, ["--optim.lr=0.5"]))
    assert "optim.lr  (float; default 0.5)" in lines  # the object's value: --help shows the defaults
    assert len(lines) == len(set(lines)) and not any(line.startswith("optim  (") for line in lines)  # sections descend
