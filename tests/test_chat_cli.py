"""`aquainterp chat` (issue 28): driven through a pseudo-terminal as a user types, on one of our checkpoints
(a tiny GPT trained here to answer "hi" and "bye") and on nanochat's fixtures, whose greedy reply must be the
one nanochat's own Engine produced (tests/golden/nanochat_tasks, chat_fixture)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tasks_tokenizer import trained_tokenizer

from aquainterp.chat import Chat
from aquainterp.checkpoints.native import save_checkpoint
from aquainterp.cli.main import main, subcommand_parser
from aquainterp.model.gpt import GPT, GPTConfig

GOLDEN = Path(__file__).parent / "golden" / "nanochat_tasks"
FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"
CONVERSATION = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"},
                             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "See you soon."}]}
WAIT = 180.0  # seconds: a cold start imports torch on a shared, busy CPU


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, tokenizer, checkpoint folder): depth 1, trained for 60 AdamW steps on CONVERSATION's assistant
    tokens until it replies 'Hello there!' to 'hi' and 'See you soon.' to 'bye' (loss ~0.01)."""
    tok = trained_tokenizer()
    ids, mask = tok.render_conversation(CONVERSATION)
    x = torch.tensor([ids[:-1]])
    y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tok.vocab_size, sequence_len=64))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(60):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    folder = tmp_path_factory.mktemp("chat") / "ckpt"
    save_checkpoint(folder, 60, model, None, {}, tokenizer=tok)
    return model, tok, folder


# --------------------------------------------------------------------------------------- in process


class Recorder(io.StringIO):
    """stdout that notes, for each write, how many forwards the model had run by then."""

    def __init__(self, forwards: list):
        super().__init__()
        self.forwards, self.log = forwards, []

    def write(self, text):
        self.log.append((text, len(self.forwards)))
        return super().write(text)


def test_reply_is_written_token_by_token_between_forwards(trained):
    model, tok, _ = trained
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = Recorder(forwards)
        chat = Chat(model, tok, temperature=0.0, top_k=None, max_new_tokens=32, seed=0, out=out)
        assert chat.reply("hi") == tok.encode("Hello there!")
    finally:
        handle.remove()
    chunks = [(text, n) for text, n in out.log if text not in ("", "Assistant: ")]
    n_tokens = len(tok.encode("Hello there!"))
    assert "".join(t for t, _ in chunks) == "Hello there!\n"
    # one chunk per token, the k-th written after the prefill and k-1 decode steps, before the next one:
    # the text streams as it is sampled, not after the reply is done
    assert [n for _, n in chunks[:-1]] == list(range(1, n_tokens + 1))
    assert len(forwards) == n_tokens + 1  # the decode step that sampled <|assistant_end|>


def test_history_is_nanochats_token_layout_and_interrupt_drops_the_reply(trained):
    model, tok, _ = trained
    out = io.StringIO()
    chat = Chat(model, tok, temperature=0.0, top_k=None, max_new_tokens=32, seed=0, out=out)
    assert tok.decode(chat.reply("hi")) == "Hello there!"
    assert tok.decode(chat.reply("bye")) == "See you soon."
    # <|bos|> + every exchange: exactly what render_conversation gives for the whole chat (the training data)
    assert [tok.bos_token_id] + [t for turn in chat.turns for t in turn] == tok.render_conversation(CONVERSATION)[0]

    seen = []

    def stop_after_three(module, args, output):  # Ctrl-C while the third token is being computed
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(stop_after_three)
    try:
        with pytest.raises(KeyboardInterrupt):
            chat.reply("hi")
    finally:
        handle.remove()
    assert len(chat.turns) == 2 and out.getvalue().endswith("\n")  # the partial reply line is ended, not kept


def test_a_long_conversation_drops_its_oldest_exchanges_with_a_note(trained):
    """The model reads rotary_len = 640 positions. Each message below is ~150 tokens: from the fifth turn on the
    oldest exchanges go, each prompt still fits, and a message longer than the model can read is not sent."""
    model, tok, _ = trained
    out = io.StringIO()
    chat = Chat(model, tok, temperature=0.0, top_k=None, max_new_tokens=8, seed=0, out=out)
    message = "hi " * 50  # three byte tokens per "hi "
    assert 140 < len(chat.user_turn(message)) < 160
    kept = []
    for _ in range(8):
        assert chat.reply(message) is not None
        kept.append(len(chat.turns))
        assert 1 + sum(map(len, chat.turns)) <= model.rotary_len
    assert kept[:3] == [1, 2, 3] and max(kept) <= 4 and kept[-1] < 8
    assert out.getvalue().count("oldest exchange") == 8 - kept.index(max(kept)) - 1
    before = list(chat.turns)
    assert chat.reply("hi " * 250) is None
    assert "not sent" in out.getvalue() and chat.turns == before


@pytest.mark.parametrize("name", ["nanochat-head-d4", "nanochat-2026-01-d2"])
def test_sampled_reply_with_the_defaults_is_nanochats(name):
    """With chat_cli's defaults (temperature 0.6, top-k 50, seed 42) the sampled reply is token for token
    the one nanochat's Engine sampled for the same conversation (head-d4: 64 tokens; 2026-01-d2: 19 and
    <|assistant_end|>)."""
    from aquainterp import chat as chat_cli
    from aquainterp.checkpoints.load import load_model

    ref = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["chat_fixture"]
    sampled = ref["sampled"]
    assert (sampled["temperature"], sampled["top_k"], sampled["seed"]) == (
        chat_cli.DEFAULT_TEMPERATURE, chat_cli.DEFAULT_TOP_K, chat_cli.DEFAULT_SEED)
    model, tok, _ = load_model(fixture(name))
    chat = Chat(model, tok, temperature=chat_cli.DEFAULT_TEMPERATURE, top_k=chat_cli.DEFAULT_TOP_K,
                max_new_tokens=ref["max_tokens"], seed=chat_cli.DEFAULT_SEED, out=io.StringIO())
    reply = chat.reply(ref["prompt"])
    assert reply == [t for t in sampled["generated"] if t not in chat.stop]
    assert len(reply) in (64, 19)


def test_nanochat_flags_open_the_stage_folder_of_nanochats_base(tmp_path, monkeypatch, capsys):
    """chat -i sft [-g TAG] [-s STEP], as nanochat's chat_cli: <$NANOCHAT_BASE_DIR>/chatsft_checkpoints, the
    largest tag unless -g; eval -i takes them too."""
    ref = json.loads((GOLDEN / "nanochat-2026-01-d2.json").read_text(encoding="utf-8"))["chat_fixture"]
    src = fixture("nanochat-2026-01-d2")
    base = tmp_path / "nanochat"
    (base / "chatsft_checkpoints" / "d2").mkdir(parents=True)
    (base / "chatsft_checkpoints" / "d1").mkdir()  # smaller: never picked
    for f in (src / "base_checkpoints" / "d2").iterdir():
        (base / "chatsft_checkpoints" / "d2" / f.name).symlink_to(f)
    (base / "tokenizer").symlink_to(src / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    for extra in ([], ["-g", "d2"], ["-g", "d2", "-s", "300"]):
        assert main(["chat", "-i", "sft", *extra, "-t", "0", "--max-new-tokens", "64", "-p", ref["prompt"]]) == 0
        assert capsys.readouterr().out == "Assistant: " + ref["text"] + "\n"
    assert main(["chat", "-i", "rl", "-p", "hi"]) == 1
    assert "chatrl_checkpoints: no such folder (nanochat's -i rl reads it" in capsys.readouterr().err
    assert main(["chat", "-i", "sft", "-g", "d9", "-p", "hi"]) == 1
    assert "d9: no such model tag (tags here: d1, d2)" in capsys.readouterr().err
    assert main(["chat", "-p", "hi"]) == 2
    assert "give the checkpoint: --checkpoint DIR, or nanochat's -i" in capsys.readouterr().err
    arc = GOLDEN / "arc_handmade.jsonl"
    assert main(["eval", "-i", "sft", "-s", "300", "--task", "arc", "--data", str(arc)]) == 0
    expected = json.loads((GOLDEN / "nanochat-2026-01-d2.json").read_text())["arc_fixture"]["accuracy"]
    assert f"arc categorical accuracy {expected:.4f}" in capsys.readouterr().out


def test_help_explains_every_flag(capsys):
    parser, _ = subcommand_parser("chat")
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == {"checkpoint", "source", "model_tag", "step", "prompt", "temperature", "top_k",
                                       "max_new_tokens", "seed", "tools", "device"}
    assert all(a.help and len(a.help) > 20 for a in flags)
    assert main(["chat", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(a.option_strings[-1] in text for a in flags)


# ----------------------------------------------------------------------------------- pseudo-terminal


class Terminal:
    """`python -m aquainterp.cli.main chat ...` on a pseudo-terminal (its controlling terminal: Ctrl-C and
    Ctrl-D mean what they mean to a user)."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="0", AQUAINTERP_DEBUG="0")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the command
            try:
                os.execve(sys.executable, [sys.executable, "-m", "aquainterp.cli.main", "chat", *args], env)
            finally:
                os._exit(127)
        self.buffer, self.status = b"", None

    def read_until(self, marker: bytes, after: int = 0) -> bytes:
        deadline = time.monotonic() + WAIT
        while marker not in self.buffer[after:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} within {WAIT:.0f} s; output so far: {self.buffer!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"chat ended before {marker!r}; output: {self.buffer!r}")
                self.buffer += data
        return self.buffer

    def send(self, data: bytes) -> int:
        mark = len(self.buffer)
        os.write(self.fd, data)
        return mark

    def wait_blocked_in_read(self) -> None:
        """Until the chat's main thread sleeps (blocked reading the terminal). A SIGINT that lands after
        input() has printed its prompt but before it blocks in read() sets Python's flag without
        interrupting the read, so the KeyboardInterrupt waits for the next line (a CPython race no person
        can hit by typing); a test pressing Ctrl-C must come after the read has started."""
        deadline, asleep = time.monotonic() + WAIT, 0
        while asleep < 5:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            asleep = asleep + 1 if state == "S" else 0
            if time.monotonic() > deadline:
                raise AssertionError(f"chat never waited for input; output: {self.buffer!r}")
            time.sleep(0.05)

    def running(self) -> bool:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self.status = status
        return pid == 0

    def wait(self) -> int:
        deadline = time.monotonic() + WAIT
        while self.status is None and self.running():
            try:  # drain, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += os.read(self.fd, 4096)
            except OSError:
                pass
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"chat did not exit; output: {self.buffer!r}")
        os.close(self.fd)
        return os.waitstatus_to_exitcode(self.status)


def test_chat_in_a_terminal_on_our_checkpoint_two_turns_then_ctrl_d(trained):
    _, _, folder = trained
    term = Terminal("--checkpoint", str(folder), "--temperature", "0")
    try:
        term.read_until(b"User: ")
        mark = term.send(b"hi\n")
        term.read_until(b"Assistant: Hello there!", mark)
        # the reply is on the screen while the chat is still running (streamed, not printed at exit)
        assert term.running()
        term.read_until(b"User: ", mark)
        mark = term.send(b"bye\n")
        term.read_until(b"Assistant: See you soon.\r\n", mark)  # the second turn saw the first
        term.read_until(b"User: ", mark)
        mark = term.send(b"clear\n")
        term.read_until(b"Conversation cleared.", mark)
        term.read_until(b"User: ", mark)
        mark = term.send(b"\x04")  # Ctrl-D at an empty line: end of input
        term.read_until(b"Goodbye!", mark)
    finally:
        code = term.wait()
    assert code == 0 and b"Traceback" not in term.buffer


@pytest.mark.parametrize("name", ["nanochat-2026-01-d2"])
def test_chat_in_a_terminal_on_a_nanochat_checkpoint_replies_as_nanochat_then_ctrl_c(name):
    ref = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["chat_fixture"]
    term = Terminal("--checkpoint", str(fixture(name) / "base_checkpoints"), "--temperature", "0",
                    "--max-new-tokens", str(ref["max_tokens"]))
    try:
        term.read_until(b"User: ")
        mark = term.send(ref["prompt"].encode() + b"\n")
        expected = ("Assistant: " + ref["text"]).encode().replace(b"\n", b"\r\n") + b"\r\n"
        term.read_until(expected, mark)
        assert term.running()
        term.read_until(b"User: ", mark)
        term.wait_blocked_in_read()
        mark = term.send(b"\x03")  # Ctrl-C at the prompt
        term.read_until(b"Goodbye!", mark)
    finally:
        code = term.wait()
    assert code == 0 and b"Traceback" not in term.buffer


def test_piped_input_and_quit(trained):
    """Not a terminal: messages from a pipe, 'quit' ends the chat with status 0."""
    _, _, folder = trained
    done = subprocess.run([sys.executable, "-m", "aquainterp.cli.main", "chat", "--checkpoint", str(folder),
                           "--temperature", "0"], input=b"hi\n\nquit\nhi\n", capture_output=True, timeout=WAIT)
    out = done.stdout.decode()
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert out.count("Assistant: ") == 1 and "Assistant: Hello there!\n" in out and out.endswith("Goodbye!\n")


@pytest.mark.slow
def test_one_shot_prompt_prints_nanochats_greedy_reply():
    """-p on nanochat-head-d4 in its own process: 64 greedy tokens, byte for byte the text of the tokens
    nanochat's Engine yielded for the same conversation (slow: a cold start; test_nanochat_flags_... checks -p
    in process)."""
    ref = json.loads((GOLDEN / "nanochat-head-d4.json").read_text(encoding="utf-8"))["chat_fixture"]
    done = subprocess.run([sys.executable, "-m", "aquainterp.cli.main", "chat", "--checkpoint",
                           str(fixture("nanochat-head-d4")), "-p", ref["prompt"], "--temperature", "0",
                           "--max-new-tokens", str(ref["max_tokens"])],
                          capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode("utf-8") == "Assistant: " + ref["text"] + "\n"
    assert len(ref["generated"]) == 64 and not done.stderr
