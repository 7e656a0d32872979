"""Multiple-choice tasks: the problem record, its chat rendering, answer extraction, data loaders.

Loaders live in their own modules (`tasks.synthetic`, `tasks.aqua`, `tasks.gsm8k`) and are imported
from there, so importing this package stays cheap.
"""

from aquainterp.tasks.chat import conversation, decision_prompt, option_spans
from aquainterp.tasks.extract import extract_letter
from aquainterp.tasks.problem import LETTERS, MCProblem

__all__ = ["LETTERS", "MCProblem", "conversation", "decision_prompt", "extract_letter", "option_spans"]
