"""One completion sampled token by token with a KV cache, with nanochat's calculator tool.

`stream_tokens` yields each token as it is chosen (what `aquainterp chat` prints and what the GSM8K eval
reads). With a tokenizer given it runs the tool as nanochat's Engine does: after the model writes
<|python_start|> expr <|python_end|>, the expression is evaluated (`calculate`) and, when it has a value,
<|output_start|> str(value) <|output_end|> is forced into the completion before sampling resumes. As in
nanochat, a forced token still costs a step (and the sampler still draws one token per step), and forced
tokens count towards max_new_tokens.

`calculate` follows nanochat's `use_calculator` (engine.py) without running Python's eval: commas are removed;
an expression of digits, + - * / . ( ) and spaces (no "**") is evaluated as Python arithmetic (so 7/7 is
"1.0" and 10//4 is "2", as nanochat's eval gives); otherwise only a string literal's .count(literal) is
evaluated (nanochat allows that through eval after a character and keyword screen; other string methods
it would evaluate, e.g. 'ab'.upper().count('A'), give None here). Anything that fails is None (no output
forced), as in nanochat.
"""

from __future__ import annotations

import ast
import operator
from collections import deque
from collections.abc import Iterator

import torch

ARITHMETIC_CHARS = set("0123456789*+-/.() ")
STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
FORBIDDEN = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
             "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")  # nanochat's screen
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_DIGITS = 4000  # a product of long literals stays cheap below this; larger results are refused (None)


def _arithmetic(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(left, int) and isinstance(right, int) and len(str(abs(left))) + len(str(abs(right))) > MAX_DIGITS:
            raise ValueError("operands too large")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_arithmetic(node.operand))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def _string_count(node):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.func.value.value.count(node.args[0].value)
    raise ValueError("only 'literal'.count('literal') is evaluated")


def calculate(expr: str) -> str | None:
    """nanochat's calculator result for `expr` as the text it forces (str of the value), or None."""
    expr = expr.replace(",", "")
    try:
        if set(expr) <= ARITHMETIC_CHARS:
            if "**" in expr:
                return None
            value = _arithmetic(ast.parse(expr.strip(), mode="eval").body)
        else:
            if not set(expr) <= STRING_CHARS or any(p in expr.lower() for p in FORBIDDEN) or ".count(" not in expr:
                return None
            value = _string_count(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None
    return str(value)


@torch.inference_mode()
def stream_tokens(model, prompt: list[int], *, max_new_tokens: int, temperature: float, top_k: int | None,
                  stop_tokens, generator: torch.Generator | None = None, tokenizer=None) -> Iterator[int]:
    """Yield sampled (or forced) token ids one at a time: the prompt is prefilled once into a KV cache, then
    each new token costs one single-position forward. A stop token is yielded, then the stream ends. With a
    tokenizer, nanochat's calculator tool runs (module docstring)."""
    from aquainterp.model.engine import sample_next_token
    from aquainterp.model.kv_cache import KVCache

    if not prompt:
        raise ValueError("stream_tokens: empty prompt")
    if len(prompt) + max_new_tokens > model.rotary_len:
        raise ValueError(f"stream_tokens: prompt {len(prompt)} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's rotary length {model.rotary_len}")
    special = {}
    if tokenizer is not None:
        special = {name: tokenizer.encode_special(f"<|{name}|>")
                   for name in ("python_start", "python_end", "output_start", "output_end")}
    device = next(model.parameters()).device
    stop = set(stop_tokens)
    forced: deque[int] = deque()
    in_python, expression = False, []
    cache = KVCache(1, model.config.n_layer, len(prompt) + max(max_new_tokens, 1))
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    logits = model(ids, kv_cache=cache, logits_at=torch.tensor([len(prompt) - 1], device=device))
    for step in range(max_new_tokens):
        sampled = int(sample_next_token(logits, temperature, top_k, generator)[0])
        token = forced.popleft() if forced else sampled
        yield token
        if token in stop or step == max_new_tokens - 1:
            return
        if special:
            if token == special["python_start"]:
                in_python, expression = True, []
            elif token == special["python_end"] and in_python:
                in_python = False
                result = calculate(tokenizer.decode(expression)) if expression else None
                if result is not None:
                    forced.extend([special["output_start"], *tokenizer.encode(result), special["output_end"]])
                expression = []
            elif in_python:
                expression.append(token)
        logits = model(torch.tensor([[token]], dtype=torch.long, device=device), kv_cache=cache)[:, -1, :]
