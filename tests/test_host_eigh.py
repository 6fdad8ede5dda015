"""The refresh's host eigendecomposition worker (`_host_eigh`): it waits for the GPU's flag, solves what
`ops.refresh.ritz_vectors` solves, reports failures to the caller and keeps serving; on a GPU, `start` and
the synchronous path give the same bits."""

import threading
import time

import pytest
import torch

from gradnormlorp_kernels import _host_eigh
from gradnormlorp_kernels.ops import refresh


def _gram(k, seed):
    y = torch.randn(3 * k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return y.T @ y


def _same_up_to_sign(a, b):
    signs = torch.sign((a * b).sum(0))
    torch.testing.assert_close(a * signs, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("healthy", [True, False])
def test_worker_waits_for_the_flag_then_solves(healthy):
    gram = _gram(37, seed=1)
    ok = torch.tensor(healthy)
    done = torch.zeros((), dtype=torch.int32)
    out = torch.full_like(gram, float("nan"))
    job = _host_eigh._enqueue(done, gram, ok, out)
    time.sleep(0.05)
    assert not job.done()  # nothing is read before the flag
    threading.Timer(0.01, done.fill_, (1,)).start()
    vectors = job.result(timeout=30)
    assert vectors is out
    _same_up_to_sign(vectors, refresh.ritz_vectors(gram, ok))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(37, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_failed_job_reaches_its_caller_and_the_worker_goes_on():
    done = torch.ones((), dtype=torch.int32)
    bad = _host_eigh._enqueue(done, torch.ones(3, 4, dtype=torch.float64), torch.tensor(True),
                              torch.empty(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        bad.result(timeout=30)
    gram = _gram(9, seed=2)
    good = _host_eigh._enqueue(done, gram, torch.tensor(True), torch.empty_like(gram))
    _same_up_to_sign(good.result(timeout=30), refresh.ritz_vectors(gram, torch.tensor(True)))


def test_the_worker_leaves_torch_thread_count_alone():
    threads = torch.get_num_threads()
    _host_eigh._queue()
    assert torch.get_num_threads() == threads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_started_and_synchronous_solves_agree_on_the_gpu():
    gram = _gram(136, seed=3).cuda()
    healthy = torch.ones((), dtype=torch.bool, device="cuda")
    assert _host_eigh.on_host(gram) and not _host_eigh.on_host(_gram(200, seed=4).cuda())
    started = _host_eigh.start(gram, healthy).result(timeout=60)
    synchronous = _host_eigh.ritz_vectors(gram, healthy)
    assert started.is_pinned() and torch.equal(started, synchronous)
    _same_up_to_sign(started, refresh.ritz_vectors(gram, healthy).cpu())
