"""The refresh's cuSOLVER eigendecomposition worker (`_device_eigh`): what it takes, a failed solve kept from
the projector (CPU), and on a GPU: the started and synchronous solves give the same bits, `start` returns
while the GPU is still busy, and a capture on the main thread while the worker solves does not break."""

import pytest
import torch

from gradnormlorp_kernels import GradNormLoRPAdamW, _device_eigh, _host_eigh, _step_graph
from gradnormlorp_kernels.ops import refresh

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gram(k, seed, device="cpu"):
    y = torch.randn(3 * k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (y.T @ y).to(device)


def test_the_environment_can_turn_the_worker_off(monkeypatch):
    monkeypatch.setenv("GRADNORMLORP_EIGH_WORKER", "0")
    assert not _device_eigh.takes_size(520, torch.device("cuda"))
    monkeypatch.setenv("GRADNORMLORP_EIGH_WORKER", "1")
    assert _device_eigh.takes_size(520, torch.device("cuda"))
    monkeypatch.setenv("GRADNORMLORP_EIGH_WORKER", "yes")
    with pytest.raises(ValueError, match="GRADNORMLORP_EIGH_WORKER must be 0 or 1"):
        _device_eigh.takes_size(520, torch.device("cuda"))
    with pytest.raises(ValueError, match="GRADNORMLORP_EIGH_WORKER must be 0 or 1"):
        GradNormLoRPAdamW([torch.nn.Parameter(torch.zeros(4, 4))])


def test_takes_only_cuda_matrices_the_host_worker_does_not():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _device_eigh.takes_size(_host_eigh.MAX_K + 1, cuda) and _device_eigh.takes_size(520, torch.device("cuda", 1))
    assert not _device_eigh.takes_size(_host_eigh.MAX_K, cuda) and not _device_eigh.takes_size(520, cpu)
    assert not _device_eigh.takes(_gram(_host_eigh.MAX_K + 1, seed=0))
    with pytest.raises(ValueError, match="gram must be a CUDA tensor"):
        _device_eigh.start(_gram(4, seed=0), torch.tensor(True), stream=None)


def test_a_failed_solve_gives_an_unhealthy_result(monkeypatch):
    def fail(gram, healthy):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(refresh, "ritz_vectors", fail)
    gram = _gram(5, seed=1)
    vectors, healthy = _device_eigh.solve(gram, torch.tensor(True))
    assert not bool(healthy) and torch.equal(vectors, torch.zeros_like(gram))


def test_a_job_whose_worker_call_failed_is_solved_by_the_collector():
    """A worker call that raised (say, a CUDA call refused during another thread's global-mode capture) is
    solved again by `collect()`, synchronously, with the same bits as `solve`."""
    import concurrent.futures

    gram, ok = _gram(7, seed=5), torch.tensor(True)
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("operation not permitted when stream is capturing"))
    vectors, healthy = _device_eigh.Job(failed, gram, ok).collect()
    expected, expected_ok = _device_eigh.solve(gram, ok)
    assert torch.equal(vectors, expected) and bool(healthy) == bool(expected_ok)


def test_solve_is_the_refresh_op():
    gram, ok = _gram(9, seed=2), torch.tensor(True)
    vectors, healthy = _device_eigh.solve(gram, ok)
    assert bool(healthy) and torch.equal(vectors, refresh.ritz_vectors(gram, ok))


@pytest.mark.parametrize("k", [_host_eigh.MAX_K + 1, 520])
@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.gpu
@needs_cuda
def test_started_and_synchronous_solves_agree_on_the_gpu(k, healthy):
    gram, ok = _gram(k, seed=k, device="cuda"), torch.tensor(healthy, device="cuda")
    stream = torch.cuda.Stream()
    started, started_ok = _device_eigh.start(gram, ok, stream).collect()
    vectors, vectors_ok = _device_eigh.solve(gram, ok)
    assert torch.equal(started, vectors) and bool(started_ok) == bool(vectors_ok) == healthy
    assert torch.equal(started, refresh.ritz_vectors(gram, ok))
    if healthy:
        eigenvalues = torch.linalg.eigvalsh(gram)
        torch.testing.assert_close((started * eigenvalues) @ started.T, gram, rtol=1e-10, atol=1e-9 * gram.abs().max())


@pytest.mark.gpu
@needs_cuda
def test_a_nan_gram_reported_healthy_gives_no_usable_result_on_the_gpu():
    gram = _gram(200, seed=3, device="cuda")
    gram[0, 0] = float("nan")
    vectors, healthy = _device_eigh.start(gram, torch.tensor(True, device="cuda"), torch.cuda.Stream()).collect()
    assert not (bool(healthy) and bool(torch.isfinite(vectors).all())), "a NaN Gram matrix gave a usable result"


@pytest.mark.gpu
@needs_cuda
def test_start_returns_while_the_gpu_is_busy_and_a_capture_meanwhile_works():
    gram, ok = _gram(300, seed=4, device="cuda"), torch.tensor(True, device="cuda")
    expected = refresh.ritz_vectors(gram, ok)
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # a few hundred milliseconds of GPU work queued before the job
    job = _device_eigh.start(gram, ok, torch.cuda.Stream())
    assert not torch.cuda.current_stream().query(), "start waited for the GPU"
    # The worker is inside cuSOLVER's synchronisations while this thread captures a graph.
    x = torch.ones(64, device="cuda")
    graph, y = _step_graph.capture(lambda: x * 2, x.device, torch.cuda.Stream())
    vectors, healthy = job.collect()
    graph.replay()
    torch.cuda.synchronize()
    assert bool(healthy) and torch.equal(vectors, expected) and torch.equal(y, x * 2)


