"""Under DDP the probes run on rank 0 only: two gloo processes, rank 0 gets the single-process metrics,
rank 1 gets {} and does no probe work."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_probes_model import items, tiny_model

from probes.suite import ProbeSuite


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model(seed=6)
        suite = ProbeSuite(model, None, items(), probes=("entropy", "option_mass", "margin", "counts"), decision="direct",
                           table_completions=False)
        metrics = suite.run(0)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"metrics": metrics, "raw_keys": sorted(suite.last_raw)}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_probes_run_on_rank_zero_only(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {"metrics": {}, "raw_keys": []}
    single = ProbeSuite(tiny_model(seed=6), None, items(), probes=("entropy", "option_mass", "margin", "counts"), decision="direct",
                        table_completions=False).run(0)
    assert rank0["metrics"].keys() == single.keys()
    for k, v in single.items():
        assert rank0["metrics"][k] == pytest.approx(v, abs=1e-6), k
