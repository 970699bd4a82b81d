"""The Zephyr chat template used by ML-Mamba and Cobra (formats.md §1.6).

The system prompt is empty and there is no BOS. A user turn is
"<|user|>\\n{msg}<|endoftext|>\\n<|assistant|>\\n"; an assistant turn is "{msg}<|endoftext|>"
(" " for an empty message); user turns after the first start with "\\n". "<image>" markers are
removed from messages, which are stripped.
"""

__all__ = ["ZephyrPrompt", "build_prompt"]

EOS = "<|endoftext|>"


class ZephyrPrompt:
    """Builds a conversation turn by turn: user, assistant, user, ..."""

    def __init__(self):
        self.text = ""
        self.turns = 0

    def add_turn(self, role, message):
        expected = "user" if self.turns % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"prompt: turn {self.turns} must be role {expected!r}, got {role!r}")
        if not isinstance(message, str):
            raise TypeError(f"prompt: message must be a str, got {type(message).__name__}")
        message = message.replace("<image>", "").strip()
        if role == "user":
            piece = f"<|user|>\n{message}{EOS}\n<|assistant|>\n"
            if self.turns > 0:
                piece = "\n" + piece
        else:
            piece = f"{message if message else ' '}{EOS}"
        self.text += piece
        self.turns += 1
        return piece

    def get_prompt(self):
        return self.text


def build_prompt(message, history=()):
    """The prompt for `message` after earlier (user, assistant) pairs in `history`."""
    p = ZephyrPrompt()
    for user, assistant in history:
        p.add_turn("user", user)
        p.add_turn("assistant", assistant)
    p.add_turn("user", message)
    return p.get_prompt()
