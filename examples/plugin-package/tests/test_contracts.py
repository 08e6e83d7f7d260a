"""pchmr's contract suites, run on this package's plugins, plus a few checks of our own.

Run after installing the package (its plugins are found through the ``pchmr`` entry points)::

    pip install -e examples/plugin-package
    pytest examples/plugin-package

Anny's mesh pyramid is read from pchmr's default cache (``~/.cache/pchmr/pyramids``, where
``make_anny()`` and pchmr's own Anny tests keep it); building it the first time takes ~90 s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch

from pchmr.api import BackboneOptions, BodyModel, BodyModelSpec, PartitionError
from pchmr.testing import BackboneContract, ToyBodyModel, hmr_module, plugin_info, registered, toy_batch
from pchmr.testing.backbones import BackboneMaker
from pchmr.testing.partitioners import PartitionerContract, PartitionerFn, contract_data

DISTRIBUTION = "pchmr-example-plugins"
INPUT_SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: these are contract checks on small tensors, not a speed test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _backbone_factory():
    return registered("backbone", "example-cnn")


def _maker(variant: str = "S") -> BackboneMaker:
    factory = _backbone_factory()
    return lambda body_model: factory(body_model, BackboneOptions(variant=variant, input_size=INPUT_SIZE))


# ----------------------------------------------------------------------------- discovery
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("backbone", "example-cnn"),
        ("partitioner", "round-robin"),
        ("body_model", "example-ellipsoid"),
        ("dataset", "example-turntable"),
        ("annotator", "example-rest-fit"),
        ("privacy", "example-clip"),
    ],
)
def test_the_registry_finds_our_plugins_through_entry_points(kind: str, name: str) -> None:
    info = plugin_info(kind, name)
    assert info.distribution == DISTRIBUTION, f"{name} is provided by {info.distribution}, not {DISTRIBUTION}"
    assert info.entry_point == name


# ----------------------------------------------------------------------------- backbone
class TestExampleCNNOnTheToyBody(BackboneContract):
    """The suite's default body model (38/146/578 vertices)."""

    @pytest.fixture(scope="class")
    @classmethod
    def make_backbone(cls) -> BackboneMaker:
        return _maker()


class TestExampleCNNOnAnny(BackboneContract):
    """Anny (431/1,723/13,718 vertices), built by pchmr's own ``anny`` body-model plugin."""

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls) -> BodyModel:
        return registered("body_model", "anny")(BodyModelSpec())

    @pytest.fixture(scope="class")
    @classmethod
    def make_backbone(cls) -> BackboneMaker:
        return _maker()


def test_every_level_is_the_pyramid_upsampling_of_the_coarse_one() -> None:
    body = ToyBodyModel()
    torch.manual_seed(0)
    backbone = _maker()(body).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE))
    pyramid = body.pyramid()
    for level in range(1, pyramid.levels):
        expected = pyramid.upsample(out.vertices[0], from_level=0, to_level=level)
        torch.testing.assert_close(out.vertices[level], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("variant", "hidden"), [("S", 512), ("m", 1024), ("L", 2048)])
def test_variants_set_the_mlp_width(variant: str, hidden: int) -> None:
    backbone = _maker(variant)(ToyBodyModel())
    assert backbone.xyz_head.in_features == hidden
    assert backbone.xyz_head.out_features == 3 * (14 + 38)  # 14 toy joints + 38 coarse vertices


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (BackboneOptions(variant="XL"), r"unknown variant 'XL'; choose one of S, M, L"),
        (BackboneOptions(encoder="resnet50"), r"encoder 'resnet50' is not available.*'small'"),
        (BackboneOptions(encoder_weights="w.pt"), r"no pretrained weights to load from 'w.pt'"),
        (BackboneOptions(extra={"depth": 3}), r"example-cnn backbone has no option 'depth'; its options are: dropout"),
        (BackboneOptions(extra={"dropout": "lots"}), r"option 'dropout' must be a number in \[0, 1\), got 'lots'"),
        (BackboneOptions(extra={"dropout": 1.0}), r"option 'dropout' must be a number in \[0, 1\), got 1.0"),
        (BackboneOptions(input_size=8), r"needs input_size >= 16 pixels, got 8"),
    ],
)
def test_bad_backbone_options_are_refused_with_the_reason(options: BackboneOptions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _backbone_factory()(ToyBodyModel(), options)


def test_it_learns_one_toy_batch() -> None:
    """A baseline that trains: 12 Adam steps on one toy batch cut HMRModule's loss by half
    (measured: 538 → 117 after 10 steps)."""
    body = ToyBodyModel()
    torch.manual_seed(0)
    module = hmr_module(_maker()(body), body)
    batch = toy_batch(body, 2, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = module.compute_losses(batch, module(batch["image"]))["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss went from {losses[0]:.4f} to {losses[-1]:.4f} in 12 steps"


# ----------------------------------------------------------------------------- partitioner
def _round_robin() -> PartitionerFn:
    return registered("partitioner", "round-robin")


BAD_OPTIONS = {
    "stratify by a missing label": (
        {"stratify": "colour"},
        r"round-robin partitioner option 'stratify' must be a label of this dataset \(.*source.*\), got 'colour'",
    ),
    "stratify by a non-string": ({"stratify": 3}, r"option 'stratify' must be a string, got 3"),
}


class TestRoundRobin(PartitionerContract):
    @pytest.fixture(scope="class")
    @classmethod
    def partitioner(cls) -> PartitionerFn:
        return _round_robin()

    @pytest.fixture(scope="class")
    @classmethod
    def bad_options(cls) -> Mapping[str, tuple[Mapping[str, object], str]]:
        return BAD_OPTIONS


class TestStratifiedRoundRobin(TestRoundRobin):
    @pytest.fixture(scope="class")
    @classmethod
    def options(cls) -> Mapping[str, object]:
        return {"stratify": "source"}


def test_samples_are_dealt_in_turn() -> None:
    from pchmr_example_plugins.partitioner import deal_order

    clients = deal_order(np.array([7, 2, 9, 0, 5, 1, 8, 3, 6, 4]), 3)
    assert [c.tolist() for c in clients] == [[0, 4, 7, 8], [2, 3, 5], [1, 6, 9]]


def test_sizes_differ_by_at_most_one_with_the_first_clients_larger() -> None:
    partition = _round_robin()(contract_data(), 5, 0, {})  # 48 samples → 10, 10, 10, 9, 9
    assert partition.sizes().tolist() == [10, 10, 10, 9, 9]


def test_stratified_clients_get_equal_shares_of_every_source() -> None:
    data = contract_data()  # sources: 24 studio, 16 outdoor, 8 indoor
    partition = _round_robin()(data, 4, 0, {"stratify": "source"})
    for client in partition.clients:
        values, counts = np.unique(data.labels["source"][client], return_counts=True)
        assert dict(zip(values.tolist(), counts.tolist())) == {"studio": 6, "outdoor": 4, "indoor": 2}
    assert partition.params["stratify"] == "source"


@pytest.mark.parametrize(("clients", "message"), [(0, r"integer >= 1, got 0"), (True, r"integer >= 1, got True"),
                                                  (49, r"cannot deal 48 training samples to 49 clients")])  # fmt: skip
def test_bad_client_counts_are_refused(clients: int, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        _round_robin()(contract_data(), clients, 0, {})
