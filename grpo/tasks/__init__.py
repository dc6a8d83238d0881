"""Tasks: everything that knows one dataset. A task module provides `Problem`, `load_splits(source)` ->
`Splits` (train pool, validation, test, exemplars), `build_messages(problem, system_prompt, exemplars)` and
`score(completion, gold, truncated)` -> (reward, outcome). GSM8k is the one task today (`gsm8k.py`); a second
dataset is one new file beside it."""
