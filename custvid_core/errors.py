"""Errors shown to users."""


class InputError(ValueError):
    """An input a user gave is not usable.

    The message names the input, says what is wrong and what would be valid, so a ComfyUI
    user can fix the graph without reading a traceback.
    """

    def __init__(self, input_name: str, problem: str, expected: str):
        self.input_name = input_name
        self.problem = problem
        self.expected = expected
        super().__init__(f"{input_name}: {problem}. Expected {expected}.")
