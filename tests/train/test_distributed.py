"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match one process with the same global batch."""
import pytest

from mamba3.train.config import TrainConfig
from mamba3.train.loop import main

from .helpers import run_worker, tiny_dict


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, micro-batch 4 = the 2-rank runs' global batch (2 ranks x 2)."""
    tmp = tmp_path_factory.mktemp("single")
    return run_worker(tmp, tiny_dict(tmp / "run", train={"steps": 4, "micro_batch": 4}, checkpoint={"every": 2}))


def _close(a, b, rtol=2e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, single, mode):
    cfg = tiny_dict(tmp_path / "run", train={"steps": 4, "micro_batch": 2, "parallel": mode},
                    checkpoint={"every": 2})
    two = run_worker(tmp_path, cfg, nproc=2)
    _close(two["losses"], single["losses"])
    assert two["samples"] == single["samples"] == 16
    # resume on 2 ranks from the (world-size independent) step-2 checkpoint
    (tmp_path / "run" / "checkpoints" / "step-00000004" / "meta.json").unlink()
    again = run_worker(tmp_path, cfg, nproc=2)
    assert again["start_step"] == 2
    _close(again["losses"], single["losses"][2:])


def test_accumulation_matches_larger_micro_batch(tmp_path, single):
    cfg = tiny_dict(tmp_path / "run", train={"steps": 4, "micro_batch": 2, "grad_accum": 2},
                    checkpoint={"every": 0})
    _close(main(TrainConfig.from_dict(cfg), log=lambda *_: None)["losses"], single["losses"])
