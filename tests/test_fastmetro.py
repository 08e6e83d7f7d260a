"""FastMETRO backbone, its encoders and the toy doubles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pchmr.core.contracts.backbone import BackboneOptions, HMROutput, InputError
from pchmr.core.contracts.bodymodel import MeshPyramid
from pchmr.core.contracts.errors import OptionError
from pchmr.core.contracts.sample import validate_sample
from pchmr.core.kit.encoders import (
    FeatureEncoder,
    ResNet50Encoder,
    SmallEncoder,
    build_encoder,
    load_encoder_weights,
)
from pchmr.core.kit.transformer import (
    MultiHeadAttention,
    fast_dropout,
    sine_position_encoding,
)
from pchmr.plugins.backbones.fastmetro import (
    INIT_CAMERA_SCALE,
    FastMETRO,
    make_fastmetro,
    pchmr_backbones,
    query_attention_mask,
)
from pchmr.testing.toys import ToyBodyModel, toy_batch

SIZE = 64


@pytest.fixture(scope="module")
def body() -> ToyBodyModel:
    return ToyBodyModel()


@pytest.fixture(scope="module")
def model_s(body: ToyBodyModel) -> FastMETRO:
    torch.manual_seed(0)
    return make_fastmetro(body, BackboneOptions(variant="S"))


def _images(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("variant", ["S", "m", "L"])
def test_outputs_have_contract_shapes_for_every_variant(body: ToyBodyModel, variant: str) -> None:
    model = make_fastmetro(body, BackboneOptions(variant=variant))
    out = model(_images(2))
    assert isinstance(out, HMROutput)
    assert out.joints.shape == (2, 14, 3)
    assert [tuple(v.shape) for v in out.vertices] == [(2, 38, 3), (2, 146, 3), (2, 578, 3)]
    assert out.camera.shape == (2, 3)
    expected_layers = {"S": 1, "M": 2, "L": 3}[variant.upper()]
    assert len(model.transformer_1.encoder_layers) == expected_layers
    assert len(model.transformer_2.decoder_layers) == expected_layers


def test_unknown_variant_lists_the_variants(body: ToyBodyModel) -> None:
    with pytest.raises(ValueError, match=r"unknown FastMETRO variant 'XL'.*\['L', 'M', 'S'\]"):
        make_fastmetro(body, BackboneOptions(variant="XL"))


def test_unknown_encoder_lists_the_encoders(body: ToyBodyModel) -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'vit'.*\['resnet50', 'small'\]"):
        make_fastmetro(body, BackboneOptions(encoder="vit"))


def test_bad_dropout_option_is_refused(body: ToyBodyModel) -> None:
    with pytest.raises(OptionError, match=r"fastmetro backbone option 'dropout' must be a number in \[0, 1\), got 1.5"):
        make_fastmetro(body, BackboneOptions(extra={"dropout": 1.5}))
    with pytest.raises(OptionError, match=r"'dropout' must be a number in \[0, 1\), got 'lots'"):
        make_fastmetro(body, BackboneOptions(extra={"dropout": "lots"}))
    with pytest.raises(OptionError, match="'encoder_norm' must be one of batch, group, got 'layer'"):
        make_fastmetro(body, BackboneOptions(extra={"encoder_norm": "layer"}))


def test_hook_offers_fastmetro() -> None:
    assert pchmr_backbones() == {"fastmetro": make_fastmetro}


def test_untrained_camera_has_positive_scale_near_the_body_fit(model_s: FastMETRO) -> None:
    model_s.eval()
    camera = model_s(_images(4)).camera
    # s0 = 0.9 / 0.85 maps a 1.7 m body to ±0.9; the head starts with 1% of its usual weights
    assert INIT_CAMERA_SCALE == pytest.approx(1.0588, abs=1e-4)
    assert torch.allclose(camera[:, 0], torch.full((4,), INIT_CAMERA_SCALE), atol=0.05)
    assert camera[:, 1:].abs().max() < 0.05
    with torch.no_grad():
        model_s.camera_head.bias[0] = -100.0  # a very negative raw scale stays positive
        assert (model_s(_images(1)).camera[:, 0] > 0).all()
        model_s.camera_head.bias[0] = 0.0


def test_untrained_mesh_starts_near_the_root_yet_depends_on_the_image(model_s: FastMETRO) -> None:
    # the xyz head starts small: no random ±0.6 m offsets for the first steps to undo ...
    model_s.eval()
    first, second = model_s(_images(1, seed=1)), model_s(_images(1, seed=2))
    assert first.joints.abs().max() < 0.05 and first.vertices[0].abs().max() < 0.05
    # ... but not zero: the outputs still carry the features, so every layer gets gradients
    assert not torch.allclose(first.vertices[0], second.vertices[0], atol=1e-6)
    default = torch.nn.Linear(128, 3).weight.abs().mean()
    assert 0 < model_s.xyz_head.weight.abs().mean() < 0.05 * default
    model_s.train()


def test_mesh_levels_follow_the_pyramid(body: ToyBodyModel, model_s: FastMETRO) -> None:
    model_s.eval()
    pyramid = body.pyramid()
    coarse, middle, full = model_s(_images(2)).vertices
    # middle starts as the fixed up[0] (bias 0); full is always the fixed up[1] of middle
    assert torch.allclose(middle, pyramid.upsample(coarse, 0, 1), atol=1e-5)
    assert torch.allclose(full, pyramid.upsample(middle, 1, 2), atol=1e-6)


def test_fewer_than_three_pyramid_levels_are_refused(body: ToyBodyModel) -> None:
    p = body.pyramid()
    two = MeshPyramid(p.num_vertices[1:], p.down[1:], p.up[1:], torch.ones(146, 146, dtype=torch.bool), p.faces[1:])
    with pytest.raises(ValueError, match="at least 3 levels"):
        FastMETRO(two, 14, SmallEncoder(SIZE), SIZE, 1)


# --------------------------------------------------------------------------- parameter counts


class _StubEncoder(FeatureEncoder):
    """Stands in for ResNet-50's 2048-channel output: only counted parameters matter."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 2048, 1)
        self.out_channels, self.stride = 2048, 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images[:, :, ::32, ::32])


def _random_pyramid(sizes: tuple[int, ...]) -> MeshPyramid:
    g = torch.Generator().manual_seed(0)

    def one_hot_rows(rows: int, cols: int) -> torch.Tensor:
        index = torch.stack([torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)])
        return torch.sparse_coo_tensor(index, torch.ones(rows), (rows, cols), check_invariants=True)

    ups, downs = [], []
    for coarse, fine in zip(sizes[:-1], sizes[1:]):
        ups.append(one_hot_rows(fine, coarse))
        downs.append(one_hot_rows(coarse, fine))
    adjacency = torch.eye(sizes[0], dtype=torch.bool)
    faces = tuple(torch.zeros(0, 3, dtype=torch.int64) for _ in sizes)
    return MeshPyramid(sizes, tuple(downs), tuple(ups), adjacency, faces)


def _expected_parameters(layers: int, joints: int = 14, v0: int = 431, v1: int = 1723) -> int:
    """Hand count of FastMETRO without its CNN, for 2048 input channels."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    def attention(d: int) -> int:
        return 4 * linear(d, d)

    def encoder_layer(d: int, f: int) -> int:
        return attention(d) + linear(d, f) + linear(f, d) + 2 * 2 * d

    def decoder_layer(d: int, f: int) -> int:
        return 2 * attention(d) + linear(d, f) + linear(f, d) + 3 * 2 * d

    def transformer(d: int, f: int) -> int:
        return layers * (encoder_layer(d, f) + decoder_layer(d, f)) + 2 * 2 * d

    return (
        2048 * 512 + 512  # 1×1 conv
        + (1 + joints + v0) * 512  # camera, joint and vertex tokens
        + transformer(512, 2048) + transformer(128, 512)
        + 3 * linear(512, 128)  # dimensionality reduction
        + 2 * linear(128, 3)  # xyz and camera heads
        + linear(v0, v1)  # learnable coarse→middle upsampling
    )  # fmt: skip


@pytest.mark.parametrize(("variant", "layers", "paper_millions"), [("S", 1, 10.04), ("M", 2, 17.86), ("L", 3, 25.68)])
def test_parameter_count_matches_the_paper_with_smpl_sizes(variant: str, layers: int, paper_millions: float) -> None:
    model = FastMETRO(_random_pyramid((431, 1723, 6890)), 14, _StubEncoder(), 224, layers, learned_upsampling=True)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    count = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids)
    assert count == _expected_parameters(layers)
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.01


def test_fixed_upsampling_drops_exactly_the_learnable_layer() -> None:
    pyramid = _random_pyramid((431, 1723, 6890))
    fixed = FastMETRO(pyramid, 14, _StubEncoder(), 224, 1)
    learned = FastMETRO(pyramid, 14, _StubEncoder(), 224, 1, learned_upsampling=True)
    assert (
        sum(p.numel() for p in learned.parameters()) - sum(p.numel() for p in fixed.parameters()) == 431 * 1723 + 1723
    )
    assert not any(k.startswith("coarse_to_middle") for k in fixed.state_dict())


@pytest.mark.parametrize("learned", [False, True])
def test_middle_level_is_the_pyramid_upsampling_of_the_coarse_mesh_at_init(body: ToyBodyModel, learned: bool) -> None:
    torch.manual_seed(0)
    model = make_fastmetro(body, BackboneOptions(extra={"learned_upsampling": learned})).eval()
    with torch.no_grad():
        out = model(_images(2))
    up = body.pyramid().up[0].to_dense()
    torch.testing.assert_close(out.vertices[1], torch.einsum("mn,bnc->bmc", up, out.vertices[0]), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- training behaviour


def test_gradients_reach_every_trainable_parameter(body: ToyBodyModel) -> None:
    torch.manual_seed(1)
    model = make_fastmetro(body, BackboneOptions(variant="S"))
    model.train()
    out = model(_images(2))
    loss = out.joints.square().sum() + out.camera.square().sum() + sum(v.square().sum() for v in out.vertices)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert sum(1 for _ in model.parameters()) > 50


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout(model_s: FastMETRO) -> None:
    images = _images(2)
    model_s.eval()
    with torch.no_grad():
        a, b = model_s(images), model_s(images)
    assert torch.equal(a.joints, b.joints) and torch.equal(a.vertices[-1], b.vertices[-1])
    model_s.train()
    with torch.no_grad():
        c, d = model_s(images), model_s(images)
    model_s.eval()
    assert not torch.allclose(c.joints, d.joints)


def test_eval_output_does_not_depend_on_the_batch(model_s: FastMETRO) -> None:
    model_s.eval()
    images = _images(3)
    with torch.no_grad():
        together = model_s(images)
        alone = [model_s(images[i : i + 1]) for i in range(3)]
    for i, out in enumerate(alone):
        assert torch.allclose(together.joints[i], out.joints[0], atol=1e-5)
        assert torch.allclose(together.vertices[-1][i], out.vertices[-1][0], atol=1e-5)
        assert torch.allclose(together.camera[i], out.camera[0], atol=1e-5)


# --------------------------------------------------------------------------- attention mask


def test_query_mask_lets_joints_see_all_and_vertices_see_joints_and_neighbours() -> None:
    adjacency = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    allowed = query_attention_mask(2, adjacency)
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_decoder_blocks_attention_between_non_adjacent_vertices(body: ToyBodyModel, model_s: FastMETRO) -> None:
    model_s.eval()
    adjacency = body.pyramid().adjacency
    joints, k = 14, 0
    transformer = model_s.transformer_1  # one decoder layer in FastMETRO-S
    g = torch.Generator().manual_seed(3)
    camera, image = torch.randn(1, 1, 512, generator=g), torch.randn(1, 64, 512, generator=g)
    pos = sine_position_encoding(8, 8, 512)
    queries = torch.cat((model_s.joint_tokens, model_s.vertex_tokens)).detach()[None]
    moved = queries.clone()
    moved[0, joints + k] += 3.0 * torch.randn(512, generator=g)  # not constant: LayerNorm removes that
    with torch.no_grad():
        before = transformer(camera, image, queries, pos, model_s.query_allowed)[2][0, joints:]
        after = transformer(camera, image, moved, pos, model_s.query_allowed)[2][0, joints:]
    change = (after - before).abs().amax(dim=1)
    neighbours = adjacency[k].clone()
    neighbours[k] = False
    assert 0 < int(neighbours.sum()) < adjacency.shape[0] - 1
    assert (change[neighbours] > 1e-3).all()
    assert (change[~adjacency[k]] < 1e-6).all()


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
def test_bad_images_raise_input_error(model_s: FastMETRO, images: torch.Tensor, message: str) -> None:
    with pytest.raises(InputError, match=message):
        model_s(images)


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(("size", "grid", "stride"), [(64, 8, 8), (128, 8, 16), (224, 7, 32)])
def test_small_encoder_keeps_the_grid_at_most_eight_cells(size: int, grid: int, stride: int) -> None:
    encoder = build_encoder("small", size).eval()
    with torch.no_grad():
        features = encoder(_images(1, size))
    assert features.shape == (1, 256, grid, grid)
    assert encoder.stride == stride and encoder.grid_size(size) == grid


def test_group_norm_small_encoder_has_no_running_statistics(body: ToyBodyModel) -> None:
    model = make_fastmetro(body, BackboneOptions(extra={"encoder_norm": "group"}))
    assert not any("running_mean" in k for k in model.state_dict())
    assert model(_images(1)).joints.shape == (1, 14, 3)
    with pytest.raises(ValueError, match=r"unknown encoder norm 'layer'.*\['batch', 'group'\]"):
        build_encoder("small", SIZE, norm="layer")


def test_frozen_encoder_keeps_weights_and_statistics_while_the_head_trains(body: ToyBodyModel) -> None:
    torch.manual_seed(0)
    model = make_fastmetro(body, BackboneOptions(variant="S", freeze_encoder=True))
    model.train()
    assert model.encoder.frozen and not model.encoder.training and model.transformer_1.training
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.xyz_head.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(_images(4))
    (out.joints.square().mean() + out.vertices[-1].abs().mean()).backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm statistics moved"
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not torch.equal(head_before, model.xyz_head.weight)
    with pytest.raises(
        OptionError, match=r"fastmetro backbone has no option 'freeze_encoder'; its options are: dropout"
    ):
        make_fastmetro(body, BackboneOptions(extra={"freeze_encoder": True}))  # a core option now


def _torchvision_resnet50_keys() -> dict[str, tuple[int, ...]]:
    """Key → shape of torchvision's ``resnet50().state_dict()`` without ``fc``, written out
    from its definition: layers [3, 4, 6, 3], widths 64·2^i, expansion 4, stride on conv2."""

    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}  # fmt: skip

    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for layer, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            p = f"layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            keys.update(bn(f"{p}.bn1", width))
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            keys.update(bn(f"{p}.bn2", width))
            keys[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            keys.update(bn(f"{p}.bn3", 4 * width))
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * width, inplanes, 1, 1)
                keys.update(bn(f"{p}.downsample.1", 4 * width))
            inplanes = 4 * width
    return keys


def test_resnet50_state_dict_has_torchvision_key_layout() -> None:
    encoder = ResNet50Encoder()
    state = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    expected = _torchvision_resnet50_keys()
    assert list(state) == list(expected)  # same names, same order
    assert state == expected
    assert len(state) == 318  # torchvision's 320 minus fc.weight and fc.bias
    assert state["layer3.0.downsample.0.weight"] == (1024, 512, 1, 1)
    assert state["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    # torchvision resnet50 has 25,557,032 parameters, of which fc holds 2048*1000 + 1000
    assert sum(p.numel() for p in encoder.parameters()) == 25_557_032 - 2_049_000
    encoder.eval()
    with torch.no_grad():
        assert encoder(_images(1, 224)).shape == (1, 2048, 7, 7)


def test_encoder_weights_load_from_a_torchvision_style_file(tmp_path) -> None:
    source = build_encoder("small", SIZE)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 256), torch.zeros(1000)  # ignored
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded = build_encoder("small", SIZE, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    del state["layers.0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['layers.0.weight'\] \(1\)"):
        load_encoder_weights(build_encoder("small", SIZE), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder_weights(source, tmp_path / "absent.pth")


# --------------------------------------------------------------------------- toys


def test_toy_pyramid_is_nested_and_convex(body: ToyBodyModel) -> None:
    p = body.pyramid()
    assert p.num_vertices == (38, 146, 578) and body.num_vertices == 578
    for matrix in (*p.up, *p.down):
        assert torch.allclose(torch.sparse.sum(matrix, dim=1).to_dense(), torch.ones(matrix.shape[0]))
    template = body.template[None]
    # a coarse vertex is a full vertex, so upsampling then downsampling is the identity
    coarse = p.downsample(template, 0)
    assert torch.allclose(p.downsample(p.upsample(coarse, 0), 0), coarse)
    assert torch.equal(p.adjacency, p.adjacency.T) and p.adjacency.diagonal().all()
    assert (p.adjacency.sum(1) - 1).float().mean() == pytest.approx(2 * 72 * 3 / 2 / 38)  # 2E/V, E = 3F/2


def test_toy_body_is_a_symmetric_standing_body(body: ToyBodyModel) -> None:
    out = body(global_orient=torch.zeros(1, 3), betas=torch.zeros(1, 2))
    height = out.vertices[0, :, 1].amax() - out.vertices[0, :, 1].amin()
    assert height == pytest.approx(1.7, abs=1e-4)
    joints = out.joints[0]
    mirrored = joints[list(body.flip_permutation)] * torch.tensor([-1.0, 1.0, 1.0])
    assert torch.allclose(mirrored, joints, atol=1e-5)
    assert joints[body.joint_names.index("head"), 1] > joints[body.joint_names.index("right_ankle"), 1]
    turned = body(global_orient=torch.tensor([[0.0, 0.0, torch.pi]]), betas=torch.zeros(1, 2))
    assert torch.allclose(turned.vertices[0, :, 1], -out.vertices[0, :, 1], atol=1e-5)


def test_toy_batch_holds_valid_samples(body: ToyBodyModel) -> None:
    batch = toy_batch(body, 3, SIZE, torch.Generator().manual_seed(0))
    for i in range(3):
        sample = {k: (v if k == "meta" else v[i]) for k, v in batch.items()}
        sample["meta"] = {k: v[i] for k, v in batch["meta"].items()}
        validate_sample(sample, num_joints=14, num_vertices=578, image_size=SIZE)
    root = body.root(batch["joints_3d"][..., :3])
    assert root.abs().max() < 1e-6
    head, ankle = body.joint_names.index("head"), body.joint_names.index("right_ankle")
    assert (batch["joints_3d"][:, head, 1] < batch["joints_3d"][:, ankle, 1]).all()  # camera y is down
    again = toy_batch(body, 3, SIZE, torch.Generator().manual_seed(0))
    assert torch.equal(again["vertices"], batch["vertices"])


# --------------------------------------------------------------------------- dropout


def test_fast_dropout_drops_a_fraction_p_and_rescales_the_rest() -> None:
    torch.manual_seed(0)
    x = torch.full((1000, 1001), 2.0, requires_grad=True)  # odd element count on purpose
    y = fast_dropout(x, 0.25)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.002)  # binomial sd ≈ 0.0004
    assert torch.equal(y.unique(), torch.tensor([0.0, 2.0 / 0.75]))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.75)  # gradient flows through kept elements only
    assert fast_dropout(x, 0.25, training=False) is x
    assert fast_dropout(x, 0.0) is x
    torch.manual_seed(5)
    a = fast_dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, fast_dropout(x, 0.5))  # reproducible from torch's seed


def test_attention_dropout_keeps_masked_pairs_at_zero_weight() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 2, dropout=0.5).train()
    allowed = torch.tensor([[True, False], [True, True]])
    x = torch.randn(4, 2, 16)
    moved = x.clone()
    moved[:, 1] += torch.randn(16)
    torch.manual_seed(1)
    a = attention(x, x, x, allowed)
    torch.manual_seed(1)
    b = attention(moved, moved, moved, allowed)
    # query 0 may not attend to token 1, so moving token 1 changes nothing for query 0
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_attention_dropout_matches_plain_softmax_masked_fill_in_values_and_gradients() -> None:
    """The fused softmax-dropout of the CPU attention path equals the written-out autograd graph
    (softmax, zero the dropped weights, · v, scale by 1/(1-p)) given the same draws."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 2, dropout=0.3).train()
    allowed = torch.rand(5, 5) < 0.6
    allowed |= torch.eye(5, dtype=torch.bool)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    fused = attention(x, x, x, allowed)
    (grad_fused,) = torch.autograd.grad(fused.square().sum(), x)

    from pchmr.core.kit import transformer as tr

    q, k, v = (attention._split(proj(x)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    torch.manual_seed(7)
    drop = tr._drop_mask((3 * 2, 5, 5), 0.3).view(3, 2, 5, 5)
    weights = scores.softmax(-1).masked_fill(drop, 0.0)
    out = (weights @ v) * tr._drop_threshold(0.3)[1]
    reference = attention.out_proj(out.transpose(1, 2).reshape(3, 5, 16))
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
    assert 0 < drop.float().mean().item() < 1
    assert torch.allclose(fused, reference, atol=1e-5)
    assert torch.allclose(grad_fused, grad_reference, atol=1e-4)


def test_sine_position_encoding_matches_hand_values() -> None:
    # 1×2 grid, dim 4: frequencies are 1, so channels = sin/cos of 2π·row and of π·col, 2π·col
    pos = sine_position_encoding(1, 2, 4)
    expected = torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.0, 1.0, 0.0, 1.0]])
    assert torch.allclose(pos, expected, atol=1e-4)
    assert sine_position_encoding(8, 8, 512).shape == (64, 512)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(2, 2, 6)


def test_state_dict_round_trip_holds_only_learned_state(body: ToyBodyModel, model_s: FastMETRO) -> None:
    model_s.eval()
    state = model_s.state_dict()
    assert not any(k.startswith(("query_allowed", "up_")) for k in state)  # topology is rebuilt, not sent
    assert all(not v.is_sparse for v in state.values())
    fresh = make_fastmetro(body, BackboneOptions(variant="S")).eval()
    fresh.load_state_dict(state)
    images = _images(2)
    with torch.no_grad():
        assert torch.equal(fresh(images).vertices[-1], model_s(images).vertices[-1])


def test_training_attention_path_equals_the_fused_kernel_without_drops() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 4, dropout=1e-9)  # rounds to 0 of 2^16 levels: nothing dropped
    allowed = torch.rand(5, 7) < 0.5
    allowed[:, 0] = True
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    written_out = attention.train()(q, kv, kv, allowed)
    fused = attention.eval()(q, kv, kv, allowed)
    assert torch.allclose(written_out, fused, atol=1e-5)
