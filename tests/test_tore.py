"""TORE backbone: shapes, parameter counts, token pruning and its loss, geometry-only vertex decoding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pchmr.core.contracts.backbone import BackboneOptions, HMROutput, InputError
from pchmr.core.contracts.bodymodel import MeshPyramid
from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.mechanism import RoundContext
from pchmr.core.engine.module import HMRModule
from pchmr.core.kit.encoders import FeatureEncoder
from pchmr.plugins.backbones.tore import (
    PRUNING_LOSS,
    TORE,
    body_mask_on_grid,
    fit_weak_perspective,
    kept_tokens,
    make_tore,
    pchmr_backbones,
    selector_outside_mass,
    token_pruning_loss,
)
from pchmr.testing.toys import ToyBodyModel, toy_batch

SIZE = 64
GRID = 8  # the small encoder's grid at 64 px
KEPT = 51  # int(64 · 0.8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and immune to other processes busy on the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def body() -> ToyBodyModel:
    return ToyBodyModel()


@pytest.fixture(scope="module")
def model_s(body: ToyBodyModel) -> TORE:
    torch.manual_seed(0)
    return make_tore(body, BackboneOptions(variant="S"))


def _images(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize(("variant", "layers"), [("S", 1), ("m", 2), ("L", 3)])
def test_outputs_have_contract_shapes_for_every_variant(body: ToyBodyModel, variant: str, layers: int) -> None:
    model = make_tore(body, BackboneOptions(variant=variant))
    out = model(_images(2))
    assert isinstance(out, HMROutput)
    assert out.joints.shape == (2, 14, 3)
    assert [tuple(v.shape) for v in out.vertices] == [(2, 38, 3), (2, 146, 3), (2, 578, 3)]
    assert out.camera.shape == (2, 3) and (out.camera[:, 0] > 0).all()
    assert out.aux["token_selector"].shape == (2, KEPT, GRID * GRID)
    for transformer in (model.transformer_1, model.transformer_2, model.transformer_3):
        assert len(transformer.encoder_layers) == len(transformer.decoder_layers) == layers


def test_mesh_levels_are_the_fixed_pyramid_upsampling(body: ToyBodyModel, model_s: TORE) -> None:
    model_s.eval()
    pyramid = body.pyramid()
    with torch.no_grad():
        coarse, middle, full = model_s(_images(2)).vertices
    assert torch.allclose(middle, pyramid.upsample(coarse, 0, 1), atol=1e-6)
    assert torch.allclose(full, pyramid.upsample(coarse, 0, 2), atol=1e-6)


def test_factory_refuses_bad_options(body: ToyBodyModel) -> None:
    with pytest.raises(ValueError, match=r"unknown TORE variant 'XL'.*\['L', 'M', 'S'\]"):
        make_tore(body, BackboneOptions(variant="XL"))
    with pytest.raises(OptionError, match=r"tore backbone option 'keep_ratio' must be a number in \(0, 1\], got 1.5"):
        make_tore(body, BackboneOptions(extra={"keep_ratio": 1.5}))
    with pytest.raises(OptionError, match=r"'keep_ratio' must be a number in \(0, 1\], got 'most'"):
        make_tore(body, BackboneOptions(extra={"keep_ratio": "most"}))
    with pytest.raises(OptionError, match=r"'dropout' must be a number in \[0, 1\), got 1.0"):
        make_tore(body, BackboneOptions(extra={"dropout": 1.0}))
    with pytest.raises(OptionError, match=r"has no option 'keep_ration' \(did you mean 'keep_ratio'\?\)"):
        make_tore(body, BackboneOptions(extra={"keep_ration": 0.5}))


def test_hook_offers_tore() -> None:
    assert pchmr_backbones() == {"tore": make_tore}


# --------------------------------------------------------------------------- parameter counts


class _StubEncoder(FeatureEncoder):
    """Stands in for ResNet-50's 2048-channel 7×7 output: only counted parameters matter."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 1)
        self.out_channels, self.stride = 2048, 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images[:, :, ::32, ::32])


def _smpl_size_pyramid(sizes: tuple[int, ...] = (431, 1723, 6890)) -> MeshPyramid:
    g = torch.Generator().manual_seed(0)

    def one_hot_rows(rows: int, cols: int) -> torch.Tensor:
        index = torch.stack([torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)])
        return torch.sparse_coo_tensor(index, torch.ones(rows), (rows, cols), check_invariants=True)

    ups = tuple(one_hot_rows(fine, coarse) for coarse, fine in zip(sizes[:-1], sizes[1:]))
    downs = tuple(one_hot_rows(coarse, fine) for coarse, fine in zip(sizes[:-1], sizes[1:]))
    faces = tuple(torch.zeros(0, 3, dtype=torch.int64) for _ in sizes)
    return MeshPyramid(sizes, downs, ups, torch.eye(sizes[0], dtype=torch.bool), faces)


def _expected_parameters(layers: int, joints: int = 14, v0: int = 431, kept: int = 39) -> int:
    """Hand count of TORE without its CNN, for 2048 input channels."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    def transformer(d: int, f: int) -> int:
        encoder_layer = 4 * linear(d, d) + linear(d, f) + linear(f, d) + 2 * 2 * d
        decoder_layer = 8 * linear(d, d) + linear(d, f) + linear(f, d) + 3 * 2 * d
        return layers * (encoder_layer + decoder_layer) + 2 * 2 * d

    return (
        linear(2048, 512)  # 1×1 conv
        + 512 * 128 * 9 + 128 + linear(128, kept)  # selector: 3×3 conv, per-cell linear
        + 2 * kept * 512  # LayerNorm over (M, 512)
        + (1 + joints) * 512 + v0 * 128  # camera and joint tokens (512-d), vertex tokens (128-d)
        + transformer(512, 2048) + 2 * transformer(128, 512)
        + 2 * linear(512, 128)  # reductions: camera+image shared, joints
        + 3 * linear(128, 3)  # joint, vertex and camera heads
    )  # fmt: skip


@pytest.mark.parametrize(("variant", "layers", "paper_millions"), [("S", 1, 10.16), ("M", 2, 18.45), ("L", 3, 26.73)])
def test_parameter_count_matches_the_paper_with_smpl_sizes(variant: str, layers: int, paper_millions: float) -> None:
    model = TORE(_smpl_size_pyramid(), 14, _StubEncoder(), 224, layers, keep_ratio=0.8)
    assert model.num_kept == 39
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    count = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids)
    assert count == _expected_parameters(layers)
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.01


# --------------------------------------------------------------------------- token pruning


@pytest.mark.parametrize(
    ("cells", "ratio", "kept"), [(49, 0.8, 39), (64, 0.8, 51), (49, 0.2, 9), (100, 0.29, 29), (4, 0.1, 1)]
)
def test_kept_tokens_is_int_of_cells_times_ratio(cells: int, ratio: float, kept: int) -> None:
    assert kept_tokens(cells, ratio) == kept


def test_pruning_feeds_int_hw_ratio_pooled_tokens_to_the_first_transformer(body: ToyBodyModel) -> None:
    model = make_tore(body, BackboneOptions(extra={"keep_ratio": 0.5})).eval()
    seen: list[torch.Size] = []
    handle = model.transformer_1.register_forward_hook(lambda m, inputs, out: seen.append(inputs[1].shape))
    with torch.no_grad():
        selector = model(_images(3)).aux["token_selector"]
    handle.remove()
    assert seen == [torch.Size((3, 32, 512))]  # int(8 · 8 · 0.5) image tokens instead of 64
    assert selector.shape == (3, 32, 64)
    assert torch.allclose(selector.sum(dim=-1), torch.ones(3, 32), atol=1e-6)  # each a distribution over cells
    assert (selector >= 0).all()


def test_selector_mass_outside_the_body_is_zero_inside_and_the_fraction_outside() -> None:
    body_mask = torch.tensor([[True, True, False, False]])
    inside = torch.tensor([[[0.3, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    half_out = torch.tensor([[[0.3, 0.2, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    valid = torch.tensor([True])
    assert selector_outside_mass(inside, body_mask, valid).item() == 0.0
    assert selector_outside_mass(half_out, body_mask, valid).item() == pytest.approx((0.5 + 1.0) / 2)
    # an invalid sample (no GT mesh) is left out of the mean
    both = torch.cat((inside, half_out))
    mask2 = body_mask.expand(2, -1)
    assert selector_outside_mass(both, mask2, torch.tensor([True, False])).item() == 0.0
    assert selector_outside_mass(both, mask2, torch.tensor([False, False])).item() == 0.0


def test_body_mask_marks_the_cells_that_valid_points_fall_in() -> None:
    # 2×2 grid: cells 0 (top-left), 1 (top-right), 2 (bottom-left), 3 (bottom-right); y is down
    uv = torch.tensor([[[-0.5, -0.5], [0.5, -0.5], [1.0, 1.0], [1.5, 0.0], [-0.5, 0.5]]])
    valid = torch.tensor([[True, True, True, True, False]])
    mask = body_mask_on_grid(uv, valid, 2, 2)
    assert mask.tolist() == [[True, True, False, True]]  # (1.5, 0) lies outside the crop, last point invalid


def test_weak_perspective_fit_recovers_a_known_camera() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(2, 14, 3, generator=g)
    uv = 1.2 * points[..., :2] + torch.tensor([0.1, -0.2])
    weight = torch.ones(2, 14)
    weight[1, 1:] = 0  # a single point cannot fix a scale
    camera, ok = fit_weak_perspective(points, uv, weight)
    assert ok.tolist() == [True, False]
    assert torch.allclose(camera[0], torch.tensor([1.2, 0.1, -0.2]), atol=1e-5)


def _pruning_case(confidence: float) -> tuple[HMROutput, dict[str, torch.Tensor]]:
    """Two samples whose GT mesh projects (camera s=1, t=0 from the keypoints) into cell 21 =
    (row 2, column 5) of the 8×8 grid; the second has no GT mesh. Output camera is (2, 0, 0)."""
    joints = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.1], [0.0, -0.4, 0.0]]).expand(2, -1, -1)
    centre = torch.tensor([-1 + 5.5 * 2 / GRID, -1 + 2.5 * 2 / GRID, 0.0])  # (0.375, -0.375)
    offsets = torch.tensor([[0.05, 0.05, 0.0], [-0.05, 0.1, 0.2], [0.0, -0.1, -0.1]])
    batch = {
        "joints_3d": torch.cat((joints, torch.ones(2, 3, 1)), dim=2),
        "keypoints_2d": torch.cat((joints[..., :2], torch.full((2, 3, 1), confidence)), dim=2),
        "vertices": (centre + offsets).expand(2, -1, -1),
        "has_vertices": torch.tensor([1.0, 0.0]),
    }
    out = HMROutput(
        joints=torch.zeros(2, 3, 3),
        vertices=(torch.zeros(2, 3, 3),),
        camera=torch.tensor([[2.0, 0.0, 0.0]]).expand(2, -1),
        aux={"token_selector": torch.zeros(2, 2, GRID * GRID)},
    )
    return out, batch


def _with_selector(out: HMROutput, selector: torch.Tensor) -> HMROutput:
    return HMROutput(out.joints, out.vertices, out.camera, {"token_selector": selector})


def test_pruning_loss_is_zero_when_all_mass_is_on_the_body_and_positive_otherwise() -> None:
    out, batch = _pruning_case(confidence=1.0)
    on_body = torch.zeros(2, 2, GRID * GRID)
    on_body[0, :, 21] = 1.0
    on_body[1, :, 0] = 1.0  # sample 1 has no GT mesh: ignored
    assert token_pruning_loss(_with_selector(out, on_body), batch, GRID, GRID).item() == 0.0
    partly = on_body.clone()
    partly[0, 0, 21], partly[0, 0, 22] = 0.25, 0.75  # token 0 puts 3/4 next door
    expected = (0.75 + 0.0) / 2
    assert token_pruning_loss(_with_selector(out, partly), batch, GRID, GRID).item() == pytest.approx(expected)


def test_pruning_loss_projects_with_the_predicted_camera_when_keypoints_are_missing() -> None:
    out, batch = _pruning_case(confidence=0.0)
    # camera (2, 0, 0): the mesh lands at (0.75, -0.75) ± 0.2 → cells 15 = (1, 7), 7 = (0, 7) and 23 = (2, 7)
    selector = torch.zeros(2, 2, GRID * GRID)
    selector[:, :, 15] = 1.0
    assert token_pruning_loss(_with_selector(out, selector), batch, GRID, GRID).item() == 0.0
    selector = torch.zeros(2, 2, GRID * GRID)
    selector[:, :, 21] = 1.0  # the cell the keypoint-fitted camera would have used
    assert token_pruning_loss(_with_selector(out, selector), batch, GRID, GRID).item() == 1.0


# --------------------------------------------------------------------------- training behaviour


def test_gradients_reach_every_trainable_parameter_and_the_pruning_loss_trains_the_selector(body: ToyBodyModel) -> None:
    torch.manual_seed(1)
    model = make_tore(body, BackboneOptions(variant="S")).train()
    batch = toy_batch(body, 2, SIZE, torch.Generator().manual_seed(0))
    out = model(batch["image"])
    pruning = model.extra_losses(out, batch)[PRUNING_LOSS]
    assert 0.0 < pruning.item() < 1.0
    pruning.backward(retain_graph=True)
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"selector.conv.weight", "selector.fc.weight", "conv_1x1.weight", "encoder.layers.0.weight"} <= reached
    assert not any(n.startswith(("transformer_", "joint_tokens", "vertex_tokens")) for n in reached)
    model.zero_grad()
    loss = pruning + out.joints.square().sum() + out.camera.square().sum() + sum(v.square().sum() for v in out.vertices)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_hmr_module_adds_the_pruning_term_with_tores_weight_and_warm_up(body: ToyBodyModel, model_s: TORE) -> None:
    module = HMRModule(model_s, body)
    batch = toy_batch(body, 2, SIZE, torch.Generator().manual_seed(1))
    model_s.eval()
    with torch.no_grad():
        terms = module.compute_losses(batch, module(batch["image"]))
    assert terms[PRUNING_LOSS] > 0
    expected = (
        1000 * terms["joints_3d"]
        + 1000 * terms["reg_joints_3d"]
        + 100 * terms["vertices"]
        + 100 * terms["joints_2d"]
        + 500 * terms["edge"]
        + 10 * terms["normal"]
    )
    # epoch 0 of training: 1e-3 * 16 * M, ramped by sigmoid(0 - 3)
    weight = 1e-3 * 16 * model_s.num_kept / (1 + math.exp(3))
    assert torch.allclose(terms["loss"], expected + weight * terms[PRUNING_LOSS], rtol=1e-5)
    context = RoundContext(3, 0, 2, 1e-3, {"server-round": 3, "local-epochs": 2}, {})
    with module.round(context):  # a federated client at epoch (3 - 1) * 2 = 4
        assert module.training_epoch == 4
    assert module.training_epoch == 0, "outside a round the epoch is the local one"
    assert model_s.extra_loss_schedule(4)[PRUNING_LOSS] == pytest.approx(1 / (1 + math.exp(-1)))


def test_vertices_depend_on_the_image_only_through_camera_and_joint_features(model_s: TORE) -> None:
    model_s.eval()
    a, b = _images(2, seed=1), _images(2, seed=2)
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    handle = model_s.transformer_2.register_forward_hook(lambda m, i, out: captured.__setitem__("b", out))  # last call
    with torch.no_grad():
        out_a, out_b = model_s(a), model_s(b)
    handle.remove()
    camera_b, image_b, joints_b = captured["b"]
    assert not torch.allclose(out_a.vertices[0], out_b.vertices[0], atol=1e-4)

    def run_a_with(swap):
        handle = model_s.transformer_2.register_forward_hook(lambda m, i, out: swap(*out))
        with torch.no_grad():
            result = model_s(a)
        handle.remove()
        return result

    # image A, but B's camera and joint features after transformer 2 → exactly B's mesh
    mixed = run_a_with(lambda camera, image, joints: (camera_b, image, joints_b))
    assert torch.allclose(mixed.vertices[0], out_b.vertices[0], atol=1e-6)
    # B's encoded image tokens instead of A's → A's mesh unchanged
    mixed = run_a_with(lambda camera, image, joints: (camera, image_b, joints))
    assert torch.equal(mixed.vertices[0], out_a.vertices[0])
    with torch.no_grad():
        assert torch.allclose(model_s.decode_vertices(camera_b, joints_b), out_b.vertices[0], atol=1e-6)


def test_state_dict_holds_only_learned_state(body: ToyBodyModel, model_s: TORE) -> None:
    state = model_s.state_dict()
    assert not any(k.startswith(("pos_", "up_", "vertex_allowed")) for k in state)
    fresh = make_tore(body, BackboneOptions(variant="S")).eval()
    fresh.load_state_dict(state)
    model_s.eval()
    with torch.no_grad():
        assert torch.equal(fresh(_images(1)).vertices[-1], model_s(_images(1)).vertices[-1])


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 3, 32, 32), r"64x64 \(B, 3, 64, 64\)"),
        (torch.zeros(2, 1, 64, 64), r"3 channels \(B, 3, 64, 64\)"),
        (torch.zeros(3, 64, 64), r"\(B, 3, 64, 64\)"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_bad_images_raise_input_error(model_s: TORE, images: torch.Tensor, message: str) -> None:
    with pytest.raises(InputError, match=message):
        model_s(images)


def test_features_of_another_grid_raise_input_error(model_s: TORE) -> None:
    with pytest.raises(InputError, match=r"\(B, 256, 8, 8\).*51 kept tokens\), got \(1, 256, 7, 7\)"):
        model_s.forward_features(torch.zeros(1, 256, 7, 7))
