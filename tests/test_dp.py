"""The ``dp`` privacy plugin: the mechanism's numbers by hand and by statistics, the refusals,
and one real federated run that records ε per round and stops at the target."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.mechanism import Mechanism
from pchmr.core.contracts.strategy import (
    IncompatibleError,
    PrivacyBudgetExhausted,
    StrategyConfig,
    StrategyParts,
    UpdateInfo,
)
from pchmr.core.kit.accounting import epsilon
from pchmr.plugins.privacy.dp import (
    DPOptions,
    DPSGDStep,
    ServerSideDP,
    check_per_example_safe,
    clip_update,
    default_delta,
    dp,
    dp_fedavg_aggregate,
    dp_overhead,
    parse_options,
    privatize_update,
)

CONFIG = StrategyConfig(num_clients=100, per_round=10, num_rounds=5, seed=0)


def _fedavg_parts() -> StrategyParts:
    from pchmr.plugins.strategies.fedavg import fedavg

    return fedavg(StrategyConfig(num_clients=100, per_round=10, num_rounds=5, seed=0))


# -- the mechanism -------------------------------------------------------------------------
def test_clipping_is_exact_and_keeps_direction():
    zero = {"w": torch.zeros(2), "steps": torch.tensor(7)}
    clipped, norm = clip_update({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}, zero, clip=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert "steps" not in clipped, "integer tensors are not part of the update"
    small, norm = clip_update({"w": torch.tensor([0.3, 0.4]), "steps": torch.tensor(9)}, zero, clip=1.0)
    assert norm == pytest.approx(0.5)
    torch.testing.assert_close(small["w"], torch.tensor([0.3, 0.4], dtype=torch.float64))
    private = privatize_update({"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}, zero, 1.0, noise_std=0.0)
    torch.testing.assert_close(private["w"], torch.tensor([0.6, 0.8]))
    assert private["steps"].item() == 7 and private["w"].dtype == torch.float32


def test_aggregate_is_the_fixed_weight_estimator_without_noise():
    g = {"w": torch.tensor([1.0, 1.0])}
    states = [{"w": torch.tensor([4.0, 5.0])}, {"w": torch.tensor([1.1, 1.0])}]  # Δ = (3,4) → (0.6,0.8); (0.1,0)
    out = dp_fedavg_aggregate(g, states, clip=1.0, noise_multiplier=0.0)
    torch.testing.assert_close(out["w"], torch.tensor([1.0 + 0.35, 1.0 + 0.4]))


@pytest.mark.parametrize("z,clip,k", [(1.0, 1.0, 10), (0.7, 2.5, 4)])
def test_noise_std_over_many_draws_is_z_c_over_k(z, clip, k):
    # updates of zero: the aggregate minus the global model is pure noise, std z·C/k per coordinate;
    # 200k draws estimate a std to ±0.16 % (one standard error), so 1 % is ~6 standard errors
    n = 200_000
    g = {"w": torch.zeros(n)}
    gen = torch.Generator().manual_seed(1)
    server = dp_fedavg_aggregate(g, [g] * k, clip=clip, noise_multiplier=z, generator=gen)["w"].double()
    assert server.std().item() == pytest.approx(z * clip / k, rel=0.01)
    assert abs(server.mean().item()) < 5 * z * clip / k / math.sqrt(n)
    # client placement: each client adds z·C/sqrt(k); the uniform mean of k replies has z·C/k
    per_client = [privatize_update(g, g, clip, z * clip / math.sqrt(k), gen)["w"].double() for _ in range(k)]
    assert (sum(per_client) / k).std().item() == pytest.approx(z * clip / k, rel=0.01)


def test_server_side_wrapper_clips_weights_equally_and_hides_client_metrics(monkeypatch):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Flower messages outside a run need these
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    options = DPOptions(placement="server", clip=1.0, noise_multiplier=1e-9)
    seen = []
    server = ServerSideDP(_fedavg_parts().server, options, per_round=2, on_replies=seen.append)
    global_state = {"w": torch.zeros(2)}

    server.set_global(ArrayRecord(global_state))

    def reply(w, examples, pid):
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.tensor(w)}),
                    "metrics": MetricRecord({"num-examples": examples, "train-loss": 3.0, "partition-id": pid}),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )

    arrays, metrics = server.aggregate_train(1, [reply([3.0, 4.0], 100.0, 0.0), reply([0.1, 0.0], 1.0, 1.0)])
    # clipped (0.6, 0.8) and (0.1, 0): the EQUAL-weight mean, although the clients hold 100 and 1 examples
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.tensor([0.35, 0.4]), atol=1e-6, rtol=0)
    assert metrics is None
    assert all(
        dict(r.content["metrics"]) == {"num-examples": 1.0, "partition-id": float(i)} for i, r in enumerate(seen[0])
    )
    with pytest.raises(RuntimeError, match="2 updates arrived|the missing clients are unknown: DP-FedAvg cannot pad"):
        server.aggregate_train(2, [reply([0.0, 0.0], 1.0, 0.0)])  # no configure_train: whom to pad is unknown
    with pytest.raises(RuntimeError, match="calibrated for 2 updates, got 3"):
        server.aggregate_train(2, [reply([0.0, 0.0], 1.0, float(i)) for i in range(3)])


def test_client_level_dp_pads_a_failed_client_with_a_noise_only_zero_update(monkeypatch):
    """k = 4 sampled, one failed: the aggregate is (Σ clip(Δ_i) + 0 for the missing one + noise) / 4,
    the fixed denominator k the noise is calibrated for; ``dp-padded-updates`` says so."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    for placement in ("server", "client"):
        options = DPOptions(placement=placement, clip=10.0, noise_multiplier=1e-9)
        server = ServerSideDP(_fedavg_parts().server, options, per_round=4, on_replies=lambda replies: None)
        server.set_global(ArrayRecord({"w": torch.zeros(2)}))
        sent = [Message(RecordDict({}), dst_node_id=10 + i, message_type="train") for i in range(4)]
        for i, message in enumerate(sent):
            message.metadata.__dict__["_message_id"] = f"m{i}"
        server._sent = sent  # what configure_train handed out
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({"w": torch.tensor([4.0, 0.0])}),
                        "metrics": MetricRecord({"num-examples": 9.0}),
                    }
                ),
                reply_to=sent[i],
            )
            for i in (0, 1, 3)
        ]
        arrays, metrics = server.aggregate_train(1, replies)
        torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.tensor([3.0, 0.0]), atol=1e-6, rtol=0)
        assert dict(metrics) == {"dp-padded-updates": 1.0}, placement


class _FrozenBNNet(nn.Module):
    """A frozen pretrained "encoder" (conv + BatchNorm with small running variances) and a head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.encoder.requires_grad_(False)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.encoder[1].running_var.fill_(1e-4)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.train(False)  # frozen: eval mode for good, like FeatureEncoder.freeze
        return self

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=(2, 3)))


def test_fixed_entries_keep_the_global_values_and_get_no_noise():
    from pchmr.core.kit.state import fixed_state_keys

    net = _FrozenBNNet().eval()
    fixed = fixed_state_keys(net)
    assert fixed == {f"encoder.{k}" for k in net.encoder.state_dict()}, "frozen weights and BatchNorm statistics"
    assert not net.training and not net.head.training, "every submodule's mode is restored"
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    trained = {
        k: v + 0.01 if v.is_floating_point() and k.startswith("head") else v.clone() for k, v in global_state.items()
    }
    gen = torch.Generator().manual_seed(0)
    private = privatize_update(trained, global_state, clip=1.0, noise_std=0.05, generator=gen, fixed=fixed)
    for key in fixed:
        assert torch.equal(private[key], global_state[key]), key
    assert not torch.equal(private["head.weight"], trained["head.weight"]), "trained entries are noised"
    # without the fixed set, N(0, 0.05²) on variances of 1e-4 would go negative: clamped at 0 instead
    noised = privatize_update(trained, global_state, clip=1.0, noise_std=0.05, generator=gen)
    assert (noised["encoder.1.running_var"] >= 0).all() and not torch.equal(
        noised["encoder.1.running_var"], global_state["encoder.1.running_var"]
    )
    aggregate = dp_fedavg_aggregate(
        global_state, [trained] * 2, clip=1.0, noise_multiplier=1.0, generator=gen, fixed=fixed
    )
    assert all(torch.equal(aggregate[k], global_state[k]) for k in fixed)
    net.load_state_dict(private)
    assert torch.isfinite(net(torch.randn(2, 3, 8, 8))).all()


def test_the_plugin_learns_the_fixed_entries_from_the_module_it_prepares():
    net = _FrozenBNNet()
    parts = dp(
        _fedavg_parts(), StrategyConfig(100, 10, 5, 0, {"placement": "client", "clip": 1.0, "noise-multiplier": 5.0})
    )
    mechanism = parts.mechanism("dp")
    mechanism.prepare_module(net)
    assert parts.server.fixed.keys == {f"encoder.{k}" for k in net.encoder.state_dict()}
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    info = UpdateInfo(server_round=1, partition_id=0, num_examples=4, num_clients=100, per_round=10, config={})
    out = mechanism.transform_update({k: v.clone() for k, v in global_state.items()}, global_state, info)
    assert torch.equal(out["encoder.1.running_var"], global_state["encoder.1.running_var"])
    assert not torch.equal(out["head.bias"], global_state["head.bias"])


def test_dp_sgd_clips_each_example_and_the_surrogate_carries_the_gradient():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1, bias=False)

        def forward(self, images):
            return self.lin(images)

        def compute_losses(self, batch, out):
            return {"loss": out.sum()}

        def log(self, *args, **kwargs):
            pass

    module = Tiny()
    batch = {"image": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "meta": {"subject": ["a", "b"]}}  # gradients = inputs
    step = DPSGDStep(clip=1.0, noise_multiplier=0.0)
    gradient, _ = step.privatized_gradient(module, batch)
    torch.testing.assert_close(gradient[0], torch.tensor([[0.45, 0.6]]))  # ((0.6,0.8) + (0.3,0.4)) / 2
    module.zero_grad()
    step(module, batch, 0).backward()
    torch.testing.assert_close(module.lin.weight.grad, torch.tensor([[0.45, 0.6]]))
    assert step.counter.steps == 1
    noisy = DPSGDStep(clip=1.0, noise_multiplier=2.0)
    draws = torch.stack([noisy.privatized_gradient(module, batch)[0][0] for _ in range(400)])
    assert draws.std().item() == pytest.approx(2.0 * 1.0 / 2, rel=0.1)  # z·C/B


# -- options, refusals, budget -------------------------------------------------------------
class _ProtocolMechanism(Mechanism):
    """Stands for secure aggregation: a mechanism with a round protocol."""

    name = "protocol"

    def round_protocol(self) -> object:
        return object()


def test_options_and_default_delta():
    assert default_delta(10) == 1e-5 and default_delta(10**6) == pytest.approx(10 ** (-6.6))
    opts = parse_options({"clip": 0.5, "noise-multiplier": 2, "target-epsilon": 3, "placement": "client"}, CONFIG)
    assert (opts.clip, opts.noise_multiplier, opts.target_epsilon, opts.placement, opts.delta) == (
        0.5,
        2.0,
        3.0,
        "client",
        1e-5,
    )
    assert parse_options({"level": "example"}, CONFIG).placement is None, "example level has no placement"
    for bad, match in [
        ({"clip": 0}, "dp privacy option 'clip' must be a number > 0, got 0"),
        ({"placement": "edge"}, "dp privacy option 'placement' must be one of server, client, got 'edge'"),
        ({"level": "example", "placement": "client"}, "dp privacy option 'placement' applies to level=client"),
        ({"delta": 1.5}, r"dp privacy option 'delta' must be a number in \(0, 1\), got 1.5"),
        ({"noise": 1.0}, "dp privacy has no option 'noise'; its options are: level, placement"),
        ({"sampling-credit": "yes"}, "'sampling-credit' must be true or false, got 'yes'"),
    ]:
        with pytest.raises(OptionError, match=match):
            parse_options(bad, CONFIG)


def test_incompatible_combinations_are_refused():
    from pchmr.plugins.strategies.fedgh import fedgh

    with pytest.raises(IncompatibleError, match="comparing individual client updates"):
        dp(fedgh(CONFIG), CONFIG)
    protocol = _ProtocolMechanism()
    protocol_parts = StrategyParts(name="secagg(fedavg)", server=None, mechanisms=(protocol,))
    with pytest.raises(IncompatibleError, match="use --privacy-option placement=client"):
        dp(protocol_parts, CONFIG)
    with pytest.raises(IncompatibleError, match="example-level dp accounts .* round protocol hides; use level=client"):
        dp(protocol_parts, StrategyConfig(100, 10, 5, 0, {"level": "example"}))
    wrapped = dp(protocol_parts, StrategyConfig(100, 10, 5, 0, {"placement": "client"}))
    assert wrapped.mechanisms[0] is protocol and [m.name for m in wrapped.mechanisms] == ["protocol", "dp"]
    assert wrapped.mechanism("dp").train_config() == {"secagg-weighting": "uniform"}, (
        "the protocol must sum the noised updates unweighted"
    )
    with pytest.raises(IncompatibleError, match="BatchNorm layer"):
        check_per_example_safe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    check_per_example_safe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    from pchmr.core.kit.encoders import build_encoder

    frozen = build_encoder("small", 64).freeze()  # BatchNorm on running statistics: per-example
    check_per_example_safe(nn.Sequential(frozen, nn.Linear(3, 3)).eval())
    with pytest.raises(IncompatibleError, match="BatchNorm layer"):
        check_per_example_safe(build_encoder("small", 64).eval())  # trains in training mode
    parts = dp(_fedavg_parts(), StrategyConfig(100, 10, 5, 0, {"level": "example"}))
    with pytest.raises(IncompatibleError, match="BatchNorm"):
        parts.mechanism("dp").prepare_module(nn.Sequential(nn.BatchNorm1d(3)))


def test_dp_refuses_to_wrap_a_strategy_that_already_has_dp():
    once = dp(_fedavg_parts(), CONFIG)
    with pytest.raises(IncompatibleError, match=r"dp cannot wrap 'dp\(fedavg\)': it already has differential privacy"):
        dp(once, CONFIG)


def test_budget_steps_once_per_round_stops_at_target_and_survives_resume():
    cfg = StrategyConfig(100, 10, 50, 0, {"noise-multiplier": 1.1, "target-epsilon": 2.0})
    mechanism = dp(_fedavg_parts(), cfg).mechanism("dp")
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted, match=r"would raise ε to .* > target-epsilon 2"):
        for r in range(1, 51):
            mechanism.before_round(r)
            rounds = r
    assert epsilon(0.1, 1.1, rounds, 1e-5) <= 2.0 < epsilon(0.1, 1.1, rounds + 1, 1e-5)
    assert mechanism.round_metrics(rounds) == {
        "epsilon": pytest.approx(epsilon(0.1, 1.1, rounds, 1e-5), rel=1e-9),
        "delta": 1e-5,
    }
    resumed = dp(_fedavg_parts(), cfg).mechanism("dp")
    resumed.load_state_dict(mechanism.state_dict())
    assert resumed.round_metrics(rounds)["epsilon"] == mechanism.round_metrics(rounds)["epsilon"]
    with pytest.raises(PrivacyBudgetExhausted):
        resumed.before_round(rounds + 1)


def test_dp_overhead_reports_both_timings():
    out = dp_overhead(10_000, per_round=3, repeats=1)
    assert out["plain_s"] > 0 and out["dp_s"] > 0 and set(out) == {"plain_s", "dp_s", "dp_minus_plain_s"}


# -- a real run through the CLI ---------------------------------------------------------------
def test_cli_run_with_dp_records_epsilon_and_stops_at_target(tmp_path, pchmr_cache):
    from typer.testing import CliRunner

    from pchmr.cli.app import app

    out = tmp_path / "run"
    args = [
        "run",
        "--num-train",
        "48",
        "--num-test",
        "16",
        "--clients",
        "4",
        "--per-round",
        "2",
        "--rounds",
        "3",
        "--batch-size",
        "16",
        "--seed",
        "3",
        "--out",
        str(out),
        "--privacy",
        "dp",
        "--privacy-option",
        "placement=client",
        "--privacy-option",
        "clip=0.05",
        "--privacy-option",
        "noise-multiplier=0.5",
        "--privacy-option",
        "target-epsilon=15",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stopped early" in result.output and "target-epsilon 15" in result.output
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:  # q = 2/4, z = 0.5, δ = min(1e-5, 4^-1.1)
        assert r["epsilon"] == pytest.approx(epsilon(0.5, 0.5, r["round"], 1e-5), rel=1e-9) and r["delta"] == 1e-5
        assert "train_train_loss" not in r and "train_loss" not in r, "client losses are not released"
    final = json.loads((out / "final.json").read_text())
    assert final["round"] == 2 and "ε to 17.7" in final["stopped"]
    config = json.loads((out / "config.json").read_text())
    (described,) = config["strategy"]["mechanisms"]
    assert described["name"] == "dp" and described["placement"] == "client"
    assert final["mpjpe_mm"] != final["round0"]["mpjpe_mm"]
    # the frozen public encoder carries no client data: no noise, exactly the pretrained weights
    assert config["encoder"]["frozen"] is True
    pretrained = torch.load(config["encoder"]["weights"], weights_only=True)
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model[f"backbone.encoder.{key}"], value) for key, value in pretrained.items())


# -- example level (DP-SGD) end to end: a GroupNorm FastMETRO through a test-only backbone plugin --
GN_PLUGIN = '''
"""Test-only backbone: FastMETRO with a GroupNorm encoder (RunConfig has no backbone options)."""
import dataclasses

from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.plugins.backbones.fastmetro import make_fastmetro


def fastmetro_gn(body_model, options):
    return make_fastmetro(body_model, dataclasses.replace(options, extra={**options.extra, "encoder_norm": "group"}))


@hookimpl
def pchmr_backbones():
    return {"fastmetro-gn": fastmetro_gn}
'''


@pytest.fixture()
def groupnorm_backbone(tmp_path, monkeypatch):
    import os

    from pchmr.core.engine.registry import get_registry

    (tmp_path / "pchmr_gn_plugin.py").write_text(GN_PLUGIN)
    info = tmp_path / "pchmr_gn-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pchmr-gn\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pchmr]\nfastmetro-gn = pchmr_gn_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    existing = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + (os.pathsep + existing if existing else ""))  # Ray's workers
    get_registry(reload=True)
    yield
    monkeypatch.undo()
    get_registry(reload=True)


def test_example_level_dp_sgd_run_accounts_each_clients_steps(groupnorm_backbone, tmp_path, pchmr_cache):
    from pchmr.core.contracts.partition import load_partition
    from pchmr.core.engine.config import ConfigError, RunConfig
    from pchmr.core.engine.run import execute

    base = dict(num_train=48, num_test=16, clients=4, per_round=2, rounds=1, batch_size=4, local_epochs=1, seed=3)
    options = {"level": "example", "clip": 1.0, "noise-multiplier": 1.0}
    with pytest.raises((IncompatibleError, ConfigError), match="BatchNorm"):  # a trained BatchNorm CNN: refused
        execute(
            RunConfig(**base, privacy="dp", privacy_options=options, encoder_weights=None, out=str(tmp_path / "bn"))
        )
    result = execute(
        RunConfig(
            **base,
            backbone="fastmetro-gn",
            privacy="dp",
            privacy_options=options,
            encoder_weights=None,
            out=str(tmp_path / "gn"),
        )
    )
    rounds = result.run_dir.read_rounds()
    sizes = load_partition(result.run_dir.partition).sizes()
    # per sampled client: ceil(n_i / B) DP-SGD steps at q = B / n_i; ε is the worst client's
    expected = max(epsilon(min(1.0, 4 / sizes[c]), 1.0, math.ceil(sizes[c] / 4), 1e-5) for c in rounds[1]["clients"])
    assert rounds[1]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert "client_img_s" not in rounds[1] and "train_img_s" not in rounds[1]  # DP releases equal weights only
    assert json.loads(result.run_dir.config.read_text())["strategy"]["mechanisms"][0]["level"] == "example"
    assert result.final["mpjpe_mm"] != result.final["round0"]["mpjpe_mm"]
