"""Plugin options: one declaration (a frozen dataclass), one reader, one error style, checked up front."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.hookspecs import KINDS
from pchmr.core.contracts.options import (
    NoOptions,
    declared_options,
    describe_options,
    option,
    option_error,
    read_options,
)
from pchmr.core.engine.config import RunConfig
from pchmr.core.engine.preparation import check_plugins
from pchmr.core.engine.registry import get_registry


@dataclass(frozen=True)
class Toy:
    """Every kind of field the reader reads."""

    size: int = option(help="a required count", low=1)
    alpha: float = option(0.5, low=0.0, low_open=True, help="open at 0")
    share: float = option(0.5, low=0.0, high=1.0, high_open=True, help="[0, 1)")
    keep_ratio: float = option(0.8, low=0.0, high=1.0, low_open=True, key="keep_ratio", help="(0, 1], snake key")
    flag: bool = option(False, help="a switch")
    mode: str = option("fast", choices=("fast", "exact"), help="a choice")
    count: int | float = option(1.0, help="a count or a fraction")
    limit: float | None = option(None, low=0.0, low_open=True, default_text="no limit", help="optional")

    def __post_init__(self) -> None:
        if self.mode == "exact" and self.flag:
            raise ValueError("'flag' applies to mode fast, not exact")


def read(**values: object) -> Toy:
    return read_options(Toy, {"size": 2, **values}, plugin="toy", kind="keypoint_source")


def test_values_are_coerced_by_the_declared_type() -> None:
    got = read(size="3", alpha="0.25", flag="TRUE", count=4, limit=2)
    assert (got.size, got.alpha, got.flag, got.count, got.limit) == (3, 0.25, True, 4, 2.0)
    assert type(got.count) is int and type(read(count=0.5).count) is float, "int | float keeps ints and floats"
    assert read(size=4.0).size == 4 and read(flag="false").flag is False and read(flag=True).flag is True
    assert read().limit is None and read(limit=None).limit is None


def test_both_spellings_of_a_key_are_read_and_the_declared_key_is_printed() -> None:
    assert read(**{"keep-ratio": 0.5}).keep_ratio == 0.5
    assert read(keep_ratio=0.5).keep_ratio == 0.5
    with pytest.raises(OptionError, match=r"toy keypoint source option 'keep_ratio' must be .*, got 2"):
        read(**{"keep-ratio": 2})
    with pytest.raises(OptionError, match="option 'keep_ratio' is given twice, as 'keep_ratio' and 'keep-ratio'"):
        read(**{"keep_ratio": 0.5, "keep-ratio": 0.5})


def test_an_unknown_key_is_refused_with_the_known_keys_and_the_closest_one() -> None:
    with pytest.raises(
        OptionError,
        match=r"toy keypoint source has no option 'alpah' \(did you mean 'alpha'\?\); its options are: size, alpha, "
        r"share, keep_ratio, flag, mode, count, limit\. `pchmr plugins --options toy` describes them",
    ):
        read(alpah=1)
    with pytest.raises(OptionError, match=r"has no options 'x', 'y'; its options are"):
        read(x=1, y=2)
    with pytest.raises(OptionError, match=r"^iid partitioner takes no options, got 'alpha'$"):
        read_options(NoOptions, {"alpha": 1}, plugin="iid", kind="partitioner")
    assert read_options(NoOptions, None, plugin="iid", kind="partitioner") == NoOptions()
    with pytest.raises(OptionError, match=r"^lda partitioner options must be a table of key = value, got 3$"):
        read_options(NoOptions, 3, plugin="lda", kind="partitioner")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"size": 0}, r"'size' must be an integer >= 1, got 0"),
        ({"size": 2.5}, r"'size' must be an integer >= 1, got 2.5"),
        ({"size": True}, r"'size' must be an integer >= 1, got True"),
        ({"alpha": 0}, r"'alpha' must be a number > 0, got 0"),
        ({"alpha": "lots"}, r"'alpha' must be a number > 0, got 'lots'"),
        ({"alpha": float("inf")}, r"'alpha' must be a number > 0, got inf"),
        ({"share": 1.0}, r"'share' must be a number in \[0, 1\), got 1.0"),
        ({"share": -0.1}, r"'share' must be a number in \[0, 1\), got -0.1"),
        ({"keep_ratio": 0.0}, r"'keep_ratio' must be a number in \(0, 1\], got 0.0"),
        ({"flag": "yes"}, r"'flag' must be true or false, got 'yes'"),
        ({"flag": 1}, r"'flag' must be true or false, got 1"),
        ({"mode": "slow"}, r"'mode' must be one of fast, exact, got 'slow'"),
        ({"mode": 3}, r"'mode' must be one of fast, exact, got 3"),
        ({"limit": -1}, r"'limit' must be a number > 0, got -1"),
    ],
)
def test_a_bad_value_is_refused_in_one_wording(values: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=rf"^toy keypoint source option {message}$"):
        read(**values)


def test_range_ends_are_open_or_closed_as_declared() -> None:
    assert read(share=0.0).share == 0.0 and read(keep_ratio=1.0).keep_ratio == 1.0
    assert read(alpha=1e-12).alpha == 1e-12


def test_a_required_option_without_default_must_be_given() -> None:
    with pytest.raises(
        OptionError, match=r"toy keypoint source option 'size' is required: give size=VALUE, an integer >= 1"
    ):
        read_options(Toy, {}, plugin="toy", kind="keypoint_source")


def test_a_rule_between_options_is_refused_with_the_plugin_named() -> None:
    with pytest.raises(OptionError, match=r"^toy keypoint source option 'flag' applies to mode fast, not exact$"):
        read(mode="exact", flag=True)


def test_option_error_words_a_plugin_checked_rule_alike() -> None:
    error = option_error("lda", "partitioner", "label", "a label of this dataset (scene)", "colour")
    assert isinstance(error, OptionError)
    assert str(error) == "lda partitioner option 'label' must be a label of this dataset (scene), got 'colour'"


def test_describe_options_gives_typed_rows_in_declaration_order() -> None:
    rows = {row.key: row for row in describe_options(Toy)}
    assert list(rows) == ["size", "alpha", "share", "keep_ratio", "flag", "mode", "count", "limit"]
    assert (rows["size"].required, rows["size"].default_text, rows["size"].allowed) == (True, "required", ">= 1")
    assert (rows["alpha"].type, rows["alpha"].default, rows["alpha"].allowed) == ("float", 0.5, "> 0")
    assert rows["share"].allowed == "[0, 1)" and rows["keep_ratio"].allowed == "(0, 1]"
    assert (rows["flag"].type, rows["flag"].default_text, rows["flag"].allowed) == ("bool", "false", "true, false")
    assert rows["mode"].allowed == "fast, exact" and rows["count"].type == "int | float"
    assert (rows["limit"].type, rows["limit"].default_text) == ("float | None", "no limit")
    assert rows["alpha"].help == "open at 0"


def test_a_declaration_the_reader_cannot_read_is_refused() -> None:
    @dataclass(frozen=True)
    class ListOption:
        names: list = dataclasses.field(default_factory=list)

    @dataclass(frozen=True)
    class BadDefault:
        rate: float = option(-1.0, low=0.0, help="negative default")

    with pytest.raises(TypeError, match="options are bool, int, float, str"):
        describe_options(ListOption)
    with pytest.raises(TypeError, match=r"BadDefault.rate: the default -1.0 breaks its own rule \(a number >= 0\)"):
        describe_options(BadDefault)

    def factory() -> None: ...

    factory.options = {"rate": 1.0}  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="must be the dataclass of its options"):
        declared_options(factory)
    assert declared_options(lambda: None) is None


#: Built-in plugins by kind; every kind takes options, so every built-in declares them.
BUILTINS = [
    (info.kind, info.name) for kind in KINDS for info in get_registry().infos(kind) if info.distribution == "pchmr"
]


@pytest.mark.parametrize(("kind", "name"), BUILTINS, ids=[f"{k}:{n}" for k, n in BUILTINS])
def test_every_builtin_plugin_declares_its_options(kind: str, name: str) -> None:
    declared = declared_options(get_registry().get(kind, name))
    assert declared is not None, f"the {kind} '{name}' must expose its options class as factory.options"
    assert dataclasses.is_dataclass(declared) and declared.__dataclass_params__.frozen  # type: ignore[attr-defined]
    rows = describe_options(declared)
    assert all(row.help for row in rows), f"every option of {name} needs a help text"
    if not any(row.required for row in rows):  # the defaults read back as themselves
        assert read_options(declared, {}, plugin=name, kind=kind) == declared()


def test_the_engine_refuses_a_bad_option_of_any_chosen_plugin_before_data_are_prepared() -> None:
    cases = [
        (
            RunConfig(backbone="tore", backbone_options={"keep_ration": 0.5}),
            r"tore backbone has no option 'keep_ration'",
        ),
        (RunConfig(partitioner="lda", partition_options={"alpha": 0}), r"lda partitioner option 'alpha' must be"),
        (RunConfig(strategy="fedprox", strategy_options={"proximal-mu": -1}), r"fedprox strategy option 'proximal-mu'"),
        (RunConfig(privacy="dp", privacy_options={"clip": "big"}), r"dp privacy option 'clip' must be a number > 0"),
        (RunConfig(strategy="secagg", strategy_options={"backend": "x"}), r"secagg strategy option 'backend' must be"),
        (RunConfig(dataset_options={"2d-only": "beach"}), r"synthetic dataset option '2d-only' must name sources"),
        (
            RunConfig(dataset_options={"2donly": "studio"}),
            r"synthetic dataset has no option '2donly' \(did you mean '2d-only'",
        ),
        (RunConfig(dataset="h36m,coco", dataset_options={"2d-only": "coco"}), r"mixed dataset has no option '2d-only'"),
    ]
    for config, message in cases:
        with pytest.raises(OptionError, match=message):
            check_plugins(config)  # reads names and options only: no body model, no data


def test_dataset_options_reach_the_factory_with_mixeds_member_list() -> None:
    from pchmr.core.engine.components import dataset_resolution

    check_plugins(RunConfig(dataset_options={"2d_only": "outdoor,sports"}))
    check_plugins(RunConfig(dataset="h36m,coco"))  # mixed's own option, set by the engine
    assert dataset_resolution("synthetic", {"2d-only": "outdoor"}) == ("synthetic", {"2d-only": "outdoor"})
    assert dataset_resolution("h36m,coco") == ("mixed", {"datasets": "h36m,coco"})
    assert RunConfig(dataset_options={"2d-only": "indoor"}).to_dict()["dataset_options"] == {"2d-only": "indoor"}


def test_the_config_keeps_the_options_as_the_user_gave_them() -> None:
    config = RunConfig(backbone="tore", backbone_options={"keep-ratio": "0.5"}, strategy_options={})
    check_plugins(config)
    assert config.to_dict()["backbone_options"] == {"keep-ratio": "0.5"}, "config.json records what was typed"
