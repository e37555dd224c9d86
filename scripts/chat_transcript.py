"""Record a real `glmkit chat --greedy` session for the README: a pseudo-terminal types each line.

    python scripts/chat_transcript.py [--model DIR]      # both languages, printed as the README shows them

The lines are the README's; the answers are whatever the model says, mistakes included."""

from __future__ import annotations

import argparse
import os
import sys

import pexpect

SESSIONS = {
    "en": ["Who are you?", "What is the capital of France?", "What about Japan?", "clear",
           "What's the capital of Kenya?", "And in Chinese?", "clear", "What is 35 + 47?", "Now add 8."],
    "zh": ["你是谁？", "法国的首都是哪里？", "那日本呢？", "clear", "肯尼亚的首都是哪里？", "用英文怎么说？", "clear",
           "35加47等于多少？", "再加8呢？"],
}


def record(lines: list[str], model: str | None) -> list[str]:
    args = ["-m", "glmkit", "chat", "--greedy", *(["--model", model] if model else [])]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"})
    child.expect("You: ")
    out = []
    for line in lines:
        child.sendline(line)
        out.append(f"You: {line}")
        child.expect("You: ")
        reply = child.before.replace("\r", "").split("\n", 1)[1].strip()  # drop the echoed input line
        out.append(reply)
    child.sendline("stop")
    child.expect(pexpect.EOF)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    args = parser.parse_args()
    for lines in SESSIONS.values():
        print("```\n" + "\n".join(record(lines, args.model)) + "\n```\n")


if __name__ == "__main__":
    main()
