"""`aquainterp chat`: talk to a checkpoint in the terminal, as nanochat's `python -m scripts.chat_cli` does.

The conversation is kept as tokens in nanochat's chat format: <|bos|>, then per turn <|user_start|> text
<|user_end|> <|assistant_start|> reply <|assistant_end|> (each user turn rendered by
Tokenizer.render_for_completion; the reply keeps the very tokens the model sampled). Each reply is sampled
with a KV cache (prefill the whole conversation once, then one token per step) and printed as it is
generated; it ends at <|assistant_end|> or <|bos|> (nanochat's terminal tokens) or after --max-new-tokens.
Special tokens in a reply are printed by name. nanochat's calculator tool runs as in its Engine
(aquainterp.model.streaming): after <|python_start|>expr<|python_end|> the value is forced in as
<|output_start|>value<|output_end|>; --no-tools turns it off.

Typing `quit` or `exit`, end of input (Ctrl-D) or Ctrl-C at the prompt ends the chat with status 0; Ctrl-C
while a reply is printing stops that reply (it is left out of the history) and returns to the prompt;
`clear` starts a new conversation. When the conversation outgrows the model's context the oldest exchanges
are dropped, with a note.
"""

from __future__ import annotations

import sys

import torch

from aquainterp.model.streaming import stream_tokens

DEFAULT_TEMPERATURE = 0.6  # nanochat chat_cli's defaults
DEFAULT_TOP_K = 50
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_SEED = 42  # nanochat's Engine seeds its sampler with 42


class TextStream:
    """Turns a growing list of token ids into printable text increments: the text of all tokens so far,
    minus what was already shown, held back while it ends inside a multi-byte character (U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[len(self.shown):], text
        return new


class Chat:
    """The token state of one conversation and the reply loop; `out` receives the printed text."""

    def __init__(self, model, tokenizer, *, temperature: float, top_k: int | None, max_new_tokens: int,
                 seed: int, out=None, tools: bool = True):
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.temperature, self.top_k, self.max_new_tokens = temperature, top_k, max_new_tokens
        self.out = out or sys.stdout
        self.bos = tokenizer.bos_token_id
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.stop = (self.assistant_end, self.bos)
        self.limit = model.rotary_len
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.turns: list[list[int]] = []  # finished exchanges: user turn + reply + <|assistant_end|>

    def clear(self) -> None:
        self.turns = []

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def user_turn(self, text: str) -> list[int]:
        """<|user_start|> text <|user_end|> <|assistant_start|>, rendered by the tokenizer's chat format."""
        ids = self.tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})
        return list(ids[1:])  # without its <|bos|>: the conversation has one, at the start

    def reply(self, text: str) -> list[int] | None:
        """Sample and print the reply to `text`; returns its tokens (None if the message did not fit).
        KeyboardInterrupt stops the reply and propagates after the partial text is ended with a newline."""
        turn = self.user_turn(text)
        if 1 + len(turn) + 1 > self.limit:
            self.write(f"(message is {len(turn)} tokens; the model reads at most {self.limit - 2} in one turn; "
                       "not sent)\n")
            return None
        dropped = 0
        while self.turns and 1 + sum(map(len, self.turns)) + len(turn) + 1 > self.limit:
            self.turns.pop(0)
            dropped += 1
        if dropped:
            self.write(f"(dropped the {dropped} oldest exchange{'s' * (dropped > 1)}: the conversation "
                       f"outgrew the model's {self.limit} positions)\n")
        prompt = [self.bos, *[t for exchange in self.turns for t in exchange], *turn]
        budget = min(self.max_new_tokens, self.limit - len(prompt))
        stream = TextStream(self.tokenizer)
        reply: list[int] = []
        self.write("Assistant: ")
        try:
            for token in stream_tokens(self.model, prompt, max_new_tokens=budget, temperature=self.temperature,
                                       top_k=self.top_k, stop_tokens=self.stop, generator=self.generator,
                                       tokenizer=self.tokenizer if self.tools else None):
                if token in self.stop:
                    break
                reply.append(token)
                self.write(stream.push(token))
        finally:
            self.write(stream.flush() + "\n")
        self.turns.append([*turn, *reply, self.assistant_end])
        return reply


def add_arguments(parser) -> None:
    from aquainterp.cli.args import SEED, count_int, device_name, existing_path, number, positive_int

    parser.epilog = ("In the chat: 'clear' starts a new conversation; 'quit', 'exit', Ctrl-D or Ctrl-C at the "
                     "prompt end it (status 0); Ctrl-C during a reply stops that reply. nanochat's own flags work: "
                     "aquainterp chat -i sft -g d20 -s 650 -t 0.6 -k 50 -p 'Hi'.")
    parser.add_argument("--checkpoint", type=existing_path("dir"), default=None,
                        help="checkpoint to talk to: a folder written by aquainterp (save_checkpoint), or "
                             "nanochat's: a model folder (model_<step>.pt), the folder above its model tags "
                             "(e.g. chatsft_checkpoints/: the largest tag, as nanochat picks it) or a base "
                             "folder with one *_checkpoints/ in it")
    parser.add_argument("-i", "--source", choices=("base", "mid", "sft", "rl"), default=None,
                        help="instead of --checkpoint, as nanochat's chat_cli -i: the <stage>_checkpoints/ folder "
                             "of nanochat's base folder ($NANOCHAT_BASE_DIR, else ~/.cache/nanochat)")
    parser.add_argument("-g", "--model-tag", default=None,
                        help="with -i: the model tag to open (default: the largest, as nanochat picks it)")
    parser.add_argument("-s", "--step", type=count_int(), default=None,
                        help="checkpoint step to load (default: the last one)")
    parser.add_argument("-p", "--prompt", default=None,
                        help="one-shot: send this message, print the reply as it streams, exit")
    parser.add_argument("-t", "--temperature", type=number(float, 0.0, 100.0), default=DEFAULT_TEMPERATURE,
                        help=f"sampling temperature; 0 = greedy (default {DEFAULT_TEMPERATURE}, nanochat's)")
    parser.add_argument("-k", "--top-k", type=count_int(), default=DEFAULT_TOP_K,
                        help=f"sample among the k most likely tokens; 0 = the whole vocabulary "
                             f"(default {DEFAULT_TOP_K}, nanochat's)")
    parser.add_argument("--max-new-tokens", type=positive_int(1 << 20), default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest reply in tokens (default {DEFAULT_MAX_NEW_TOKENS}); a reply also ends "
                             "at <|assistant_end|>, and never runs past the model's context")
    parser.add_argument("--seed", type=SEED, default=DEFAULT_SEED,
                        help=f"seed of the sampler (default {DEFAULT_SEED}, as nanochat's Engine)")
    parser.add_argument("--no-tools", dest="tools", action="store_false",
                        help="do not run nanochat's calculator tool (by default, as nanochat's Engine, "
                             "<|python_start|>expr<|python_end|> gets <|output_start|>value<|output_end|> forced in)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda, mps or auto")


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def run(args) -> int:
    from aquainterp.checkpoints.load import checkpoint_argument, load_model
    from aquainterp.cli.rundir import UsageError

    if (args.checkpoint is None) == (args.source is None):
        raise UsageError("give the checkpoint: --checkpoint DIR, or nanochat's -i base|mid|sft|rl [-g TAG]")
    checkpoint = checkpoint_argument(args.checkpoint, args.source, args.model_tag)
    model, tokenizer, meta = load_model(checkpoint, args.step, device=_device(args.device))
    if tokenizer is None:
        raise UsageError(f"{checkpoint}: no tokenizer beside this checkpoint (aquainterp: <step>/tokenizer/; "
                         "nanochat: <base>/tokenizer/tokenizer.pkl); chat needs one")
    chat = Chat(model, tokenizer, temperature=args.temperature, top_k=args.top_k or None,
                max_new_tokens=args.max_new_tokens, seed=args.seed, tools=args.tools)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("-p/--prompt: the message is empty")
        try:
            chat.reply(args.prompt)
        except KeyboardInterrupt:
            pass
        return 0
    where = meta.get("nanochat_checkpoint", str(checkpoint))
    print(f"aquainterp chat: {where} step {meta.get('step', '?')}, {model.config.n_layer} layers, "
          f"temperature {args.temperature}, top-k {args.top_k or 'off'}")
    print("Type 'quit' or 'exit' (or Ctrl-D) to end, 'clear' to start a new conversation.")
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print("\nGoodbye!")
            return 0
        if text.lower() in ("quit", "exit"):
            print("Goodbye!")
            return 0
        if text.lower() == "clear":
            chat.clear()
            print("Conversation cleared.")
            continue
        if not text:
            continue
        try:
            chat.reply(text)
        except KeyboardInterrupt:
            print("(reply interrupted; left out of the conversation)")
