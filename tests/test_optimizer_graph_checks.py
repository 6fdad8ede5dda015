"""The host-side checks that run before every CUDA-graph replay of a group's step (`_graph_states`,
`_projector_addresses`), on CPU tensors with the graph path forced on: what they accept, what they reject,
and when they re-read what they keep. The replay itself is tested on a GPU (tests/test_optimizer_graph.py)."""

import pytest
import torch

from gradnormlorp_kernels import GradNormLoRPAdamW

SHAPES = [(24, 40), (40, 24), (17, 33)]


@pytest.fixture
def stepped(seed):
    """Parameters, an optimizer past its first step (states exist), its group, and the graph path forced on."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in SHAPES]
    optimizer = GradNormLoRPAdamW([{"params": params, "project": True}], lr=1e-3, rank=4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer._graphable = lambda tensor: True
    for p in params:
        p.grad = torch.randn_like(p)
    return params, optimizer


def _grads(params):
    return [p.grad for p in params]


def test_matching_gradients_pass_and_name_the_parameters(stepped):
    params, optimizer = stepped
    states, addresses, one_dtype = optimizer._graph_states(0, params, _grads(params))
    assert all(state is optimizer.state[p] for state, p in zip(states, params))
    assert addresses == tuple(p.data_ptr() for p in params)
    assert one_dtype


def test_a_gradient_of_another_shape_raises(stepped):
    """`.data` skips the `p.grad = ...` setter's checks; the graphed step's own checks catch it."""
    params, optimizer = stepped
    params[1].grad.data = torch.randn(SHAPES[1][::-1], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"gradient of shape \(24, 40\).*parameter of shape \(40, 24\)"):
        optimizer._graph_states(0, params, _grads(params))


def test_a_sparse_gradient_leaves_the_graph_path(stepped):
    params, optimizer = stepped
    params[2].grad = params[2].grad.to_sparse()
    assert optimizer._graph_states(0, params, _grads(params)) is None


def test_gradients_of_another_dtype_pass_but_not_as_one_dtype(stepped):
    params, optimizer = stepped
    params[0].grad.data = params[0].grad.data.float()
    assert optimizer._graph_states(0, params, _grads(params))[2] is False


def test_a_moved_parameter_is_read_again(stepped):
    """`p.data = ...` moves a weight (and may change its shape): its new address and layout are read."""
    params, optimizer = stepped
    optimizer._graph_states(0, params, _grads(params))
    params[0].data = params[0].data.clone()
    _, addresses, _ = optimizer._graph_states(0, params, _grads(params))
    assert addresses[0] == params[0].data_ptr()
    params[2].data = torch.randn(SHAPES[2][::-1], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not match its parameter"):
        optimizer._graph_states(0, params, _grads(params))


def test_a_state_without_moments_leaves_the_graph_path(stepped):
    params, optimizer = stepped
    del optimizer.state[params[1]]["exp_avg"]
    assert optimizer._graph_states(0, params, _grads(params)) is None


def test_projector_addresses_follow_a_replaced_projector(stepped):
    params, optimizer = stepped
    states = optimizer._graph_states(0, params, _grads(params))[0]
    first = optimizer._projector_addresses(0, states)
    assert optimizer._projector_addresses(0, states) is first  # kept while nothing changed
    state = states[1]
    side = "left" if "left" in state else "right"
    state[side] = state[side].clone()
    again = optimizer._projector_addresses(0, states)
    assert again != first and (side, state[side].data_ptr()) in again
