"""Which GPU each local pipeline worker takes with device = "auto" (checked on CPU: the GPU count is
given, so no GPU is needed)."""
import multiprocessing as mp

from flowcurate.formats.devices import claim_worker_index, worker_device


def _device_in_new_process(folder, gpus, queue):
    queue.put((worker_device("auto", gpus=gpus, folder=folder), worker_device("auto", gpus=gpus, folder=folder)))


def test_workers_spread_round_robin_over_the_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_device_in_new_process, args=(str(tmp_path), 2, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(a == b for a, b in got), "a process keeps the device it took first"
    assert sorted(a for a, _ in got) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert (tmp_path / "counter").read_text() == "4"


def test_claims_are_once_per_process_and_in_order(tmp_path):
    first = claim_worker_index(tmp_path / "a")
    assert claim_worker_index(tmp_path / "a") == first == 0
    assert claim_worker_index(tmp_path / "b") == 0  # another run's counter starts again


def test_named_devices_cpu_one_gpu_and_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert worker_device("cpu", gpus=8, folder=tmp_path) == "cpu"
    assert worker_device("cuda:5", gpus=8, folder=tmp_path) == "cuda:5"
    assert worker_device("auto", gpus=0, folder=tmp_path) == "cpu"
    assert worker_device("auto", gpus=1, folder=tmp_path) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert worker_device("auto", gpus=2, folder=tmp_path) == "cuda:1"
    assert not (tmp_path / "counter").exists()  # nothing was claimed: named devices and LOCAL_RANK decide
    assert worker_device("auto").startswith(("cpu", "cuda"))  # this machine, asked through torch
