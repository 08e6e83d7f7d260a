"""Contract suite for backbone plugins (:class:`~pchmr.core.contracts.backbone.Backbone` factories).

Subclass :class:`BackboneContract` in a test module and override ``make_backbone`` (a callable
``body_model -> Backbone`` building a *new* instance on every call)::

    import pytest
    from pchmr.testing import BackboneContract

    class TestTinyViT(BackboneContract):
        @pytest.fixture(scope="class")
        @classmethod
        def make_backbone(cls):
            return lambda body_model: TinyViT(body_model, width=16)

        @pytest.fixture
        def predicts_camera(self):  # a capability flag
            return False

or override ``backbone`` itself (then the state-dict check loads into a scrambled deep copy
instead of a fresh instance). Other fixtures to override:

* ``body_model`` — the body model the backbone is built for (default: ``toy_body_model``, a
  :class:`~pchmr.testing.toys.ToyBodyModel`, 38/146/578 vertices);
* capability flags: ``predicts_camera`` (True: check the camera scale is positive),
  ``input_size`` (64: the image size the backbone was built for), ``batch_size`` (2),
  ``max_extent_m`` (3.0: untrained outputs stay within this many metres of their root),
  ``params_without_grad`` (names of trainable parameters allowed to get no gradient);
* ``known_gaps`` — ``{check name: reason}``: those checks run as ``xfail`` with the reason.

Checks (test methods, so ``pytest -k test_state_dict_round_trip`` runs one): the backbone is
built for ``input_size``; outputs are an HMROutput of float32 tensors; joints (B, J, 3); one
vertex tensor (B, V_l, 3) per pyramid level; camera (B, 3); untrained outputs finite and within
``max_extent_m`` of the root; camera scale > 0; HMRModule's training loss (with the backbone's
extra losses, finite scalars) reaches every trainable parameter; the entries
:func:`~pchmr.core.kit.state.fixed_state_keys` calls fixed (a frozen encoder) survive a training
step unchanged; eval passes are deterministic;
a state dict saved and loaded into a fresh instance reproduces the outputs; in eval, sample i
alone equals sample i in the batch (atol 1e-4); wrong image size, wrong channel count and
unbatched images raise InputError naming the expected ``(B, 3, S, S)``; NaN images raise
InputError mentioning NaN. Checks that
only read eval-mode outputs share one forward pass per backbone instance (:func:`eval_outputs`).
Keep ``body_model`` and ``backbone`` class-scoped (the defaults; pytest wants class-scoped
fixtures written as classmethods, as above) so heavy models are built once per class and
parameter combination. The training check restores the backbone's state dict afterwards, so
BatchNorm statistics updated in train mode do not leak into the other checks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import weakref
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch
from torch import Tensor

from pchmr.core.contracts.backbone import Backbone, HMROutput, InputError
from pchmr.core.contracts.bodymodel import BodyModel
from pchmr.core.kit.state import fixed_state_keys
from pchmr.testing.toys import ToyBodyModel, toy_batch

__all__ = [
    "BATCH_ATOL",
    "CONTRACT_SEED",
    "BackboneContract",
    "BackboneMaker",
    "contract_images",
    "eval_outputs",
    "output_tensors",
    "preserved_state",
    "scramble_state",
]

CONTRACT_SEED = 0
#: Sample i alone and sample i inside a batch may differ this much (float32 kernels differ).
BATCH_ATOL = 1e-4
#: A state dict loaded into a fresh instance must reproduce the outputs this closely.
ROUND_TRIP_ATOL = 1e-6
#: Standard deviation of the noise :func:`scramble_state` adds to every floating-point entry.
SCRAMBLE_STD = 0.1
#: How many pixels the wrong-size check adds to the expected image size.
WRONG_SIZE_OFFSET = 8

BackboneMaker = Callable[[BodyModel], Backbone]

#: Eval-mode outputs per backbone instance and (batch size, image size): computed once, shared by
#: the checks that only read them. Weak keys: a backbone that goes away takes its entry along.
_EVAL_OUTPUTS: weakref.WeakKeyDictionary[Backbone, dict[tuple[int, int], HMROutput]] = weakref.WeakKeyDictionary()


def contract_images(batch_size: int, input_size: int, seed: int = CONTRACT_SEED) -> Tensor:
    """(B, 3, S, S) float32 normal noise, the same for the same arguments."""
    return torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))


def eval_outputs(backbone: Backbone, batch_size: int, input_size: int) -> HMROutput:
    """``backbone`` in eval mode on :func:`contract_images`, without gradients; computed once per
    backbone instance and size (the checks never change a shared backbone's weights)."""
    per_backbone = _EVAL_OUTPUTS.setdefault(backbone, {})
    key = (batch_size, input_size)
    if key not in per_backbone:
        backbone.eval()
        with torch.no_grad():
            per_backbone[key] = backbone(contract_images(batch_size, input_size))
    return per_backbone[key]


def output_tensors(output: HMROutput) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for the joints, every vertex level and the camera."""
    yield "joints", output.joints
    for level, vertices in enumerate(output.vertices):
        yield f"vertices[{level}]", vertices
    yield "camera", output.camera


def scramble_state(module: torch.nn.Module, seed: int = CONTRACT_SEED + 1) -> None:
    """Add noise to every floating-point entry of ``module.state_dict()`` in place, so that a
    later ``load_state_dict`` must restore each of them for the outputs to match."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if tensor.is_floating_point() and not tensor.is_sparse:
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.add_(SCRAMBLE_STD * noise.to(tensor.device))


@contextlib.contextmanager
def preserved_state(module: torch.nn.Module) -> Iterator[None]:
    """Restore ``module``'s state dict and train/eval mode on exit: train-mode passes update
    BatchNorm statistics, and the shared backbone must keep giving the outputs it gave."""
    saved = {key: value.detach().clone() for key, value in module.state_dict().items()}
    was_training = module.training
    try:
        yield
    finally:
        module.load_state_dict(saved, strict=True)
        module.train(was_training)


def _round_trip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` after torch.save / torch.load (weights only), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def _check_extra_losses(losses: object) -> None:
    assert isinstance(losses, Mapping), f"extra_losses returned {type(losses).__name__}, not a mapping"
    for name, value in losses.items():
        assert isinstance(value, Tensor) and value.ndim == 0, f"extra loss {name!r} must be a scalar tensor"
        assert torch.isfinite(value), f"extra loss {name!r} is {value.item()}"


def _shape_pattern(input_size: int, channels: int = 3) -> str:
    return re.escape(f"(B, {channels}, {input_size}, {input_size})")


class BackboneContract:
    """Checks every backbone plugin must pass; see the module docstring for the fixtures."""

    # -- fixtures to override -------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def toy_body_model(cls) -> ToyBodyModel:
        return ToyBodyModel()

    @pytest.fixture(scope="class")
    @classmethod
    def body_model(cls, toy_body_model: ToyBodyModel) -> BodyModel:
        return toy_body_model

    @pytest.fixture(scope="class")
    @classmethod
    def make_backbone(cls) -> BackboneMaker | None:
        """``body_model -> new Backbone``; None when the subclass overrides ``backbone`` instead."""
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def backbone(cls, make_backbone: BackboneMaker | None, body_model: BodyModel) -> Backbone:
        if make_backbone is None:
            raise NotImplementedError(
                "override the make_backbone fixture (body_model -> new Backbone) or the backbone fixture"
            )
        torch.manual_seed(CONTRACT_SEED)
        return make_backbone(body_model)

    @pytest.fixture(scope="class")
    @classmethod
    def predicts_camera(cls) -> bool:
        return True

    @pytest.fixture(scope="class")
    @classmethod
    def input_size(cls) -> int:
        return 64

    @pytest.fixture(scope="class")
    @classmethod
    def batch_size(cls) -> int:
        return 2

    @pytest.fixture(scope="class")
    @classmethod
    def max_extent_m(cls) -> float:
        return 3.0

    @pytest.fixture(scope="class")
    @classmethod
    def params_without_grad(cls) -> frozenset[str]:
        return frozenset()

    @pytest.fixture(scope="class")
    @classmethod
    def known_gaps(cls) -> Mapping[str, str]:
        return {}

    # -- plumbing -------------------------------------------------------------------------
    @pytest.fixture(autouse=True)
    def _mark_known_gaps(self, request: pytest.FixtureRequest, known_gaps: Mapping[str, str]) -> None:
        check = getattr(request.node, "originalname", request.node.name)
        if check in known_gaps:
            request.applymarker(pytest.mark.xfail(reason=known_gaps[check], strict=False))

    @pytest.fixture
    def output(self, backbone: Backbone, batch_size: int, input_size: int) -> HMROutput:
        return eval_outputs(backbone, batch_size, input_size)

    @pytest.fixture
    def fresh_backbone(
        self, make_backbone: BackboneMaker | None, backbone: Backbone, body_model: BodyModel
    ) -> Backbone:
        """A new instance (other seed) when ``make_backbone`` is given, else a deep copy; scrambled."""
        if make_backbone is None:
            fresh = copy.deepcopy(backbone)
        else:
            torch.manual_seed(CONTRACT_SEED + 1)
            fresh = make_backbone(body_model)
        scramble_state(fresh)
        return fresh

    # -- checks: outputs ------------------------------------------------------------------
    def test_is_a_backbone_built_for_input_size(self, backbone: Backbone, input_size: int) -> None:
        """The factory returns a Backbone subclass whose ``input_size`` is the ``input_size`` fixture."""
        assert isinstance(backbone, Backbone), f"{type(backbone).__name__} does not subclass pchmr Backbone"
        assert backbone.input_size == input_size, (
            f"backbone.input_size is {backbone.input_size}, the input_size fixture says {input_size}"
        )

    def test_output_fields(self, output: HMROutput) -> None:
        """forward returns an HMROutput: float32 tensors, ``vertices`` a tuple, ``aux`` a str → Tensor mapping."""
        assert isinstance(output, HMROutput), f"forward returned {type(output).__name__}, not HMROutput"
        assert isinstance(output.vertices, tuple), f"vertices must be a tuple, got {type(output.vertices).__name__}"
        for name, tensor in output_tensors(output):
            assert isinstance(tensor, Tensor), f"{name} is a {type(tensor).__name__}, not a Tensor"
            assert tensor.dtype == torch.float32, f"{name} is {tensor.dtype}, expected float32"
        assert isinstance(output.aux, Mapping), f"aux must be a mapping, got {type(output.aux).__name__}"
        for key, value in output.aux.items():
            assert isinstance(key, str) and isinstance(value, Tensor), f"aux[{key!r}] must be a Tensor under a str key"

    def test_joint_shape(self, output: HMROutput, body_model: BodyModel, batch_size: int) -> None:
        """joints are (B, J, 3), J = ``body_model.num_joints``."""
        expected = (batch_size, body_model.num_joints, 3)
        assert tuple(output.joints.shape) == expected, f"joints {tuple(output.joints.shape)}, expected {expected}"

    def test_vertex_levels_follow_the_pyramid(self, output: HMROutput, body_model: BodyModel, batch_size: int) -> None:
        """One (B, V_l, 3) vertex tensor per pyramid level, coarse first."""
        sizes = body_model.pyramid().num_vertices
        expected = [(batch_size, n, 3) for n in sizes]
        actual = [tuple(v.shape) for v in output.vertices]
        assert actual == expected, f"vertex levels {actual}, expected one per pyramid level (coarse first) {expected}"

    def test_camera_shape(self, output: HMROutput, batch_size: int) -> None:
        """camera is (B, 3): weak perspective (s, tx, ty)."""
        assert tuple(output.camera.shape) == (batch_size, 3), (
            f"camera {tuple(output.camera.shape)}, expected ({batch_size}, 3)"
        )

    def test_outputs_are_finite_metres(self, output: HMROutput, body_model: BodyModel, max_extent_m: float) -> None:
        """Untrained outputs are finite, and joints and vertices lie within ``max_extent_m`` of the
        root joint: metres, not millimetres or pixels."""
        for name, tensor in output_tensors(output):
            assert torch.isfinite(tensor).all(), f"{name} has NaN or infinite values"
        root = body_model.root(output.joints)
        for name, tensor in output_tensors(output):
            if name == "camera":
                continue
            extent = float((tensor - root).abs().max())
            assert extent < max_extent_m, (
                f"{name} reaches {extent:.3g} from the root: not metres (limit {max_extent_m} m)"
            )

    def test_camera_scale_is_positive(self, output: HMROutput, predicts_camera: bool) -> None:
        """The weak-perspective scale s is positive (``predicts_camera``)."""
        if not predicts_camera:
            pytest.skip("predicts_camera is False")
        scale = output.camera[:, 0]
        assert (scale > 0).all(), f"weak-perspective scales {scale.tolist()} must be positive"

    # -- checks: training -----------------------------------------------------------------
    def test_gradients_reach_every_parameter(
        self, backbone: Backbone, body_model: BodyModel, batch_size: int, input_size: int,
        params_without_grad: frozenset[str],
    ) -> None:  # fmt: skip
        """HMRModule's loss on a toy batch, in train mode, backpropagated: ``extra_losses`` are
        finite scalars, and every trainable parameter gets a finite, not all-zero gradient."""
        from pchmr.core.engine.module import HMRModule

        module = HMRModule(backbone, body_model)
        batch = toy_batch(body_model, batch_size, input_size, generator=torch.Generator().manual_seed(CONTRACT_SEED))
        backbone.zero_grad(set_to_none=True)
        torch.manual_seed(CONTRACT_SEED)
        with preserved_state(backbone):  # restored after backward: the graph holds the weights
            module.train()
            output = module(batch["image"])
            _check_extra_losses(backbone.extra_losses(output, batch))
            loss = module.compute_losses(batch, output)["loss"]
            assert torch.isfinite(loss), f"the training loss is {loss.item()}"
            loss.backward()
            bad = {}
            for name, param in backbone.named_parameters():
                if not param.requires_grad or name in params_without_grad:
                    continue
                if param.grad is None:
                    bad[name] = "no gradient"
                elif not torch.isfinite(param.grad).all():
                    bad[name] = "non-finite gradient"
                elif not param.grad.abs().sum() > 0:
                    bad[name] = "all-zero gradient"
            backbone.zero_grad(set_to_none=True)
        assert not bad, f"{len(bad)} trainable parameters get no useful gradient: " + ", ".join(
            f"{name} ({why})" for name, why in list(bad.items())[:10]
        )

    def test_fixed_entries_stay_fixed_in_training(
        self, backbone: Backbone, body_model: BodyModel, batch_size: int, input_size: int
    ) -> None:
        """The entries :func:`~pchmr.core.kit.state.fixed_state_keys` names (parameters without
        gradient, buffers of submodules that stay in eval mode: a frozen encoder) are unchanged by
        a training step (forward in train mode, backward, AdamW with weight decay). Differential
        privacy releases them without noise on this promise."""
        from pchmr.core.engine.module import HMRModule

        module = HMRModule(backbone, body_model)
        fixed = fixed_state_keys(module)
        batch = toy_batch(body_model, batch_size, input_size, generator=torch.Generator().manual_seed(CONTRACT_SEED))
        torch.manual_seed(CONTRACT_SEED)
        with preserved_state(backbone):
            before = {key: value.detach().clone() for key, value in module.state_dict().items() if key in fixed}
            trainable = [p for p in module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1) if trainable else None
            module.train()
            module.compute_losses(batch, module(batch["image"]))["loss"].backward()
            if optimizer is not None:
                optimizer.step()
            backbone.zero_grad(set_to_none=True)
            after = module.state_dict()
            changed = sorted(key for key, value in before.items() if not torch.equal(after[key], value))
        assert not changed, (
            f"{len(changed)} entries that fixed_state_keys calls fixed changed in a training step (first: "
            f"{', '.join(changed[:5])}): a frozen part must have no gradient and keep its buffers in eval mode"
        )

    # -- checks: reproducibility ----------------------------------------------------------
    def test_eval_is_deterministic(
        self, backbone: Backbone, output: HMROutput, batch_size: int, input_size: int
    ) -> None:
        """Two eval passes on the same images give identical outputs."""
        backbone.eval()
        with torch.no_grad():
            again = backbone(contract_images(batch_size, input_size))
        for (name, first), (_, second) in zip(output_tensors(output), output_tensors(again)):
            assert torch.equal(first, second), f"{name} differs between two eval passes on the same images"

    def test_state_dict_round_trip(
        self, fresh_backbone: Backbone, backbone: Backbone, output: HMROutput, batch_size: int, input_size: int
    ) -> None:
        """state_dict → torch.save/load → a fresh, scrambled instance: identical eval outputs."""
        fresh_backbone.load_state_dict(_round_trip(backbone.state_dict()), strict=True)
        fresh_backbone.eval()
        with torch.no_grad():
            restored = fresh_backbone(contract_images(batch_size, input_size))
        for (name, expected), (_, actual) in zip(output_tensors(output), output_tensors(restored)):
            torch.testing.assert_close(
                actual, expected, rtol=0.0, atol=ROUND_TRIP_ATOL,
                msg=lambda m, name=name: f"{name} after loading the state dict into a fresh instance: {m}",
            )  # fmt: skip

    def test_batch_size_independence(
        self, backbone: Backbone, output: HMROutput, batch_size: int, input_size: int
    ) -> None:
        """In eval mode, sample i alone gives what it gives inside the batch."""
        images = contract_images(batch_size, input_size)
        backbone.eval()
        for i in range(batch_size):
            with torch.no_grad():
                alone = backbone(images[i : i + 1])
            for (name, batched), (_, single) in zip(output_tensors(output), output_tensors(alone)):
                torch.testing.assert_close(
                    single[0], batched[i], rtol=0.0, atol=BATCH_ATOL,
                    msg=lambda m, name=name, i=i: f"{name} of sample {i} alone vs in a batch of {batch_size}: {m}",
                )  # fmt: skip

    # -- checks: input validation ---------------------------------------------------------
    def test_rejects_wrong_image_size(self, backbone: Backbone, input_size: int) -> None:
        """Images of another size raise InputError naming the expected ``(B, 3, S, S)``."""
        size = input_size + WRONG_SIZE_OFFSET
        with pytest.raises(InputError, match=_shape_pattern(input_size)):
            backbone(torch.zeros(1, 3, size, size))

    def test_rejects_wrong_channel_count(self, backbone: Backbone, input_size: int) -> None:
        """One-channel images raise InputError naming the expected ``(B, 3, S, S)``."""
        with pytest.raises(InputError, match=_shape_pattern(input_size)):
            backbone(torch.zeros(1, 1, input_size, input_size))

    def test_rejects_unbatched_images(self, backbone: Backbone, input_size: int) -> None:
        """A (3, S, S) image without a batch axis raises InputError naming ``(B, 3, S, S)``."""
        with pytest.raises(InputError, match=_shape_pattern(input_size)):
            backbone(torch.zeros(3, input_size, input_size))

    def test_rejects_nan_images(self, backbone: Backbone, input_size: int) -> None:
        """Images holding NaN raise InputError mentioning NaN."""
        images = torch.zeros(1, 3, input_size, input_size)
        images[0, 1, input_size // 2, input_size // 3] = float("nan")
        with pytest.raises(InputError, match="NaN"):
            backbone(images)
