"""AQuA-RAT and GSM8K loaders: real files, the hub code path on a local dataset, and bad rows."""

import json
import re

import pytest

from aquainterp.tasks import LETTERS
from aquainterp.tasks.aqua import load_aqua, parse_row
from aquainterp.tasks.gsm8k import load_gsm8k, strip_calculator
from aquainterp.tasks.rows import RowError

GOOD = {"question": "What is 2 + 3?", "options": ["A)4", "B) 5", "C)6", "D)7", "E)8"],
        "rationale": "2 + 3 = 5. Answer B", "correct": "B"}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_aqua_dev_file(shared_data):
    problems = load_aqua(shared_data / "aqua_rat" / "dev.json")
    assert len(problems) == 254
    first = problems[0]
    assert first.options == ("32400", "6000", "600", "60000", "10")
    assert first.correct == "A" and first.source.endswith("dev.json:1")
    assert first.question.startswith("Three birds are flying")
    # gold distribution of the official dev split (counted from the file)
    assert [sum(p.correct == x for p in problems) for x in LETTERS] == [69, 66, 43, 50, 26]


def test_option_prefix_with_or_without_space():
    p = parse_row("t:1", GOOD)
    assert p.options == ("4", "5", "6", "7", "8") and p.answer_text == "5"


@pytest.mark.parametrize(("change", "kind", "detail"), [
    ({"options": None}, "missing field", "'options' is missing"),
    ({"options": ["A)1", "B)2", "C)3", "D)4"]}, "not five options", "got 4"),
    ({"correct": "F"}, "letter outside A-E", "got 'F'"),
    ({"options": ["A)1", "B)2", "D)3", "C)4", "E)5"]}, "bad option", "option 3 should start with 'C)'"),
    ({"question": 7}, "wrong type", "'question' must be str, got int"),
])
def test_bad_rows_name_file_line_and_kind(tmp_path, change, kind, detail):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(GOOD), "", json.dumps(bad)])
    with pytest.raises(RowError, match=re.escape(f"rows.jsonl:3: {kind}: ") + ".*" + re.escape(detail)):
        load_aqua(path)


def test_invalid_json_and_skip_bad_rows_counts_them(tmp_path):
    lines = [json.dumps(GOOD), '{"question": "x", ', json.dumps({**GOOD, "correct": "Z"}), json.dumps(GOOD),
             json.dumps({**GOOD, "options": ["A)1"]})]
    path = write_lines(tmp_path / "mixed.json", lines)
    with pytest.raises(RowError, match=r"mixed.json:2: invalid JSON"):
        load_aqua(path)
    with pytest.warns(UserWarning, match=r"skipped 3 bad rows \(1 invalid JSON, 1 letter outside A-E, "
                                         r"1 not five options\)") as record:
        problems = load_aqua(path, skip_bad_rows=True)
    assert [p.source.rsplit(":", 1)[1] for p in problems] == ["1", "4"]
    assert "mixed.json:3" in str(record[0].message)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="AQuA file not found: .*nope.json"):
        load_aqua(tmp_path / "nope.json")


def hub_layout(root, split, lines):
    """A local dataset repository laid out as the hub's deepmind/aqua_rat (config "raw")."""
    (root / "raw").mkdir(parents=True)
    write_lines(root / "raw" / f"{split}.jsonl", lines)
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: raw\n  data_files:\n  - split: {split}\n    path: raw/{split}.jsonl\n---\n")
    return root


def test_hub_path_goes_through_load_dataset_and_the_same_validator(shared_data, tmp_path, offline):
    lines = (shared_data / "aqua_rat" / "dev.json").read_text().splitlines()[:6]
    repo = hub_layout(tmp_path / "aqua_rat", "validation", lines)
    from_hub = load_aqua(str(repo), split="validation")
    from_file = load_aqua(shared_data / "aqua_rat" / "dev.json")[:6]
    assert [(p.question, p.options, p.rationale, p.correct) for p in from_hub] == \
           [(p.question, p.options, p.rationale, p.correct) for p in from_file]
    assert from_hub[2].source == f"{repo}:validation:2"


def test_hub_bad_row_names_split_and_index(tmp_path, offline):
    lines = [json.dumps(GOOD), json.dumps({**GOOD, "correct": "G"})]
    repo = hub_layout(tmp_path / "aqua_bad", "validation", lines)
    with pytest.raises(RowError, match=r"aqua_bad:validation:1: letter outside A-E"):
        load_aqua(str(repo), split="validation")


def test_gsm8k_files(shared_data):
    train = load_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    test = load_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.answer == "18"
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer\u2019s market.")
    assert first.calculator_calls == (("16-3-4", "9"), ("9*2", "18"))
    assert not any("<<" in p.solution or "####" in p.solution for p in train + test)
    assert all(p.answer.lstrip("-").replace(".", "", 1).isdigit() for p in train + test)
    assert "1080" in {p.answer for p in train}  # "#### 1,080" loses its separator


def test_gsm8k_bad_rows(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "1+1=2\n#### 2"}),
                                              json.dumps({"question": "q", "answer": "no final line"}),
                                              json.dumps({"answer": "#### 3"})])
    with pytest.raises(RowError, match="g.jsonl:2: no final answer: expected one '#### <number>' line, found 0"):
        load_gsm8k(path)
    with pytest.warns(UserWarning, match=r"skipped 2 bad rows \(1 missing field, 1 no final answer\)"):
        assert [p.answer for p in load_gsm8k(path, skip_bad_rows=True)] == ["2"]


def test_strip_calculator():
    assert strip_calculator("16 - 3 = <<16-3=13>>13 eggs") == "16 - 3 = 13 eggs"
