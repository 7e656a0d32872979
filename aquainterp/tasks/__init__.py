"""Multiple-choice tasks: the problem record, its chat rendering, answer extraction, data loaders.

Loaders live in their own modules (`tasks.synthetic`, `tasks.aqua`, `tasks.gsm8k`) and are imported
from there, so importing this package stays cheap.
"""

from aquainterp.tasks.chat import (
    STYLES,
    answer_step,
    conversation,
    decision_prompt,
    letter_token_ids,
    option_spans,
    reasoning_decision_prompt,
)
from aquainterp.tasks.extract import extract_letter
from aquainterp.tasks.problem import LETTERS, MCProblem

__all__ = ["LETTERS", "STYLES", "MCProblem", "answer_step", "conversation", "decision_prompt", "extract_letter",
           "letter_token_ids", "option_spans", "reasoning_decision_prompt"]
