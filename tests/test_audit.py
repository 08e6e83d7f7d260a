"""pchmr audit's target (pchmr.core.engine.audit.RunAudit) and the privacy plugins' server views."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pchmr.cli.app import app
from pchmr.core.engine.audit import AuditError, RunAudit


@pytest.fixture(scope="module")
def target(tiny_federated_run):
    return RunAudit(tiny_federated_run, seed=0)


def _norm(update):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def _cos(a, b):
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (_norm(a) * _norm(b))


@pytest.fixture(scope="module")
def updates(target):
    model = target.global_model("initial")
    batches = [target.samples("train", 2, partition=c) for c in (0, 1)]
    return [target.client_update(model, b.batch, steps=1) for b in batches]


def _torch_adamw_update(target, batch, steps):
    model = target.global_model("initial")
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=target.config.lr, weight_decay=target.config.weight_decay)
    for _ in range(steps):
        loss = model.compute_losses(batch, model(batch["image"]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_the_functional_client_update_is_torch_adamw(target):
    batch = target.samples("train", 3, partition=0).batch
    one = target.client_update(target.global_model("initial"), batch, steps=1)
    reference = _torch_adamw_update(target, batch, 1)
    assert one.keys() == reference.keys() and _norm(one) > 0
    assert max(float((one[k] - reference[k]).abs().max()) for k in one) < 1e-6
    # a second step: Adam divides each gradient entry by its own size, so entries whose gradient is at
    # float noise (~1e-9) may take either sign in either computation; all the others agree
    two, reference = (
        target.client_update(target.global_model("initial"), batch, steps=2),
        _torch_adamw_update(target, batch, 2),
    )
    ours, theirs = (torch.cat([u[k].flatten() for k in one]) for u in (two, reference))
    assert float(((ours - theirs).abs() > 1e-6).double().mean()) < 0.01
    assert _cos(two, reference) > 0.99999


def test_a_differentiable_update_keeps_the_graph_to_the_images(target):
    model = target.global_model("initial")
    batch = dict(target.samples("train", 1, partition=0).batch)
    batch["image"] = batch["image"].clone().requires_grad_(True)
    update = target.client_update(model, batch, steps=1, differentiable=True)
    (grad,) = torch.autograd.grad(sum(v.sum() for v in update.values()), batch["image"])
    assert grad.abs().sum() > 0


def test_plain_view_is_the_updates_and_their_weighted_mean(target, updates):
    view = target.server_view(updates, "plain", num_examples=[1, 3])
    assert view.setting == "plain"
    assert [_cos(u, v) for u, v in zip(updates, view.uploads, strict=True)] == pytest.approx([1.0, 1.0], abs=1e-12)
    for key in updates[0]:
        torch.testing.assert_close(view.total[key], (updates[0][key] + 3 * updates[1][key]) / 4)


def test_under_secure_aggregation_one_upload_is_noise_and_the_sum_is_the_mean(target, updates):
    view = target.server_view(updates, "secagg")
    for update, upload in zip(updates, view.uploads, strict=True):
        assert abs(_cos(update, upload)) < 0.01  # nothing of the client's update in its masked upload
        assert _norm(upload) > 1e6 * _norm(update)
    for key in updates[0]:  # the revealed sum decodes to the mean, within the codec's grid
        torch.testing.assert_close(view.total[key].double(), (updates[0][key] + updates[1][key]).double() / 2,
                                   atol=1e-8, rtol=0)  # fmt: skip
    again = target.server_view(updates, "secagg")  # the audit's seed fixes the masks
    assert all(torch.equal(a, b) for a, b in zip(view.uploads[0].values(), again.uploads[0].values(), strict=True))


def test_under_client_dp_an_upload_is_the_clipped_update_plus_its_noise(target, updates):
    dp = {"level": "client", "placement": "client", "clip": 1e-3}
    exact = target.server_view(updates, "dp", options={**dp, "noise-multiplier": 1e-12})
    for update, upload in zip(updates, exact.uploads, strict=True):
        # the clipped update travels as float32 weights: entries of ~1e-7 on weights of ~0.1 keep ~1 % of error
        assert _norm(upload) == pytest.approx(min(1e-3, _norm(update)), rel=1e-2)
        assert _cos(update, upload) > 0.99
    noisy = target.server_view(updates, "dp", options={**dp, "noise-multiplier": 2.0})
    residual = torch.cat([(noisy.uploads[0][k] - exact.uploads[0][k]).flatten() for k in updates[0]])
    expected = 2.0 * 1e-3 / math.sqrt(2)  # z·C/√k, k = 2 clients
    assert float(residual.std()) == pytest.approx(expected, rel=0.02)
    assert noisy.details == {"placement": "client", "noise_multiplier": 2.0, "clip": 1e-3}


def test_members_are_samples_of_clients_that_trained_and_the_epochs_they_saw(target):
    members = target.member_samples(6)
    trained = set(np.concatenate([target.partition.clients[c] for c in (0, 1)]).tolist())
    assert set(members.ids) <= trained and len(set(members.ids)) == 6
    assert target.epochs_seen() == 1  # one round of one local epoch, both clients sampled


def test_fresh_samples_are_new_draws_of_the_distribution(target):
    fresh, train = target.samples("fresh", 4), target.samples("train", 4)
    assert fresh.split == "fresh" and not torch.equal(fresh.batch["image"], train.batch["image"])
    assert fresh.batch["image"].shape == train.batch["image"].shape


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda t: t.samples("valid", 2), "split must be one of train, test, fresh, got 'valid'"),
        (lambda t: t.samples("train", 2, partition=5), "partition must be a client of the run, 0..1, got 5"),
        (lambda t: t.samples("test", 99), "asked for 99 samples of split 'test' from 0; it has 8"),
        (lambda t: t.global_model("best"), "the global model is 'final' or 'initial', got 'best'"),
        (lambda t: t.server_view([{}], "he"), "setting must be 'plain' or a privacy plugin: no privacy named 'he'"),
        (lambda t: t.server_view([], "plain"), "a server view needs at least one client update"),
    ],
)
def test_bad_requests_are_refused_naming_what_was_wrong(target, call, words):
    with pytest.raises(AuditError) as caught:
        call(target)
    assert words in str(caught.value)


def test_pchmr_audit_writes_the_table_json_and_refuses_bad_input(tiny_federated_run, tmp_path):
    out = tmp_path / "audit"
    args = ["audit", str(tiny_federated_run), "--attack", "membership", "--out", str(out)]
    options = ["--attack-option", "candidates=8", "--attack-option", "shadows=0"]
    done = CliRunner().invoke(app, [*args, *options], terminal_width=200)
    assert done.exit_code == 0, done.output
    saved = json.loads((out / "audit.json").read_text())
    assert saved["attack"] == "membership" and saved["threat_model"] == "model-holder"
    assert {m["metric"] for m in saved["measurements"]} == {"auc", "tpr@1%fpr"}
    assert saved["protocol"]["dataset"] == "synthetic" and len(saved["rows"]) == 16
    assert "| no privacy · loss | auc |" in (out / "audit.md").read_text()
    for bad, words in [
        (["--attack", "nope"], "no attack named 'nope'"),
        (["--attack", "membership", "--attack-option", "candidates=2"], "'candidates' must be an integer >= 8"),
    ]:
        refused = CliRunner().invoke(app, [*args[:2], *bad, "--out", str(tmp_path / "x")], terminal_width=200)
        assert refused.exit_code == 2 and words in " ".join(refused.output.split()), refused.output
        assert not (tmp_path / "x").exists()
    missing = CliRunner().invoke(
        app, ["audit", str(tmp_path / "none"), "--attack", "membership", "--out", str(tmp_path / "y")]
    )
    assert missing.exit_code == 2 and "is not a directory" in missing.output


def test_inversion_objective_is_zero_at_the_true_image_and_not_at_a_random_one(target):
    """The inversion's objective, read from a FedSGD upload with the labels known: the victim's own
    image is its minimum (distance 0), a random image is far from it, and an AdamW step's upload
    (signs only) is not the gradient's direction."""
    from pchmr.plugins.attacks.inversion import Inversion, InversionOptions, _cosine_distance

    model = target.global_model("final")
    truth = target.samples("train", 1, partition=0).batch
    fedsgd = Inversion(InversionOptions(local="gradient"))
    upload = fedsgd._upload(target, model, truth)
    direction = fedsgd._direction(target, model, upload, 1)
    keys = fedsgd._matched(direction)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    dropped = set(trainable) - set(keys)
    assert any(name.endswith("k_proj.bias") for name in dropped)  # a softmax makes them gradient-free
    at_truth = float(_cosine_distance(target.loss_gradient(model, truth), direction, keys))
    noise = {**truth, "image": torch.randn(truth["image"].shape, generator=torch.Generator().manual_seed(1))}
    at_noise = float(_cosine_distance(target.loss_gradient(model, noise), direction, keys))
    assert at_truth < 1e-5 < 0.05 < at_noise

    adamw = Inversion(InversionOptions(local="step"))
    step_direction = adamw._direction(target, model, adamw._upload(target, model, truth), 1)
    signs = float(_cosine_distance(target.loss_gradient(model, truth), step_direction, keys))
    assert signs > 10 * at_truth + 0.05  # AdamW's normalisation: the direction is the gradient's signs


def test_a_revealed_sum_is_scored_against_all_k_clients_images(target):
    """secagg-sum attacks k clients' images at once: its PSNR, its baselines and its picture cover
    all k true images (each paired with its best-matching recovered one), not the victim's alone."""
    from pchmr.plugins.attacks.inversion import Inversion, InversionOptions, psnr

    options = InversionOptions(settings="plain,secagg,secagg-sum", victims=1, k=2, steps=1)
    report = Inversion(options).run(target)
    found = {(m.metric, m.setting): m for m in report.measurements}
    assert {"secagg-sum k=2", "mean colour (baseline, secagg-sum k=2's images)", "mean colour (baseline)"} <= {
        setting for _, setting in found
    }
    assert found[("mpjpe_mm", "true image (ceiling, secagg-sum k=2's images)")].value > 0
    # the sum's baseline is the flat image against both clients' images: the mean of its PSNR against each
    victim = target.samples("train", 1, partition=0).batch["image"]
    other = target.samples("train", 1, partition=1, offset=1).batch["image"]
    test = target.samples("test", min(16, int(target.options.get("num_test") or 16))).batch["image"]
    flat = target.to_pixels(test.mean(dim=(0, 2, 3), keepdim=True).expand_as(victim).clone())[0]
    expected = np.mean([psnr(flat, target.to_pixels(image)[0]) for image in (victim, other)])
    assert found[("psnr_db", "mean colour (baseline, secagg-sum k=2's images)")].value == pytest.approx(expected)
    assert found[("psnr_db", "mean colour (baseline)")].value == pytest.approx(psnr(flat, target.to_pixels(victim)[0]))
    # plain and secagg attack the same image: it is a baseline once (one noise draw), not once per setting
    noise = torch.randn(victim.shape, generator=torch.Generator().manual_seed(target.seed * 31))
    random_psnr = psnr(target.to_pixels(noise)[0], target.to_pixels(victim)[0])
    assert found[("psnr_db", "random image (baseline)")].value == pytest.approx(random_psnr)
    assert report.pictures["inversion-secagg-sumk2"].shape[1] == 2 * report.pictures["inversion-plain"].shape[1]


def test_inversion_coarse_to_fine_and_signed_steps_shape_what_it_recovers(target):
    """``scales`` optimises the dummies at coarser sides first: with one scale of 4 px the recovered
    image is a 4×4 image upsampled (it lies in the span of the 16 upsampled basis images); ``signed``
    changes the descent; a scale above the images' side, or scales out of order, are refused."""
    import torch.nn.functional as F

    from pchmr.core.contracts.options import OptionError
    from pchmr.plugins.attacks.inversion import Inversion, InversionOptions

    model = target.global_model("final")
    truth = target.samples("train", 1, partition=0).batch
    side = truth["image"].shape[-1]

    def recovered(**options):
        attack = Inversion(InversionOptions(settings="plain", victims=1, steps=3, lr=0.05, tv=0.01, **options))
        return attack._invert(target, model, attack._upload(target, model, truth), truth, seed=0)[0]

    plain, coarse, signed = recovered(), recovered(scales="4"), recovered(signed=True)
    basis = F.interpolate(torch.eye(16).reshape(16, 1, 4, 4), size=(side, side), mode="bilinear").reshape(16, -1).T

    def off_span(images):  # the largest residual of each channel's least-squares fit by the basis
        pixels = images.reshape(-1, side * side).T
        fit = basis @ torch.linalg.lstsq(basis, pixels).solution
        return float((fit - pixels).abs().max())

    assert off_span(coarse) < 1e-5 < 1e-3 < off_span(plain)
    assert signed.shape == plain.shape and (signed - plain).abs().max() > 1e-4
    for bad in ("16,8", "0,8", "a"):
        with pytest.raises(ValueError, match="'scales' must be increasing whole numbers"):
            InversionOptions(scales=bad)
    with pytest.raises(OptionError, match=f"'scales' must be at most the images' side, {side} px"):
        Inversion(InversionOptions(settings="plain", scales=f"8,{side * 2}")).run(target)


def test_inversion_reports_the_objective_beside_the_true_image_at_half_resolution(target):
    """Each setting's reached objective is a measurement, and the plain upload's objective at the
    true image at half resolution (its PSNR and SSIM too) is the reference beside it."""
    import torch.nn.functional as F

    from pchmr.plugins.attacks.inversion import REFERENCE, Inversion, InversionOptions, _cosine_distance, psnr

    report = Inversion(InversionOptions(settings="plain,secagg", victims=1, k=2, steps=1)).run(target)
    found = {(m.metric, m.setting): m for m in report.measurements}
    assert 0 < found[("objective", REFERENCE)].value < found[("objective", "secagg k=2")].value
    assert found[("objective", "plain")].value == pytest.approx(report.rows[0]["objective"])
    truth = target.samples("train", 1, partition=0).batch["image"]
    side = truth.shape[-1]
    half = F.interpolate(F.interpolate(truth, size=(side // 2,) * 2, mode="area"), size=(side, side), mode="bilinear")
    expected = psnr(target.to_pixels(half)[0], target.to_pixels(truth)[0])
    assert found[("psnr_db", REFERENCE)].value == pytest.approx(expected)
    assert report.rows[0]["reference_psnr_db"] == pytest.approx(expected) and "reference_psnr_db" not in report.rows[1]
    # its objective: the half-resolution image's gradient against the direction read from the plain upload
    model, batch = target.global_model("final"), target.samples("train", 1, partition=0).batch
    attack = Inversion(InversionOptions())
    direction = attack._direction(target, model, attack._upload(target, model, batch), 1)
    at_half = _cosine_distance(
        target.loss_gradient(model, {**batch, "image": half}), direction, attack._matched(direction)
    )
    assert found[("objective", REFERENCE)].value == pytest.approx(float(at_half), rel=1e-6)
