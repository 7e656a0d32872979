"""`aquainterp eval` on a saved checkpoint, and 2-process gloo DDP equal to one process."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tasks_tokenizer import trained_tokenizer
from test_evaluate import force_answer, tiny_gpt

from aquainterp.checkpoints.native import save_checkpoint
from aquainterp.cli.main import main
from aquainterp.evaluate import evaluate, load_problems


def test_eval_command_matches_the_library(tmp_path, shared_data, capsys):
    tok = trained_tokenizer()
    model = tiny_gpt(tok.vocab_size, seed=3)
    save_checkpoint(tmp_path / "ckpt", 5, model, None, {}, tokenizer=tok)
    dev = str(shared_data / "aqua_rat" / "dev.json")
    out = tmp_path / "result.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "aqua", "--data", dev, "--n", "40",
                 "--mode", "generative", "--max_new_tokens", "6", "--num-samples", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    expected = evaluate(model, tok, load_problems("aqua", dev, 40), "generative", num_samples=2,
                        max_new_tokens=6, seed=0, progress=False)
    assert got["samples"] == 80 and got["problems"] == 40
    assert got["confusion"]["counts"] == expected.confusion
    assert got["accuracy"] == expected.accuracy
    assert got["metrics"]["eval/aqua_acc"] == expected.accuracy
    assert "generative accuracy" in printed and "gold\\pred" in printed

    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "synthetic", "--n", "30",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    expected = evaluate(model, tok, load_problems("synthetic", n=30), "categorical", progress=False)
    assert got["mode"] == "categorical" and got["confusion"]["counts"] == expected.confusion


def test_eval_command_names_a_missing_checkpoint(tmp_path, capsys):
    # a usage error at the command line boundary: exit 2, one line naming the path, no traceback
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err, err


def spread_model(tok):
    """Answers a letter that depends on the problem and the sample: rank sharding would show."""
    return force_answer(tiny_gpt(tok.vocab_size, seed=1), tok, lambda s, b: "ABCDE"[(s + b) % 5])


def _worker(rank, world, port, path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok = trained_tokenizer()
        model = spread_model(tok)
        problems = load_problems("aqua", path, 23)  # odd count: ranks get 12 and 11
        cat = evaluate(model, tok, problems, "categorical", batch_size=5, progress=False)
        gen = evaluate(model, tok, problems, "generative", num_samples=3, max_new_tokens=5, progress=False)
        with open(f"{out}.{rank}", "w") as f:
            json.dump([cat.to_dict(), gen.to_dict()], f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path, shared_data):
    path = str(shared_data / "aqua_rat" / "dev.json")
    mp.spawn(_worker, args=(2, _free_port(), path, str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"r.{r}").read_text()) for r in range(2)]
    tok = trained_tokenizer()
    model = spread_model(tok)
    problems = load_problems("aqua", path, 23)
    single = [evaluate(model, tok, problems, "categorical", batch_size=5, progress=False).to_dict(),
              evaluate(model, tok, problems, "generative", num_samples=3, max_new_tokens=5, progress=False).to_dict()]
    single = json.loads(json.dumps(single))
    # pass@k means are float sums in another order: equal up to rounding; everything else exactly
    for result in (*ranks[0], *ranks[1]):
        ref = single[0] if result["mode"] == "categorical" else single[1]
        assert result.pop("pass_at_k") == pytest.approx(ref["pass_at_k"])
    passes = single[1].pop("pass_at_k")
    single[0].pop("pass_at_k")
    assert ranks[0] == ranks[1] == single
    assert single[0]["problems"] == 23 and single[1]["samples"] == 69
    assert 0 < single[0]["correct"] < 23 and 0 < single[1]["correct"] < 69  # not a degenerate all-wrong case
    assert 0 < passes["1"] < passes["3"]


@pytest.mark.slow
def test_eval_command_under_torchrun_matches_one_process(tmp_path, shared_data):
    """`torchrun --nproc_per_node=2 -m aquainterp.cli.main eval` writes the same JSON as one process, and both
    ranks leave cleanly (the group is destroyed after a barrier, so rank 1 never exits under rank 0)."""
    import subprocess
    import sys

    tok = trained_tokenizer()
    save_checkpoint(tmp_path / "ckpt", 1, spread_model(tok), None, {}, tokenizer=tok)
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "aqua", "--num-problems", "23",
            "--data", str(shared_data / "aqua_rat" / "dev.json"), "--mode", "generative",
            "--num-samples", "3", "--max_new_tokens", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "aquainterp.cli.main"]
    done = subprocess.run([*launch, *args, "--json", str(tmp_path / "two.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("generative accuracy") == 1  # rank 0 alone prints
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two.pop("pass_at_k") == pytest.approx(one.pop("pass_at_k"))
    assert two == one and one["samples"] == 69
