"""The command line: `info`, the `train` job on tiny settings, `bench` wiring, and bad input."""

import csv
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from gradnormlorp_kernels import cli, corpus, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "2",
        "--rank", "4", "--update-proj-gap", "2", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """`train` sets torch's thread count for the process; the tests after these keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _available_methods() -> list[str]:
    return [m for m in train.METHODS if train.method_availability(m, "cpu")[0]]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_outputs(out: Path, methods: list[str]) -> dict[str, dict]:
    rows = {row["method"]: row for row in _read_csv(out / "results.csv")}
    assert list(rows) == [m for m in ["adamw"] + [m for m in methods if m != "adamw"] if m in methods]
    for method, row in rows.items():
        loss = float(row["final_val_loss"])
        assert math.isfinite(loss) and 0 < loss < 10, (method, loss)
        assert int(row["optimizer_state_bytes"]) > 0
        assert float(row["mean_step_ms"]) > 0
        assert int(row["peak_memory_bytes"]) > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = _read_csv(out / "losses.csv")
    assert {row["method"] for row in curves} == set(methods)
    return rows


def test_info_prints_backends_device_and_versions(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for needle in ("torch", "triton", "bitsandbytes", "python", "device", "reference", "row_norm"):
        assert needle in text


def test_module_entry_point_runs_info():
    result = subprocess.run([sys.executable, "-m", "gradnormlorp_kernels", "info"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_train_on_own_corpus_writes_csv_and_plot_for_every_method(tmp_path, capsys):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (text / "b.md").write_text("# notes\n" + "pack my box with five dozen liquor jugs\n" * 150)
    (text / "blob.bin").write_bytes(bytes(range(256)) * 10)  # not text: skipped
    out = tmp_path / "run"
    assert cli.main(["train", "--corpus", str(text), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "2 files" in printed and "final val loss" in printed
    methods = _available_methods()
    rows = _check_outputs(out, methods)
    # Adapter mode branches off the AdamW run at half-way: it starts from the very same model.
    curves = _read_csv(out / "losses.csv")
    adamw_at_branch = [r["val_loss"] for r in curves if r["method"] == "adamw" and r["step"] == "2"]
    adapter_start = [r["val_loss"] for r in curves if r["method"] == "gradnormlorp-adapter" and r["step"] == "2"]
    assert adapter_start and adapter_start == adamw_at_branch
    assert rows["gradnormlorp-adapter"]["first_step"] == "2"


def test_train_on_default_stdlib_corpus(tmp_path):
    out = tmp_path / "run"
    methods = "gradnormlorp-full,adamw,gradnormlorp-adapter"
    assert cli.main(["train", "--methods", methods, "--max-corpus-bytes", "200000", "--out", str(out), *TINY]) == 0
    _check_outputs(out, ["adamw", "gradnormlorp-full", "gradnormlorp-adapter"])


def test_train_on_cpu_runs_one_thread_unless_told(tmp_path):
    args = ["train", "--methods", "adamw", "--max-corpus-bytes", "50000", "--device", "cpu", *TINY]
    torch.set_num_threads(2)
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert torch.get_num_threads() == 1
    assert cli.main([*args, "--threads", "2", "--out", str(tmp_path / "b")]) == 0
    assert torch.get_num_threads() == 2


def test_adapter_without_adamw_pretrains_its_base(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--methods", "gradnormlorp-adapter", "--max-corpus-bytes", "100000", "--out", str(out),
                     *TINY]) == 0
    rows = _check_outputs(out, ["gradnormlorp-adapter"])
    assert rows["gradnormlorp-adapter"]["steps"] == "2"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no UTF-8 text"),
        (lambda tmp: (tmp / "x.bin").write_bytes(b"\x00\xff" * 100) and tmp / "x.bin", "holds no UTF-8 text"),
        (lambda tmp: (tmp / "short.txt").write_text("too short") and tmp / "short.txt", "too small"),
    ],
    ids=["missing", "empty-dir", "binary", "too-small"],
)
def test_bad_corpus_is_a_clear_error(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--corpus", str(path), "--out", str(tmp_path / "run"), *TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--corpus" in err and message in err
    assert not (tmp_path / "run" / "results.csv").exists()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--methods", "adamw,sgd"], "--methods"),
        (["--device", "tpu"], "--device"),
        (["--steps", "0"], "--steps"),
        (["--rank", "64"], "--rank"),
        (["--heads", "3"], "--dim"),
    ],
)
def test_bad_train_options_name_the_option(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *TINY, *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_bench_passes_its_arguments_to_the_benchmarks_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("gradnormlorp_kernels.benchmarks")
    fake.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1)
    fake.main = lambda args: seen.setdefault("size", args.size) and 0
    monkeypatch.setitem(sys.modules, "gradnormlorp_kernels.benchmarks", fake)
    assert cli.main(["bench", "--size", "7"]) == 0
    assert seen == {"size": 7}


def test_bench_without_the_benchmarks_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradnormlorp_kernels.benchmarks", None)
    assert cli.main(["bench"]) == 2
    assert "gradnormlorp_kernels.benchmarks" in capsys.readouterr().err


def test_corpus_split_is_interleaved_complete_and_deterministic():
    data = bytes(range(256)) * 100
    first = corpus.split(data, min_bytes=17)
    second = corpus.split(data, min_bytes=17)
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    assert first.total_bytes == len(data)
    assert 0.08 < first.validation.numel() / len(data) < 0.12
    assert first.validation.numel() > 0 and first.train.numel() > 0


def test_stdlib_corpus_is_deterministic_and_capped():
    a, files_a = corpus.read_stdlib(max_bytes=50_000)
    b, files_b = corpus.read_stdlib(max_bytes=50_000)
    assert a == b and files_a == files_b > 0
    assert len(a) <= 50_000 + files_a  # the cap, plus one newline between files
    a.decode("utf-8")


def test_optimizer_state_bytes_counts_projectors_and_shared_maps_once():
    galore_torch = pytest.importorskip("galore_torch")
    weight = torch.nn.Parameter(torch.randn(64, 32))
    optimizer = galore_torch.GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 10, "scale": 0.25,
                                           "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    expected = sum(t.numel() * t.element_size() for t in (state["exp_avg"], state["exp_avg_sq"],
                                                        state["projector"].ortho_matrix))
    assert train.optimizer_state_bytes(optimizer) == expected

    shared = torch.zeros(256)
    fake = torch.optim.SGD([weight], lr=0.1)
    fake.state[weight] = {"map_a": shared, "map_b": shared, "moment": torch.zeros(10, dtype=torch.uint8)}
    assert train.optimizer_state_bytes(fake) == 256 * 4 + 10
