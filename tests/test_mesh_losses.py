"""Edge-length and normal-vector mesh losses on hand-computed triangles."""

from __future__ import annotations

import math

import pytest
import torch

from pchmr.core.engine.mesh_losses import edge_length_loss, normal_loss, unique_edges

TRIANGLE = torch.tensor([[0, 1, 2]])
#: A unit square split along its diagonal 1–2: five unique edges, the diagonal shared.
QUAD = torch.tensor([[0, 1, 2], [1, 3, 2]])
RIGHT_TRIANGLE = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
SQUARE = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])


def test_unique_edges_matches_a_set_of_sorted_pairs_on_a_random_mesh() -> None:
    g = torch.Generator().manual_seed(0)
    faces = torch.randint(0, 300, (2000, 3), generator=g)
    expected = sorted({tuple(sorted((int(f[a]), int(f[b])))) for f in faces for a, b in ((0, 1), (1, 2), (2, 0))})
    assert unique_edges(faces).tolist() == [list(e) for e in expected]
    assert unique_edges(faces[:0]).shape == (0, 2)


def test_unique_edges_count_a_shared_edge_once() -> None:
    edges = unique_edges(QUAD)
    assert edges.tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]


def test_edge_loss_of_a_triangle_scaled_by_two() -> None:
    # pred edges 1, 1, √2; GT (pred × 2) edges 2, 2, 2√2: differences 1, 1, √2
    loss = edge_length_loss(RIGHT_TRIANGLE, 2 * RIGHT_TRIANGLE, TRIANGLE)
    assert loss.item() == pytest.approx((2 + math.sqrt(2)) / 3, abs=1e-6)


def test_edge_loss_counts_each_edge_of_a_quad_once() -> None:
    # moving vertex 3 by +1 in x stretches edge 1–3 from 1 to √2 and edge 2–3 from 1 to 2
    pred = SQUARE.clone()
    pred[0, 3, 0] += 1.0
    loss = edge_length_loss(pred, SQUARE, QUAD)
    assert loss.item() == pytest.approx((math.sqrt(2) - 1 + 1) / 5, abs=1e-6)  # 5 edges, not 6


def test_edge_loss_ignores_translation_and_is_zero_for_the_gt_itself() -> None:
    shifted = SQUARE + torch.tensor([0.3, -2.0, 5.0])
    assert edge_length_loss(shifted, SQUARE, QUAD).item() == pytest.approx(0.0, abs=1e-6)


def test_normal_loss_of_a_tilted_triangle() -> None:
    # GT lies in z = 0 (normal ±z); lifting vertex 2 to z = 1 tilts edges 0→2 and 1→2:
    # |cos| = 0 for (1,0,0), 1/√2 for (0,1,1), 1/√3 for (−1,1,1)
    pred = RIGHT_TRIANGLE.clone()
    pred[0, 2, 2] = 1.0
    loss = normal_loss(pred, RIGHT_TRIANGLE, TRIANGLE)
    assert loss.item() == pytest.approx((0 + 1 / math.sqrt(2) + 1 / math.sqrt(3)) / 3, abs=1e-6)


def test_normal_loss_is_zero_for_any_in_plane_face_and_sign_free() -> None:
    # scaled, translated and mirrored within the GT plane: every edge stays orthogonal to the normal
    pred = RIGHT_TRIANGLE * torch.tensor([-3.0, 0.5, 1.0]) + torch.tensor([1.0, 2.0, 0.0])
    assert normal_loss(pred, RIGHT_TRIANGLE, TRIANGLE).item() == pytest.approx(0.0, abs=1e-7)


def test_losses_average_valid_samples_only() -> None:
    pred = torch.cat((RIGHT_TRIANGLE, RIGHT_TRIANGLE))
    pred[0, 2, 2] = 1.0  # sample 0 tilted, sample 1 exact
    gt = torch.cat((RIGHT_TRIANGLE, 2 * RIGHT_TRIANGLE))
    tilted = (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 3
    assert normal_loss(pred, gt, TRIANGLE).item() == pytest.approx(tilted / 2, abs=1e-6)
    assert normal_loss(pred, gt, TRIANGLE, valid=torch.tensor([1.0, 0.0])).item() == pytest.approx(tilted, abs=1e-6)
    assert normal_loss(pred, gt, TRIANGLE, valid=torch.tensor([0.0, 1.0])).item() == pytest.approx(0.0, abs=1e-6)
    scaled = (2 + math.sqrt(2)) / 3
    assert edge_length_loss(pred, gt, TRIANGLE, valid=torch.tensor([0.0, 1.0])).item() == pytest.approx(scaled, 1e-6)


def test_losses_are_zero_with_a_gradient_when_no_sample_is_valid() -> None:
    pred = RIGHT_TRIANGLE.clone().requires_grad_(True)
    loss = edge_length_loss(pred, 2 * RIGHT_TRIANGLE, TRIANGLE, valid=torch.zeros(1)) + normal_loss(
        pred, RIGHT_TRIANGLE, TRIANGLE, valid=torch.zeros(1)
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_edge_loss_gradient_shrinks_a_too_long_edge() -> None:
    pred = (2 * RIGHT_TRIANGLE).requires_grad_(True)
    edge_length_loss(pred, RIGHT_TRIANGLE, TRIANGLE).backward()
    # vertex 1 at (2, 0, 0): edges to 0 and 2 are too long, so descending pulls it towards −x
    assert pred.grad[0, 1, 0] > 0


@pytest.mark.parametrize(
    ("pred", "gt", "faces", "message"),
    [
        (torch.zeros(4, 3), torch.zeros(4, 3), QUAD, r"pred must be \(B, V, 3\)"),
        (torch.zeros(1, 4, 3), torch.zeros(1, 3, 3), QUAD, r"gt must have pred's shape \(1, 4, 3\)"),
        (torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), torch.zeros(2, 4, dtype=torch.int64), r"faces must be \(F, 3\)"),
        (torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), QUAD, "index vertices 0..3 but the meshes have 3"),
    ],
)
def test_bad_shapes_are_refused(pred: torch.Tensor, gt: torch.Tensor, faces: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        edge_length_loss(pred, gt, faces)
    with pytest.raises(ValueError, match=message):
        normal_loss(pred, gt, faces)
