"""Issue 30: inputs with hostile sizes end in one line naming the file, fast: a 20,000-panel template, JSON
nested 100,000 deep (template, workspace, tokenizer.json, a metrics row), and tok_train on a disk that
refuses its tokenizer.json (the message names the file; no tokenizer.json.tmp is left)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path

from reliability.conftest import _FORK, call_cli, one_line_error, record_case

DEEP = "[" * 100_000 + "]" * 100_000


def aquainterp(argv, capsys):
    from aquainterp.cli.main import main

    return call_cli(main, argv, capsys)


def _sample(tmp_path: Path, capsys) -> Path:
    run = tmp_path / "run"
    assert aquainterp(["dashboard", "sample", "--run", run, "--steps", "2"], capsys)[0] == 0
    return run


def test_template_with_20000_panels_is_refused_at_once(tmp_path, capsys):
    """The issue's 20,000-panel file (1.5 MB: over the size limit) and a 1,000-panel one under it (over the
    panel limit): both refused in well under a second, where rendering took ~30 ms a panel."""
    from dashboards.template import MAX_PANELS, MAX_TEMPLATE_BYTES

    run = _sample(tmp_path, capsys)
    outcomes, holds = [], True
    for n, says in ((20_000, f"a template file holds at most {MAX_TEMPLATE_BYTES:,}"),
                    (1_000, f"1000 panels; a template holds at most {MAX_PANELS}")):
        panels = [{"kind": "line", "title": f"p{i}", "metrics": ["rl/acc"], "x": "rl/step"} for i in range(n)]
        big = tmp_path / f"big{n}.json"
        big.write_text(json.dumps({"version": 1, "name": f"big{n}", "title": "Big",
                                   "sections": [{"name": "s", "panels": panels}]}))
        t0 = time.perf_counter()
        code, _, err = aquainterp(["dashboard", "html", "--run", run, "--template", big, "-o", tmp_path / "r.html"],
                                  capsys)
        seconds = time.perf_counter() - t0
        ok, outcome = one_line_error(code, err, 2)
        holds &= ok and big.name in err and says in err and seconds < 5 and not (tmp_path / "r.html").exists()
        outcomes.append(f"{n} panels ({big.stat().st_size:,} bytes): exit {code} in {seconds:.2f} s, "
                        f"'{err.strip().rsplit(': ', 1)[-1][:50]}'")
    record_case("template with 20,000 (1,000) panels", "aquainterp dashboard html --template big.json",
                "exit 2 < 5 s naming the file", "; ".join(outcomes), holds)


def test_deeply_nested_json_names_the_file(tmp_path, capsys, tokenizer_dir):
    from aquainterp.logger import read_metrics
    from aquainterp.tokenizer import Tokenizer

    outcomes, holds = [], True
    template = tmp_path / "deep.json"
    template.write_text(DEEP)
    run = _sample(tmp_path, capsys)
    code, _, err = aquainterp(["dashboard", "html", "--run", run, "--template", template, "-o", tmp_path / "r.html"],
                              capsys)
    ok, outcome = one_line_error(code, err, 2)
    holds &= ok and "deep.json" in err
    outcomes.append(f"template: {outcome[:60]}")

    code, _, err = aquainterp(["dashboard", "load", template], capsys)
    ok, outcome = one_line_error(code, err, 2)
    holds &= ok and "deep.json" in err
    outcomes.append(f"workspace: {outcome[:60]}")

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    (tok / "tokenizer.json").write_text('{"model": ' + DEEP + "}")
    try:
        Tokenizer.load(tok)
        message = "(loaded)"
    except ValueError as e:
        message = str(e)
    holds &= "tokenizer.json" in message and "nested too deeply" in message and "\n" not in message
    outcomes.append(f"tokenizer: {message[-60:]}")

    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "x": ' + DEEP + "}\n")
    try:
        read_metrics(run)
        message = "(read)"
    except ValueError as e:
        message = str(e)
    holds &= "metrics.jsonl:" in message and "nested too deeply" in message
    outcomes.append(f"metrics row: {message[-50:]}")
    record_case("JSON nested 100,000 deep", "template, workspace, tokenizer.json, metrics row",
                "one line naming the file", "; ".join(outcomes), holds)


def _tok_train_on_a_full_disk(out_dir: str, report: str) -> None:
    from training.tok_train import TokTrainConfig, run

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG, as on a full disk
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        run(TokTrainConfig(data="synthetic", out_dir=out_dir, vocab_size=512, max_chars=20_000, eval_docs=5))
        outcome = "finished"
    except OSError as e:
        outcome = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    Path(report).write_text(outcome)
    os._exit(0)


def test_tok_train_on_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path):
    out, report = tmp_path / "tok", tmp_path / "report"
    proc = _FORK.Process(target=_tok_train_on_a_full_disk, args=(str(out), str(report)))
    proc.start()
    proc.join(120)
    said = report.read_text()
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    holds = str(out / "tokenizer.json") in said and "File too large" in said and not [n for n in left if "tmp" in n]
    record_case("tok_train on a full disk", "python -m training.tok_train (disk refuses tokenizer.json)",
                "message names the file, no .tmp left", f"{said[-110:]}; left in out: {left}", holds)
