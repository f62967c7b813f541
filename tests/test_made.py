import pytest
import torch

from nflux.nets import MADE
from nflux.nets.made import input_degrees

ORDERINGS = ["natural", "reversed", "random", [2, 0, 3, 1, 4]]


def _randomize(made, scale=0.5, seed=0):
    """Weights away from init, so a zero in the Jacobian can only come from a mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in made.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return made


def _jacobian(made, x, context=None):
    # params [D, P] of one sample as a function of its inputs [D] -> [D, P, D]
    return torch.autograd.functional.jacobian(lambda v: made(v[None], context)[0], x)


@pytest.mark.parametrize("ordering", ORDERINGS, ids=str)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("context", [False, True])
def test_autoregressive_property(ordering, residual, context):
    D, P = 5, 3
    made = MADE(D, P, (12, 12), ordering=ordering, seed=3, residual=residual,
                context_features=2 if context else None, activation="tanh").double()
    _randomize(made)
    ctx = torch.randn(1, 2, dtype=torch.float64) if context else None
    deg = torch.tensor(input_degrees(D, ordering, seed=3))
    allowed = deg[None, :] < deg[:, None]  # [out feature i, input j]: j generated before i
    for seed in range(2):
        x = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        J = _jacobian(made, x, ctx).abs().sum(1)  # [D, D]
        assert torch.all(J[~allowed] == 0)
        assert torch.all(J[allowed] > 0), J  # every admitted dependency is present
    assert torch.all(J.diagonal() == 0)


@pytest.mark.parametrize("ordering", ["natural", "reversed", "random"])
@pytest.mark.parametrize("residual", [False, True])
def test_block_path_keeps_autoregressive_property_and_values(ordering, residual):
    """Wide enough for masked_linear's rectangles (hidden units sorted by degree): the
    Jacobian keeps the autoregressive pattern and the outputs equal the dense path's."""
    D, P = 6, 2
    made = _randomize(MADE(D, P, (256, 256), ordering=ordering, seed=1, residual=residual).double(), scale=0.1)
    hidden = made.degrees[D:]
    assert all(hidden[k : k + 256] == sorted(hidden[k : k + 256]) for k in range(0, len(hidden), 256))
    assert any(made.mask_blocks)  # the 256 x 256 layers take the block path
    deg = torch.tensor(input_degrees(D, ordering, seed=1))
    allowed = deg[None, :] < deg[:, None]
    x = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    J = _jacobian(made, x).abs().sum(1)
    assert torch.all(J[~allowed] == 0)
    assert torch.all(J[allowed] > 0)
    xs = torch.randn(7, D, dtype=torch.float64)
    blocked = made(xs)
    made.mask_blocks = [[] for _ in made.mask_blocks]
    torch.testing.assert_close(blocked, made(xs))


def test_checkpoint_with_other_masks_is_refused():
    made = MADE(4, 2, (8, 8))
    state = made.state_dict()
    MADE(4, 2, (8, 8)).load_state_dict(state)  # same construction: fine
    state["mask1"] = state["mask1"].flip(0)  # hidden units in another order
    with pytest.raises(ValueError, match="mask1 in the checkpoint differs"):
        MADE(4, 2, (8, 8)).load_state_dict(state)


def test_ordering_degrees():
    assert input_degrees(4, "natural") == [1, 2, 3, 4]
    assert input_degrees(4, "reversed") == [4, 3, 2, 1]
    assert sorted(input_degrees(6, "random", seed=1)) == list(range(1, 7))
    assert input_degrees(6, "random", seed=1) == input_degrees(6, "random", seed=1)
    assert input_degrees(3, [2, 0, 1]) == [2, 3, 1]


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh", "gelu"])
def test_shapes_and_activations(activation):
    made = MADE(4, 5, (8, 6), activation=activation)
    assert made(torch.randn(7, 4)).shape == (7, 4, 5)


def test_context_changes_output_and_broadcasts():
    made = _randomize(MADE(3, 2, (8,), context_features=2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    c1, c2 = torch.randn(1, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    assert not torch.allclose(made(x, c1), made(x, c2))
    torch.testing.assert_close(made(x, c1), made(x, c1.expand(4, 2)))


@pytest.mark.parametrize("features", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
def test_context_reaches_every_feature(features, residual):
    """The context is an input of degree 0: degree-0 hidden units carry it to the first
    feature's parameters too (without them a one-feature conditional MAF ignored its context)."""
    made = _randomize(MADE(features, 2, (12, 12), context_features=2, residual=residual).double())
    x, c = torch.randn(1, features, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda c: made(x, c)[0], c)  # [D, P, 1, 2]
    assert (J.abs().sum((1, 2, 3)) > 0).all()


def test_context_width_is_checked():
    with pytest.raises(ValueError, match=r"needs a context \[\.\.\., 2\], got \[4, 3\]"):
        MADE(3, 2, (8,), context_features=2)(torch.randn(4, 3), torch.randn(4, 3))


def test_masks_follow_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        made = MADE(3, 2, (8,))
        assert all(m.dtype == torch.float64 for m in made.masks())
        assert made(torch.randn(2, 3)).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_masked_gradients_stay_zero():
    made = MADE(4, 2, (8, 8))
    made(torch.randn(3, 4)).sum().backward()
    for w, m in zip(made.weights, made.masks()):
        assert torch.all(w.grad[m == 0] == 0)


def test_single_feature():
    made = MADE(1, 2, (4,))
    x = torch.randn(3, 1)
    out = made(x)
    torch.testing.assert_close(out, made(torch.randn(3, 1)))  # depends on nothing


def test_bad_arguments():
    with pytest.raises(ValueError, match="equal hidden widths"):
        MADE(3, 2, (8, 6), residual=True)
    with pytest.raises(ValueError, match="activation"):
        MADE(3, 2, (8,), activation="swish")
    with pytest.raises(ValueError, match="ordering"):
        MADE(3, 2, (8,), ordering=[0, 0, 1])
    with pytest.raises(ValueError, match="context"):
        MADE(3, 2, (8,))(torch.randn(2, 3), torch.randn(2, 1))
    with pytest.raises(ValueError, match="needs a context"):
        MADE(3, 2, (8,), context_features=1)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="width >= 1"):
        MADE(3, 2, (0,))
    with pytest.raises(ValueError, match="ordering"):  # int() would have truncated it to 0, 1, 2
        MADE(3, 2, (8,), ordering=[0.5, 1.2, 2.9])
    assert MADE(3, 2, (8,), ordering=torch.tensor([2, 0, 1])).degrees[:3] == [2, 3, 1]
