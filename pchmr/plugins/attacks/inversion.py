"""``inversion``: reconstruct a client's images from what the server receives (the server's view).

"Inverting Gradients" (Geiping et al., 2020) for an HMR client. The server holds the attacked
round's global model θ (``model``: the run's ``last`` weights, or its ``first``) and one client's
upload Δ. It optimises dummy images so that their loss gradient points where the upload says the
client's did, with a total-variation prior:

    min  mean over tensors t of (1 − cos(∇θ_t L(x', y), u_t)) + tv · TV(x')

u is the direction read from the upload (``local``):

* ``gradient`` (default; FedSGD, the classic setting): one SGD step, Δ = −lr·g, so u = −Δ;
* ``step``: one step of the run's AdamW from a fresh state, Δ = −lr·g/(|g| + ε) − d, with
  d = lr·wd·θ the weight decay the server can compute; u = −(Δ + d) carries the sign of every
  gradient entry and nothing more (Adam's normalisation);
* ``round``: the run's local epochs over the batch: d = (1 − (1 − lr·wd)^T)·θ after T steps, and
  u = −(Δ + d) is approximated by one gradient at θ (Geiping et al.'s multi-step case).

The cosine is taken per tensor and averaged, so that the small tensors of the first convolutions,
whose gradients depend most on the image, weigh as much as the large ones of the transformer and
heads, whose gradients depend mostly on the labels (Geiping et al. take one cosine over the whole
vector). With ``labels=known`` (default) the server knows the batch's labels y (3D joints, 2D
keypoints, mesh): an upper bound, since regression labels cannot be read off an update the way
class labels are; ``unknown`` optimises them as dummies started from the model's own prediction. Adam on the dummies from an image near the
data's mean colour, the best of ``restarts`` kept by the objective; ``signed`` steps on the sign of
the images' gradient (Geiping et al.'s choice), ``scales`` optimises them coarse to fine (at 4, then
8, ... pixels a side, upsampled), a prior that the image's layout comes before its detail.

What makes HMR models hard to invert: pchmr's losses are L1 (FastMETRO's), so the loss gradient
takes the sign of each prediction error, and the objective jumps where a sign (or a ReLU gate)
flips; at a model's first weights a random image's gradient already points within a few degrees
of the true one's in every tensor but the first convolution (docs/privacy.md, "What leaks").

Settings (``settings``), for ``victims`` batches of ``batch`` training images of one client each:

* ``plain``: the upload is the client's update;
* ``secagg``: the upload is the client's masked vector (secure aggregation over ``k`` clients);
  and ``secagg-sum``: the revealed sum of the k clients' updates, attacked as one batch of k·batch
  images (the server's best hope under secure aggregation);
* ``dp``: the client's clipped, noised update at each of ``noise-multipliers`` (client-level DP
  with the noise added on the client; ``clip`` by default the victim's own update norm, so the
  noise's scale relative to the update is z: a model of P parameters gets noise of norm ≈ z·C·√P
  on an update of norm C).

Measured per setting: PSNR (dB) and SSIM of each recovered image against the true one (pixels in
[0, 1]; with more than one image, each true image against its best-matching recovered one; for
``secagg-sum`` the true images are all k clients', and so are its baselines), and the MPJPE
(mm) of the pose the final global model predicts on the recovered image against the client's true
pose (and the same for a random image and for a flat image of the mean colour: the baselines; and
on the true image: the ceiling). The recovered labels' joints are a second pose estimate
(``label-mpjpe``). The objective each setting reached is reported too, and, for ``plain``, the
objective, PSNR and SSIM of the true image at half resolution (the reference): when the recovered
image's objective is as low as the reference's and its PSNR is not, the objective ranks a wrong image
as high as a recognisable one, so a longer descent would not help; a stronger prior or objective would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pchmr.core.contracts.attack import AttackReport, AuditTarget, Measurement
from pchmr.core.contracts.hookspecs import hookimpl
from pchmr.core.contracts.options import option, option_error, read_options

__all__ = ["Inversion", "InversionOptions", "psnr", "ssim"]

SETTINGS = ("plain", "secagg", "secagg-sum", "dp")
#: The reference whose objective on the plain upload the report states beside the recovered
#: image's: the true image at half its resolution (area-downsampled, bilinear-upsampled), smooth as a
#: TV-regularised reconstruction and still plainly recognisable.
REFERENCE = "true image at half resolution (reference)"


@dataclass(frozen=True)
class InversionOptions:
    settings: str = option("plain,secagg,secagg-sum,dp", help="comma-separated: plain, secagg, secagg-sum, dp")
    victims: int = option(4, low=1, help="attacked batches, each of one client")
    batch: int = option(1, low=1, help="images per attacked batch")
    local: str = option(
        "gradient",
        choices=("gradient", "step", "round"),
        help="gradient: one SGD step (FedSGD: the upload is the gradient); step: one step of the run's AdamW; "
        "round: the run's local epochs over the batch",
    )
    model: str = option(
        "last",
        choices=("last", "first"),
        help="the attacked round's global model: last (the run's final model) or first (its initial weights)",
    )
    labels: str = option(
        "known",
        choices=("known", "unknown"),
        help="known: the server knows the batch's labels (the upper bound); unknown: optimised as dummies",
    )
    k: int = option(4, low=2, help="clients in a secure-aggregation round (secagg, secagg-sum)")
    noise_multipliers: str = option("0.0001,0.001,0.01,1", help="dp: comma-separated noise multipliers z")
    clip: float | None = option(
        None,
        low=0.0,
        low_open=True,
        default_text="the victim's update norm (no clipping)",
        help="dp: the clip C of an update's L2 norm",
    )
    steps: int = option(400, low=1, help="optimisation steps per restart")
    restarts: int = option(1, low=1, help="restarts from new random images (the best objective kept)")
    lr: float = option(0.1, low=0.0, low_open=True, help="Adam's learning rate on the dummies")
    tv: float = option(0.5, low=0.0, help="weight of the total-variation prior")
    signed: bool = option(False, help="Adam on the sign of the dummies' gradient (Geiping et al.'s choice)")
    scales: str = option(
        "",
        default_text="the full resolution throughout",
        help="coarse to fine: comma-separated increasing image sides (pixels) the dummies are optimised at in "
        "turn, the steps split evenly between them, e.g. 8,16,32",
    )

    def __post_init__(self) -> None:
        unknown = [s for s in _split(self.settings) if s not in SETTINGS]
        if unknown or not _split(self.settings):
            raise ValueError(f"'settings' must name some of {', '.join(SETTINGS)}, got {self.settings!r}")
        try:
            zs = [float(z) for z in _split(self.noise_multipliers)]
        except ValueError:
            zs = [-1.0]
        if not zs or any(not math.isfinite(z) or z < 0 for z in zs):
            raise ValueError(
                f"'noise-multipliers' must be numbers >= 0 separated by commas, got {self.noise_multipliers!r}"
            )
        try:
            sides = [int(side) for side in _split(self.scales)]
        except ValueError:
            sides = [0]
        if any(side < 1 for side in sides) or sides != sorted(set(sides)):
            raise ValueError(
                f"'scales' must be increasing whole numbers of pixels >= 1 separated by commas, got {self.scales!r}"
            )


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


# -- image quality ---------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return np.outer(g, g) / np.outer(g, g).sum()


def _filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    from scipy.signal import convolve2d

    return convolve2d(image, window, mode="valid")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al., 2004; 7×7 Gaussian window, σ 1.5) of two (H, W, 3) uint8 images, the mean
    over the channels."""
    window = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for c in range(a.shape[2]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mx, my = _filter(x, window), _filter(y, window)
        sxx = _filter(x * x, window) - mx * mx
        syy = _filter(y * y, window) - my * my
        sxy = _filter(x * y, window) - mx * my
        values.append(np.mean(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))))
    return float(np.mean(values))


def _resize(images: Tensor, side: int, mode: str) -> Tensor:
    """``images`` at ``side`` pixels a side (themselves when they are that size already)."""
    if images.shape[-1] == side:
        return images
    return torch.nn.functional.interpolate(images, size=(side, side), mode=mode)


def _total_variation(images: Tensor) -> Tensor:
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def _cosine_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    """The mean over ``keys`` of each tensor's cosine distance (1 − cos) between ``a`` and ``b``:
    per tensor, so that the few small tensors nearest the image weigh as much as the large ones
    of the heads, whose gradients depend on the labels more than on the image."""
    total = a[keys[0]].new_zeros(())
    for k in keys:
        x, y = a[k], b[k].to(a[k].dtype)
        total = total + 1 - (x * y).sum() / (x.norm() * y.norm() + 1e-12)
    return total / len(keys)


class Inversion:
    """The attack, built with its options (see the module docstring)."""

    def __init__(self, options: InversionOptions) -> None:
        self.options = options

    # -- one reconstruction ----------------------------------------------------------------
    def _upload(self, target: AuditTarget, model: Any, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What the client sends for ``batch`` under ``local`` (before any privacy plugin)."""
        if self.options.local == "gradient":
            lr = float(target.options.get("lr") or 1.0)
            return {k: -lr * g for k, g in target.loss_gradient(model, batch).items()}
        return target.client_update(model, batch, steps=1 if self.options.local == "step" else None)

    def _direction(self, target: AuditTarget, model: Any, upload: Mapping[str, Tensor], size: int) -> dict[str, Tensor]:
        """The direction the client's gradient pointed, read from the upload: −Δ for an SGD step;
        for AdamW, −(Δ + d) with d the weight decay of its T steps (see the module docstring)."""
        if self.options.local == "gradient":
            return {k: -upload[k].double() for k in upload}
        if self.options.local == "step":
            steps = 1
        else:
            batch = int(target.options.get("batch_size") or size)
            steps = math.ceil(size / batch) * int(target.options.get("local_epochs") or 1)
        lr = float(target.options.get("lr") or 0.0)
        wd = float(target.options.get("weight_decay") or 0.0)
        shrink = 1.0 - (1.0 - lr * wd) ** steps
        weights = dict(model.named_parameters())
        return {k: -(upload[k].double() + shrink * weights[k].detach().double()) for k in upload}

    def _matched(self, direction: Mapping[str, Tensor]) -> list[str]:
        """The tensors the objective compares: the trainable ones whose direction is not numerically
        zero (below 1e-7 of the largest tensor's norm, e.g. the attention's key biases, which a
        softmax makes gradient-free: what they carry is rounding)."""
        norms = {k: float(direction[k].norm()) for k in direction}
        floor = 1e-7 * max(norms.values(), default=0.0)
        return [k for k in direction if norms[k] > floor]

    def _invert(
        self, target: AuditTarget, model: Any, upload: Mapping[str, Tensor], like: Mapping[str, Tensor], seed: int
    ) -> tuple[Tensor, Tensor, float]:
        """(recovered images, recovered 3D joints, objective) for ``upload``; ``like`` is the
        attacked batch: its shapes, and with ``labels=known`` its labels (never its images)."""
        opts = self.options
        direction = self._direction(target, model, upload, len(like["image"]))
        keys = self._matched(direction)
        scales = [int(s) for s in _split(opts.scales)] or [int(like["image"].shape[-1])]
        lowest, best = math.inf, None
        for restart in range(opts.restarts):
            generator = torch.Generator().manual_seed(seed * 1000 + restart)
            # near the data's mean colour (0 after normalisation), with a little noise to break symmetry
            images = 0.1 * torch.randn(like["image"].shape, generator=generator)
            labels = self._start_labels(model, images, like)
            for i, scale in enumerate(scales):  # coarse to fine: the steps split evenly between the scales
                steps = opts.steps // len(scales) + (1 if i < opts.steps % len(scales) else 0)
                images = self._descend(target, model, direction, keys, like, images, labels, scale, steps)
            batch = self._dummy_batch(like, images, {k: v.detach() for k, v in labels.items()})
            final = float(_cosine_distance(target.loss_gradient(model, batch), direction, keys))
            if final < lowest:
                joints = batch["joints_3d"][..., :3].detach().clone()
                lowest, best = final, (images.clone(), joints)
        assert best is not None
        return best[0], best[1], lowest

    def _descend(self, target, model, direction, keys, like, images: Tensor, labels, scale: int, steps: int) -> Tensor:
        """``steps`` Adam steps on ``images`` (and the dummy ``labels``, in place) parametrised at
        ``scale`` pixels a side, upsampled to the images' own; the images it reached."""
        opts = self.options
        side = int(images.shape[-1])
        low = _resize(images.detach(), scale, "area").clone().requires_grad_(True)
        optimizer = torch.optim.Adam([low, *labels.values()], lr=opts.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[int(steps * f) for f in (0.375, 0.625, 0.875)], gamma=0.1
        )
        for _ in range(steps):
            dummies = _resize(low, side, "bilinear")
            gradient = target.loss_gradient(model, self._dummy_batch(like, dummies, labels), differentiable=True)
            loss = _cosine_distance(gradient, direction, keys) + opts.tv * _total_variation(dummies)
            optimizer.zero_grad()
            loss.backward()
            if opts.signed:
                for tensor in (low, *labels.values()):
                    if tensor.grad is not None:
                        tensor.grad.sign_()
            optimizer.step()
            schedule.step()
        return _resize(low, side, "bilinear").detach()

    def _reference(self, target, model, upload, truth) -> dict[str, float]:
        """The objective at the true images at half resolution, with their PSNR and SSIM: a recovered
        image whose objective is as low but whose PSNR is far lower means that the objective ranks a
        wrong image with a recognisable one (the upload does not single out the image), not that the
        descent stopped short."""
        direction = self._direction(target, model, upload, len(truth["image"]))
        keys = self._matched(direction)
        side = int(truth["image"].shape[-1])
        images = _resize(_resize(truth["image"], side // 2, "area"), side, "bilinear")
        objective = float(_cosine_distance(target.loss_gradient(model, {**truth, "image": images}), direction, keys))
        true_px, got_px = target.to_pixels(truth["image"]), target.to_pixels(images)
        return {
            "objective": objective,
            "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(got_px, true_px, strict=True)])),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(got_px, true_px, strict=True)])),
        }

    def _start_labels(self, model: Any, images: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The dummy labels to optimise (none when the labels are known): the model's own
        prediction on the starting images."""
        if self.options.labels == "known":
            return {}
        with torch.no_grad():
            guess = model(images)
        root = guess.joints.mean(dim=1, keepdim=True)
        return {
            "joints_3d": (guess.joints - root).clone().requires_grad_(True),
            "keypoints_2d": torch.zeros((*like["keypoints_2d"].shape[:-1], 2)).requires_grad_(True),
            "vertices": (guess.vertices[-1] - root).clone().requires_grad_(True),
        }

    @staticmethod
    def _dummy_batch(like: Mapping[str, Tensor], images: Tensor, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What the loss reads: the dummy images, and the dummy labels (``like``'s when they are known)."""
        if not labels:
            return {**like, "image": images}
        ones_j = torch.ones((*like["joints_3d"].shape[:-1], 1))
        return {
            "image": images,
            "joints_3d": torch.cat([labels["joints_3d"], ones_j], dim=-1),
            "keypoints_2d": torch.cat([labels["keypoints_2d"], ones_j], dim=-1),
            "vertices": labels["vertices"],
            "has_vertices": torch.ones(images.shape[0]),
        }

    # -- the attack ------------------------------------------------------------------------
    def run(self, target: AuditTarget, progress: Callable[[str], None] | None = None) -> AttackReport:
        say = progress or (lambda text: None)
        opts = self.options
        settings = _split(opts.settings)
        side = int(target.samples("train", 1).batch["image"].shape[-1])
        if any(int(scale) > side for scale in _split(opts.scales)):  # refused before any work is done
            raise option_error("inversion", "attack", "scales", f"at most the images' side, {side} px", opts.scales)
        # the attacked round's global model: the run's last (final) or first (initial) weights
        server_model = target.global_model("final" if opts.model == "last" else "initial")
        judge = target.global_model("final")
        clients = int(target.options.get("clients") or 1)
        measurements: list[Measurement] = []
        rows: list[dict[str, Any]] = []
        pictures: dict[str, np.ndarray] = {}
        results: dict[str, dict[str, list[float]]] = {}
        reference: dict[str, list[float]] = {}  # the true image at half resolution, on the plain upload's objective
        attacked: dict[str, list[Mapping[str, Tensor]]] = {}  # the true batches behind each group's uploads
        for v in range(opts.victims):
            partition = v % clients
            victim = target.samples("train", opts.batch, partition=partition, offset=(v // clients) * opts.batch)
            truth = victim.batch
            own = self._upload(target, server_model, truth)
            others = []  # the round's other clients (secure aggregation's k, client DP's noise scale)
            if {"secagg", "secagg-sum", "dp"} & set(settings):
                for j in range(1, opts.k):
                    other = target.samples("train", opts.batch, partition=(partition + j) % clients,
                                           offset=opts.batch * (1 + (v * opts.k + j) // clients))  # fmt: skip
                    others.append(other.batch)
            for setting, upload, like in self._views(target, settings, own, others, truth, server_model):
                say(f"victim {v + 1}/{opts.victims}: {setting}")
                recovered, joints, objective = self._invert(
                    target, server_model, upload, like, seed=target.seed * 97 + v
                )
                # scored against the images the upload came from: the victim's, or for a sum all k clients'
                scores = self._score(target, judge, recovered, joints, like)
                batches = attacked.setdefault(_group(setting), [])
                if len(batches) == v:  # each victim's batch once per group (plain, secagg and dp share it)
                    batches.append(like)
                results.setdefault(setting, {}).setdefault("objective", []).append(objective)
                extra = {}
                if setting == "plain":  # where a recognisable image sits on the same objective
                    for key, value in self._reference(target, server_model, upload, truth).items():
                        reference.setdefault(key, []).append(value)
                        extra[f"reference_{key}"] = value
                for key, value in scores.items():
                    results[setting].setdefault(key, []).append(value)
                rows.append({"victim": v, "partition": partition, "ids": list(victim.ids), "setting": setting,
                             "objective": objective, **scores, **extra})  # fmt: skip
                if v == 0:
                    pictures[f"inversion-{setting.replace(' ', '').replace('=', '')}"] = self._picture(
                        target, like, recovered
                    )
        baselines = {group: self._baselines(target, judge, batches) for group, batches in attacked.items()}
        best = {  # per group, the stronger baseline per metric: the higher PSNR and SSIM, the lower MPJPE
            group: {
                metric: (min if metric == "mpjpe_mm" else max)(b[metric] for b in scores.values())
                for metric in ("psnr_db", "ssim", "mpjpe_mm")
            }
            for group, scores in baselines.items()
        }
        for setting, values in results.items():
            for metric in ("psnr_db", "ssim", "mpjpe_mm", "label_mpjpe_mm"):
                if metric in values:
                    measurements.append(_mean(metric, setting, values[metric], best[_group(setting)].get(metric)))
            measurements.append(_mean("objective", setting, values["objective"], None))
        for metric, values in reference.items():
            measurements.append(_mean(metric, REFERENCE, values, None))
        for group, scores in baselines.items():
            for name, values in scores.items():
                label = name if group == "client" else f"{name[: -len(' (baseline)')]} (baseline, {group}'s images)"
                for metric, value in values.items():
                    measurements.append(Measurement(metric, label, value, n=opts.victims))
        for group in attacked:  # the final model on the true images: the best a recovered image can do
            first = next(setting for setting in results if _group(setting) == group)
            label = "true image (ceiling)" if group == "client" else f"true image (ceiling, {group}'s images)"
            measurements.append(_mean("mpjpe_mm", label, results[first]["true_mpjpe_mm"], None))
        assumptions = (
            f"the server holds the round's global model (the run's {'final' if opts.model == 'last' else 'initial'} "
            "weights) and what the client sends",
            {
                "gradient": "the client sends one SGD step's update (FedSGD): its gradient times the learning rate",
                "step": "the client sends one step of the run's AdamW from a fresh state",
                "round": "the client sends the update of the run's local epochs over the batch",
            }[opts.local],
            "it knows the client's training recipe (optimizer, learning rate, weight decay, local steps)"
            + (
                " and the batch's labels (poses, keypoints, meshes): an upper bound"
                if opts.labels == "known"
                else ", not its labels (optimised as dummies)"
            ),
            "objective: the mean over the trainable tensors of each one's cosine distance",
            f"{opts.batch} image(s) per client batch; {opts.steps} {'signed ' if opts.signed else ''}Adam steps x "
            f"{opts.restarts} restart(s), TV weight {opts.tv}"
            + (f", coarse to fine at {opts.scales} px" if opts.scales else ""),
            "pose error is the final global model's prediction on the recovered image against the true pose",
        )
        return AttackReport("inversion", "server", tuple(measurements), assumptions, tuple(rows), pictures)

    def _views(self, target, settings, own, others, truth, model):
        opts = self.options
        updates = [own] + [self._upload(target, model, b) for b in others]
        for setting in settings:
            if setting == "plain":
                yield "plain", target.server_view([own], "plain").uploads[0], truth
            elif setting == "secagg":
                yield f"secagg k={opts.k}", target.server_view(updates, "secagg", options={}).uploads[0], truth
            elif setting == "secagg-sum":
                view = target.server_view(updates, "secagg", options={})
                merged = {k: torch.cat([truth[k], *(b[k] for b in others)]) for k in truth}
                yield f"secagg-sum k={opts.k}", view.total, merged
            else:
                for z in (float(x) for x in _split(opts.noise_multipliers)):
                    clip = opts.clip or math.sqrt(sum(float(t.double().pow(2).sum()) for t in own.values()))
                    dp = {"level": "client", "placement": "client", "noise-multiplier": z, "clip": clip}
                    view = target.server_view(updates, "dp", options=dp)
                    yield f"dp z={z:g}", view.uploads[0], truth

    def _score(self, target, judge, recovered, joints, truth) -> dict[str, float]:
        """Image quality against the true images ``truth`` and pose errors, each true image paired with
        its best-matching recovered one (by PSNR: with more than one image the attacker does not know
        which recovered image is whose; with one, the pair is the obvious one)."""
        true_px = target.to_pixels(truth["image"])
        got_px = target.to_pixels(recovered)
        pairs = [max(range(len(got_px)), key=lambda j, i=i: psnr(got_px[j], true_px[i])) for i in range(len(true_px))]
        matched, matched_joints = recovered[pairs], joints[pairs]
        gt = truth["joints_3d"][..., :3]
        valid = truth["joints_3d"][..., 3] > 0
        out = {
            "psnr_db": float(np.mean([psnr(got_px[j], true_px[i]) for i, j in enumerate(pairs)])),
            "ssim": float(np.mean([ssim(got_px[j], true_px[i]) for i, j in enumerate(pairs)])),
            "mpjpe_mm": float(target.pose_error_mm(judge, matched, truth).mean()),
        }
        if self.options.labels == "unknown":
            rel = matched_joints - matched_joints.mean(dim=1, keepdim=True)
            gt_rel = gt - gt.mean(dim=1, keepdim=True)
            out["label_mpjpe_mm"] = float(((rel - gt_rel).norm(dim=-1)[valid]).mean() * 1000)
        out["true_mpjpe_mm"] = float(target.pose_error_mm(judge, truth["image"], truth).mean())
        return out

    def _baselines(self, target, judge, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, dict[str, float]]:
        """Images that know nothing of the victims, scored like recovered ones against each attacked
        batch in ``batches``: random noise, and a flat image of the test split's mean colour (PSNR and
        SSIM reward a flat image on a flat background; an attack must beat both to have recovered
        anything)."""
        test = target.samples("test", min(16, int(target.options.get("num_test") or 16)))
        mean_colour = test.batch["image"].mean(dim=(0, 2, 3), keepdim=True)
        out: dict[str, dict[str, list[float]]] = {}
        for v, truth in enumerate(batches):
            noise = torch.randn(truth["image"].shape, generator=torch.Generator().manual_seed(target.seed * 31 + v))
            flat = mean_colour.expand_as(truth["image"]).clone()
            true_px = target.to_pixels(truth["image"])
            for name, images in (("random image (baseline)", noise), ("mean colour (baseline)", flat)):
                px = target.to_pixels(images)
                values = out.setdefault(name, {"psnr_db": [], "ssim": [], "mpjpe_mm": []})
                values["psnr_db"].append(float(np.mean([psnr(a, b) for a, b in zip(px, true_px, strict=True)])))
                values["ssim"].append(float(np.mean([ssim(a, b) for a, b in zip(px, true_px, strict=True)])))
                values["mpjpe_mm"].append(float(target.pose_error_mm(judge, images, truth).mean()))
        return {name: {k: float(np.mean(v)) for k, v in values.items()} for name, values in out.items()}

    @staticmethod
    def _picture(target, truth, recovered) -> np.ndarray:
        """True images (top row) above the recovered ones (bottom row)."""
        true_px, got_px = target.to_pixels(truth["image"]), target.to_pixels(recovered)
        top = np.concatenate(list(true_px), axis=1)
        bottom = np.concatenate(list(got_px), axis=1)
        width = max(top.shape[1], bottom.shape[1])
        pad = lambda row: np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)))  # noqa: E731
        return np.ascontiguousarray(np.concatenate([pad(top), pad(bottom)], axis=0))


def _group(setting: str) -> str:
    """Settings that attack the same images share their baselines: one client's batch ("client"), or
    the k clients' batches behind a revealed sum (the setting's name)."""
    return setting if setting.startswith("secagg-sum") else "client"


def _mean(metric: str, setting: str, values: list[float], baseline: float | None) -> Measurement:
    """The mean over victims with a 95 % t interval (none for one victim)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    notes = {"baseline": baseline} if baseline is not None else {}
    if len(array) < 2:
        return Measurement(metric, setting, mean, n=len(array), notes=notes)
    from scipy.stats import t

    half = float(t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return Measurement(metric, setting, mean, mean - half, mean + half, len(array), notes)


def inversion(options: Mapping[str, object]) -> Inversion:
    return Inversion(read_options(InversionOptions, options, plugin="inversion", kind="attack"))


inversion.options = InversionOptions  # type: ignore[attr-defined]


@hookimpl
def pchmr_attacks() -> dict[str, Any]:
    return {"inversion": inversion}
