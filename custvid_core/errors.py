"""Errors shown to users."""

# The name errors carry where a host shows an error's type (ComfyUI titles its error dialog with the type's
# module and name): the pack's, not the path of the file that defines it.
SHOWN_MODULE = "CustVid"


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

    def __reduce__(self):  # rebuilt from its three parts (copies, pickles), not from the joined message
        return _input_error, (self.input_name, self.problem, self.expected)


def _input_error(input_name: str, problem: str, expected: str) -> InputError:
    return InputError(input_name, problem, expected)


InputError.__module__ = SHOWN_MODULE
