"""nanochat's chat tasks (GSM8K, ARC, MMLU) and its checkpoint-folder rule, against nanochat's own outputs.

References: tests/golden/nanochat_tasks/*.json, written by make_reference.py there with nanochat's code
(commit, command and what each field is: that folder's README). Hand counts: the sample files' gold
answers are listed in that README; each hand-count test says how its number follows from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from golden.nanochat_tasks.make_reference import build_tree  # the trees nanochat's rule was run on
from tasks_tokenizer import trained_tokenizer

from aquainterp.checkpoints.load import load_model
from aquainterp.checkpoints.nanochat import NanochatCheckpointError, _model_files, resolve_folder
from aquainterp.cli.main import main
from aquainterp.evaluate import choice_eval, evaluate_task, gsm8k_eval, load_problems
from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks.gsm8k import extract_answer, load_gsm8k

GOLDEN = Path(__file__).parent / "golden" / "nanochat_tasks"
ARC = GOLDEN / "arc_handmade.jsonl"
MMLU = GOLDEN / "mmlu_handmade.jsonl"
FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"
REFERENCES = {"nanochat-head-d4": "nanochat-head-d4.json", "nanochat-2026-01-d2": "nanochat-2026-01-d2.json"}


def reference(name: str) -> dict:
    return json.loads((GOLDEN / REFERENCES[name]).read_text(encoding="utf-8"))


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    return path


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def nanochat_model(request):
    """(name, model, tokenizer, reference), loaded from the folder ABOVE the model tag (base_checkpoints/)."""
    model, tok, _meta = load_model(fixture(request.param) / "base_checkpoints")
    return request.param, model, tok, reference(request.param)


# ------------------------------------------------------------------------------------------ GSM8K rule


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gsm8k_extraction_equals_nanochats_on_its_edge_cases(name):
    cases = reference(name)["gsm8k_extract"]
    assert len(cases) == 19
    assert [extract_answer(c["text"]) for c in cases] == [c["extracted"] for c in cases]
    # the cases hold every branch of the rule: a number, None, a trailing dot kept, the first of two
    assert {"1080", "10.", "5", None, ".5", "-3"} <= {c["extracted"] for c in cases}


def test_gsm8k_gold_numbers_equal_nanochats_on_the_whole_test_split(shared_data):
    gold = reference("nanochat-head-d4")["gsm8k_gold"]
    ours = [p.answer for p in load_gsm8k(shared_data / "gsm8k" / "test.jsonl")]
    assert len(ours) == len(gold) == 1319
    assert ours == gold


# ----------------------------------------------------------------- on nanochat's own checkpoints (fixtures)


def test_nanochat_folder_resolution_of_the_fixture_equals_nanochats(nanochat_model):
    name, _model, _tok, ref = nanochat_model
    for given in (fixture(name), fixture(name) / "base_checkpoints"):
        folder, _why = resolve_folder(given)
        assert (folder.name, max(_model_files(folder))) == (ref["resolved"]["tag"], ref["resolved"]["step"])


def test_gsm8k_completions_and_extraction_equal_nanochats_on_a_fixture(nanochat_model, shared_data):
    """Greedy completions of 5 GSM8K test questions (prompt, tokens, text) equal nanochat's Engine's, and the
    extracted numbers and outcomes equal nanochat's extract_answer / GSM8K.evaluate on them."""
    _name, model, tok, ref = nanochat_model
    rows = ref["gsm8k_fixture"]
    problems = load_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    chosen = [problems[r["row"]] for r in rows]
    for problem, r in zip(chosen, rows):
        assert tok.render_for_completion({"messages": [{"role": "user", "content": problem.question}]}) == r["prompt"]
    result = gsm8k_eval(model, tok, chosen, max_new_tokens=48, progress=False, batch_size=2)
    assert [x["completion"] for x in result.records] == [r["text"] for r in rows]
    assert [x["predicted"] for x in result.records] == [r["extracted"] for r in rows]
    assert [x["gold"] for x in result.records] == [r["gold"] for r in rows]
    assert result.correct == sum(r["correct"] for r in rows)


@pytest.mark.parametrize("task, path", [("arc", ARC), ("mmlu", MMLU)])
def test_categorical_predictions_equal_nanochats_run_categorical_eval(nanochat_model, task, path):
    """The letter predicted for each hand-made row, and the accuracy, equal what nanochat's own
    run_categorical_eval predicted on the same checkpoint (head-d4: ARC D D D D D D D 2 C D, 2 of 10)."""
    _name, model, tok, ref = nanochat_model
    expected = ref[f"{task}_fixture"]
    result = choice_eval(model, tok, load_problems(task, str(path)), task=task, progress=False)
    assert [r["predicted"] for r in result.records] == expected["predicted"]
    assert [r["gold"] for r in result.records] == expected["gold"]
    assert result.accuracy == pytest.approx(expected["accuracy"])


def test_eval_command_on_a_nanochat_checkpoint_writes_nanochats_numbers(tmp_path, capsys):
    ref = reference("nanochat-head-d4")
    out = tmp_path / "arc.json"
    assert main(["eval", "--checkpoint", str(fixture("nanochat-head-d4")), "--task", "arc", "--data", str(ARC),
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["accuracy"] == ref["arc_fixture"]["accuracy"] == 0.2
    assert [r["predicted"] for r in record["records"]] == ref["arc_fixture"]["predicted"]
    assert record["metrics"] == {"eval/arc_categorical_acc": 0.2}
    assert "arc categorical accuracy 0.2000 (2/10 samples" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ hand counts


def tiny_gpt(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab_size, sequence_len=256))
    model.init_weights()
    return model.eval()


def ranked_logits(model: GPT, favourite: int):
    """Hook the real GPT's output: every position's logits become -id/1000 (smaller id = larger logit), with
    `favourite` on top. Among a problem's label tokens the prediction is then the favourite when present, else
    the label with the smallest token id."""
    def hook(module, args, kwargs, logits):
        ranked = -torch.arange(logits.shape[-1], dtype=logits.dtype) / 1000
        ranked[favourite] = 1.0
        return ranked.expand_as(logits).clone()

    model.register_forward_hook(hook, with_kwargs=True)
    return model


@pytest.mark.parametrize("task, path, favourite, correct", [
    # ARC golds B C A D B C D 1 A E; every row but the 1-4 one has a C label, so C is predicted there, and
    # "1" (the smallest id of 1..4) on row 8: right on rows 2, 6 (C) and 8 (1) = 3 of 10.
    ("arc", ARC, "C", 3),
    # MMLU golds B C A D B C A B D C, A-D everywhere, A predicted: right on rows 3 and 7 = 2 of 10.
    ("mmlu", MMLU, "A", 2),
])
def test_categorical_accuracy_equals_a_hand_count(task, path, favourite, correct):
    tok = trained_tokenizer()
    assert tok.encode("1") < tok.encode("2") < tok.encode("3") < tok.encode("4")  # the ranking above
    model = ranked_logits(tiny_gpt(tok.vocab_size), tok.encode(favourite)[0])
    result = evaluate_task(model, tok, load_problems(task, str(path)), task, progress=False, batch_size=3)
    assert (result.correct, result.samples, result.answered) == (correct, 10, 10)
    assert result.accuracy == correct / 10


# Completions the hooked GPT writes for GSM8K test rows 0-9 (golds 18 3 70000 540 20 64 260 160 45 460).
SCRIPTED = [
    "She sells 16 - 3 - 4 = 9 eggs at $2.\n#### 18",  # right
    "#### 3",  # right
    "#### 70,000",  # right: the comma goes
    "#### 540.00",  # wrong: "540.00" is not "540" (a string comparison, as nanochat)
    "The answer is 20",  # no answer
    "####64",  # no answer: "#### " needs its space
    "#### 26",  # wrong
    "#### 160 or maybe #### 161",  # right: the first one counts
    "#### -45",  # wrong
    "#### 460.",  # wrong: "460."
]  # hand count: 4 right (rows 0, 1, 2, 7), 8 answered


def scripted(model: GPT, tok, prompts: list[list[int]], texts: list):
    """Hook the real GPT so that after prompt i it writes texts[i] (a string, or token ids) then
    <|assistant_end|>, one token per forward (prefill: the first token; each decode step: the next). One
    prompt per batch."""
    end = tok.encode_special("<|assistant_end|>")
    plans = {tuple(p): (tok.encode(t) if isinstance(t, str) else list(t)) + [end] for p, t in zip(prompts, texts)}
    state = {}

    def hook(module, args, kwargs, logits):
        idx = args[0]
        if idx.shape[1] > 1:  # prefill of a new prompt
            state["plan"], state["i"] = plans[tuple(idx[0].tolist())], 0
        token = state["plan"][min(state["i"], len(state["plan"]) - 1)]
        state["i"] += 1
        out = torch.full_like(logits, -10.0)
        out[..., token] = 10.0
        return out

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_gsm8k_accuracy_equals_a_hand_count(shared_data):
    tok = trained_tokenizer()
    problems = load_problems("gsm8k", str(shared_data / "gsm8k" / "test.jsonl"), 10)
    assert [p.answer for p in problems] == ["18", "3", "70000", "540", "20", "64", "260", "160", "45", "460"]
    prompts = [tok.render_for_completion({"messages": [{"role": "user", "content": p.question}]}) for p in problems]
    model = scripted(tiny_gpt(tok.vocab_size), tok, prompts, SCRIPTED)
    result = evaluate_task(model, tok, problems, "gsm8k", max_new_tokens=64, batch_size=1, progress=False)
    assert [r["completion"] for r in result.records] == SCRIPTED
    assert [r["predicted"] for r in result.records] == ["18", "3", "70000", "540.00", None, None, "26", "160",
                                                         "-45", "460."]
    assert (result.correct, result.answered, result.samples) == (4, 8, 10)
    assert result.pass_at == {1: 0.4}


# ---------------------------------------------------------------------------------- the calculator tool


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_calculator_equals_nanochats_use_calculator(name):
    from aquainterp.model.streaming import calculate

    cases = reference(name)["calculator"]
    assert len(cases) == 30 and sum(c["result"] is None for c in cases) == 11
    assert [calculate(c["expr"]) for c in cases] == [c["result"] for c in cases]


def test_calculator_result_is_forced_into_the_completion(shared_data):
    """The hooked GPT writes <|python_start|>48/2<|python_end|>, then (ignored while the tool's tokens are
    forced) filler, then '\n#### 24': with tools the completion holds nanochat's forced
    <|output_start|>24.0<|output_end|>; without, the filler the model wrote there."""
    tok = trained_tokenizer()
    sp = {n: tok.encode_special(f"<|{n}|>") for n in ("python_start", "python_end", "output_start", "output_end")}
    forced = [sp["output_start"], *tok.encode("24.0"), sp["output_end"]]
    filler = tok.encode("x") * len(forced)
    script = [sp["python_start"], *tok.encode("48/2"), sp["python_end"], *filler, *tok.encode("\n#### 24")]
    problems = load_problems("gsm8k", str(shared_data / "gsm8k" / "test.jsonl"), 1)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": problems[0].question}]})
    texts = {}
    for tools in (True, False):
        model = scripted(tiny_gpt(tok.vocab_size), tok, [prompt], [script])
        result = gsm8k_eval(model, tok, problems, max_new_tokens=64, progress=False, tools=tools)
        texts[tools] = result.records[0]["completion"]
    assert texts[True] == "<|python_start|>48/2<|python_end|><|output_start|>24.0<|output_end|>\n#### 24"
    assert texts[False] == "<|python_start|>48/2<|python_end|>" + "x" * len(forced) + "\n#### 24"


# -------------------------------------------------------------------------------------- inputs and errors


def test_parquet_and_jsonl_give_the_same_problems(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for task, path in (("arc", ARC), ("mmlu", MMLU)):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        parquet = tmp_path / f"{task}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), parquet)
        from_jsonl, from_parquet = load_problems(task, str(path)), load_problems(task, str(parquet))
        strip = lambda ps: [(p.question, p.choices, p.letters, p.answer, p.subject) for p in ps]
        assert strip(from_parquet) == strip(from_jsonl) and len(from_jsonl) == 10
        assert from_parquet[7].source == f"{parquet}:row 8"


def test_hub_path_reads_the_config_and_split_through_datasets(tmp_path, offline):
    """A local copy of a hub repository laid out as allenai/ai2_arc (parquet per config, README configs): the
    same datasets.load_dataset call a hub id gets, the config chosen by --subset, no network."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in ARC.read_text().splitlines()]
    repo = tmp_path / "ai2_arc"
    configs = {"ARC-Easy": rows[:6], "ARC-Challenge": rows[6:]}
    for config, part in configs.items():
        (repo / config).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), repo / config / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n" for c in configs) + "---\n")
    easy = load_problems("arc", str(repo))  # ARC-Easy, split test: nanochat's defaults
    challenge = load_problems("arc", str(repo), subset="ARC-Challenge")
    assert [p.answer for p in easy] == ["B", "C", "A", "D", "B", "C"]
    assert [p.answer for p in challenge] == ["D", "1", "A", "E"] and challenge[1].letters == ("1", "2", "3", "4")
    assert challenge[0].source == f"{repo}:test:0"


@pytest.mark.parametrize("task, data, guessed", [
    ("aqua", "gsm8k", "gsm8k"), ("gsm8k", "arc", "arc"), ("arc", "mmlu", "mmlu"), ("mmlu", "aqua", "aqua")])
def test_a_file_of_another_task_is_refused_naming_it(shared_data, task, data, guessed, capsys):
    files = {"gsm8k": shared_data / "gsm8k" / "test.jsonl", "arc": ARC, "mmlu": MMLU,
             "aqua": shared_data / "aqua_rat" / "dev.json"}
    with pytest.raises(ValueError, match=f"holds .* rows .*; run with --task {guessed}$"):
        load_problems(task, str(files[data]))
    code = main(["eval", "--checkpoint", str(fixture("nanochat-head-d4")), "--task", task, "--data", str(files[data])])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert err.endswith(f"run with --task {guessed}")


def test_bad_rows_and_flags_are_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                               "answerKey": "C"}) + "\n")
    with pytest.raises(ValueError, match=r"arc.jsonl:1: answer not a label: answerKey 'C' is not one of"):
        load_problems("arc", str(bad))
    with pytest.raises(ValueError, match="subset is the hub config of arc"):
        load_problems("mmlu", str(MMLU), subset="ARC-Easy")
    with pytest.raises(FileNotFoundError, match="MMLU file not found"):
        load_problems("mmlu", str(tmp_path / "missing.parquet"))
    assert main(["eval", "--checkpoint", str(fixture("nanochat-head-d4")), "--task", "gsm8k", "--mode",
                 "categorical"]) == 2
    assert "--task gsm8k is scored generatively" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ folder resolution


def test_model_tag_and_step_resolution_equals_nanochats_rule(tmp_path):
    """Six trees nanochat's find_largest_model / find_last_step were run on (the reference): the largest
    d<depth> tag (prefix match: d20x is depth 20), d-tags before newer other tags, the newest tag when none is
    d<depth>, the last step by number; and where nanochat raises, a clear error here."""
    ref = reference("nanochat-head-d4")
    assert set(ref["trees"]) == set(ref["folder_rule"]) and len(ref["trees"]) == 6
    for name, spec in ref["trees"].items():
        root = tmp_path / name / "chatsft_checkpoints"
        build_tree(root, spec)
        expected = ref["folder_rule"][name]
        if "error" in expected:
            with pytest.raises(NanochatCheckpointError) as e:
                resolve_folder(root)
            assert str(root) in str(e.value)
            continue
        folder, why = resolve_folder(root)
        assert (folder.name, max(_model_files(folder))) == (expected["tag"], expected["step"]), name
        assert why and folder.name not in ("",)
        # from the base folder above chatsft_checkpoints/ too (one stage there)
        assert resolve_folder(root.parent)[0] == folder


def test_errors_name_what_is_missing(tmp_path):
    root = tmp_path / "chatsft_checkpoints"
    build_tree(root, {"d4": {"steps": [100], "mtime": 1000}, "d12": {"steps": [], "mtime": 2000}})
    with pytest.raises(NanochatCheckpointError, match=r"d12: the model tag nanochat would pick \(largest depth "
                                                      r"tag of d4, d12\) holds no model_<step>.pt; tags with "
                                                      r"checkpoints: d4"):
        resolve_folder(root)
    empty = tmp_path / "empty" / "chatrl_checkpoints"
    empty.mkdir(parents=True)
    with pytest.raises(NanochatCheckpointError, match="no model tags here"):
        load_model(empty)
    base = tmp_path / "two"
    build_tree(base / "base_checkpoints", {"d2": {"steps": [1], "mtime": 1}})
    build_tree(base / "chatsft_checkpoints", {"d2": {"steps": [2], "mtime": 1}})
    with pytest.raises(NanochatCheckpointError, match="several nanochat stages .*base_checkpoints, "
                                                      "chatsft_checkpoints.*pass one"):
        load_model(base)


def test_load_model_on_chatsft_checkpoints_picks_the_largest_tag_and_says_so(tmp_path, capsys):
    """A nanochat base folder with chatsft_checkpoints/{d1, d4}: d1 holds an empty (unloadable) model file,
    d4 the fixture's real one at step 700 and a second, older step; load_model picks d4, step 700."""
    src = fixture("nanochat-head-d4")
    base = tmp_path / "nanochat"
    sft = base / "chatsft_checkpoints"
    (sft / "d1").mkdir(parents=True)
    (sft / "d1" / "model_000900.pt").write_bytes(b"")
    (sft / "d4").mkdir()
    for f in (src / "base_checkpoints" / "d4").iterdir():
        (sft / "d4" / f.name).symlink_to(f)
    (sft / "d4" / "model_000070.pt").write_bytes(b"")  # an older step: never read
    (base / "tokenizer").symlink_to(src / "tokenizer")
    model, tok, meta = load_model(sft)
    assert meta["step"] == 700 and meta["nanochat_checkpoint"] == str(sft / "d4")
    assert tok is not None and model.config.n_layer == 4
    err = capsys.readouterr().err
    assert "model tag d4 (largest depth tag of d1, d4)" in err and "step 700 (the last)" in err
    ref = load_file_logits(src)
    with torch.no_grad():
        assert torch.equal(model(ref["input_ids"]), ref["logits"])


def load_file_logits(src: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(src / "reference.safetensors")


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, gsm8k, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok, _ = load_model(fixture("nanochat-head-d4"))
        arc = choice_eval(model, tok, load_problems("arc", str(ARC)), task="arc", batch_size=3, progress=False)
        gsm = gsm8k_eval(model, tok, load_problems("gsm8k", gsm8k, 5), num_samples=2, temperature=1.0,
                         max_new_tokens=6, progress=False)
        Path(f"{out}.{rank}").write_text(json.dumps([arc.to_dict(), gsm.to_dict()]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path, shared_data):
    """2 gloo ranks (problems 0, 2, 4 ... and 1, 3 ...) give every rank the one-process result: counts, pass@k
    and the records in the problems' order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gsm8k = str(shared_data / "gsm8k" / "test.jsonl")
    mp.spawn(_ddp_worker, args=(2, port, gsm8k, str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"r.{r}").read_text()) for r in range(2)]
    model, tok, _ = load_model(fixture("nanochat-head-d4"))
    single = [choice_eval(model, tok, load_problems("arc", str(ARC)), task="arc", batch_size=3,
                          progress=False).to_dict(),
              gsm8k_eval(model, tok, load_problems("gsm8k", gsm8k, 5), num_samples=2, temperature=1.0,
                         max_new_tokens=6, progress=False).to_dict()]
    single = json.loads(json.dumps(single))
    assert ranks[0] == ranks[1] == single
    assert [r["predicted"] for r in single[0]["records"]] == reference("nanochat-head-d4")["arc_fixture"]["predicted"]
    assert len({r["completion"] for r in single[1]["records"]}) == 10  # sampled: the order is really checked


@pytest.mark.parametrize("command", [["chat", "-p", "hi"], ["eval"]])
def test_model_tag_without_source_is_a_usage_error(tmp_path, capsys, command):
    code = main([command[0], "--checkpoint", str(tmp_path), "-g", "d2", *command[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"aquainterp {command[0]}: error: -g/--model-tag goes with -i; with --checkpoint name the "
                   "tag's folder itself"]
