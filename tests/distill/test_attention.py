from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.attention import attention_distance, attention_map, resize_to
from tests.distill.tiny_nets import np_at_dist, np_attention, np_resize


def test_attention_map_by_hand():
    # 2 channels, 2x2: |z|^2 mean over channels = [[1, 0], [0, 1]] -> normalised [1/sqrt2, 0, 0, 1/sqrt2]
    z = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]]])
    a = attention_map(z, p=2)
    np.testing.assert_allclose(a.numpy(), [[2**-0.5, 0, 0, 2**-0.5]], atol=1e-7)


def test_distance_of_disjoint_maps_is_two():
    s = torch.zeros(1, 2, 4, 4)
    t = torch.zeros(1, 2, 4, 4)
    s[0, :, 0, 0] = 3.0
    t[0, 1, 3, 3] = 0.5
    assert attention_distance(s, t).item() == pytest.approx(2.0)  # orthogonal unit vectors
    assert attention_distance(s, 7 * s).item() == pytest.approx(0.0, abs=1e-7)  # scale-invariant


@pytest.mark.parametrize("p", [2.0, 4.0])
def test_distance_matches_numpy_2x4x4(p):
    g = np.random.default_rng(0)
    s, t = g.normal(size=(3, 2, 4, 4)), g.normal(size=(3, 5, 4, 4))
    got = attention_distance(torch.tensor(s), torch.tensor(t), p=p).item()
    assert got == pytest.approx(np_at_dist(s, t, p), rel=1e-9)


@pytest.mark.parametrize("shape_s,shape_t", [((2, 2, 2, 2), (2, 3, 4, 4)), ((2, 2, 8, 8), (2, 3, 4, 4)),
                                             ((1, 2, 2, 2, 2), (1, 3, 4, 4, 4))])
def test_student_map_resized_to_teacher_2d_3d(shape_s, shape_t):
    g = np.random.default_rng(1)
    s, t = g.normal(size=shape_s), g.normal(size=shape_t)
    got = attention_distance(torch.tensor(s), torch.tensor(t)).item()
    assert got == pytest.approx(np_at_dist(s, t), rel=1e-9)
    assert attention_map(torch.tensor(s), size=shape_t[2:]).shape == (shape_s[0], int(np.prod(shape_t[2:])))


def test_resize_matches_numpy_and_rejects_bad_sizes():
    x = np.arange(2 * 3 * 3, dtype=float).reshape(1, 2, 3, 3)
    np.testing.assert_allclose(resize_to(torch.tensor(x), (5, 4)).numpy(), np_resize(x, (5, 4)), rtol=1e-12)
    a = np_attention(x, 4, size=(6, 6))
    np.testing.assert_allclose(attention_map(torch.tensor(x), size=(6, 6)).numpy(), a, rtol=1e-9)
    with pytest.raises(ValueError, match="axes"):
        resize_to(torch.zeros(1, 1, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="Cannot compare"):
        attention_distance(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))


def test_representation_is_rescaled_before_the_attention_map_by_hand():
    """HLFD Eq. 1: rescale the student's representation to the teacher's size, THEN take |z|^p (worked by hand).

    Student z = [1, -1, 2, 2] along one axis, rescaled (2x shrink: area average of pairs) from 4 to 2 positions:
    [(1 - 1) / 2, (2 + 2) / 2] = [0, 2]; p = 2 -> [0, 4] -> unit vector [0, 1]. The teacher [0, 3] gives [0, 9] ->
    [0, 1], so the paper's distance is 0. Resizing the map instead ([1, 1, 4, 4] -> [1, 4]) would give
    (1/sqrt(17))^2 + (4/sqrt(17) - 1)^2 = 0.0597.
    """
    s = torch.tensor([1.0, -1.0, 2.0, 2.0], dtype=torch.float64).reshape(1, 1, 1, 4)
    t = torch.tensor([0.0, 3.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    torch.testing.assert_close(attention_map(s, p=2, size=(1, 2)), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    assert attention_distance(s, t, p=2).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- D1: shrinking reaches every position


def test_area_shrink_by_hand_and_growing_stays_linear():
    x = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0], dtype=torch.float64).reshape(1, 1, 6)
    torch.testing.assert_close(resize_to(x, (2,)), torch.tensor([[[3.0, 9.0]]], dtype=torch.float64))  # means of 3
    torch.testing.assert_close(resize_to(x, (4,)).flatten(), torch.tensor([2.0, 4.0, 8.0, 10.0], dtype=torch.float64))  # windows [0,2) [1,3) [3,5) [4,6)
    y = torch.tensor([0.0, 4.0], dtype=torch.float64).reshape(1, 1, 2)
    torch.testing.assert_close(resize_to(y, (4,)).flatten(), torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64))


def test_mixed_shrink_and_grow_matches_numpy():
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 3))
    np.testing.assert_allclose(resize_to(torch.tensor(x), (2, 5)).numpy(), np_resize(x, (2, 5)), rtol=1e-12)


@pytest.mark.parametrize("shape,size", [((1, 8, 16, 16), (4, 4)), ((1, 8, 8, 8, 8), (2, 2, 2)), ((1, 8, 16, 16), (5, 3))])
def test_every_position_receives_gradient_after_a_4x_shrink(shape, size):
    """Bilinear sampling without antialiasing reads 2 positions per axis per output: 25 % of a 2D map in a 4x shrink."""
    x = torch.randn(shape, requires_grad=True)
    resize_to(x, size).pow(2).sum().backward()
    assert bool((x.grad != 0).all()), f"{int((x.grad == 0).sum())} of {x.numel()} positions get no gradient"


def test_every_student_position_receives_attention_gradient_after_a_4x_shrink():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 16, 16, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 4, 4, generator=g)
    attention_distance(s, t).backward()
    assert bool((s.grad.abs().sum(dim=1) != 0).all())


# ---------------------------------------------------------------- D2: attention cannot underflow


@pytest.mark.parametrize("p", [2.0, 4.0])
def test_attention_is_scale_invariant_without_underflow(p):
    """A(c z) == A(z): in float32 with p = 4, |1e-6 z|^4 ~ 1e-24 would underflow the L2 normalisation to ~0."""
    z = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    a = attention_map(z, p)
    torch.testing.assert_close(attention_map(1e-6 * z, p), a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(attention_map(1e6 * z, p), a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))


def test_small_activations_still_give_the_attention_gradient():
    g = torch.Generator().manual_seed(2)
    s0, t = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    grads = []
    for c in (1.0, 1e-6):
        s = (c * s0).requires_grad_(True)
        d = attention_distance(s, 1e-6 * t)
        d.backward()
        grads.append((d.item(), s.grad * c))  # d(c z)/dz: gradient w.r.t. z of the same loss
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-4) and grads[0][0] > 0.01
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-6)


def test_all_zero_representation_gives_zero_map():
    assert attention_map(torch.zeros(1, 8, 4, 4)).abs().sum().item() == 0.0
