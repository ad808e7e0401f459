"""The README's commands as a newcomer types them: every verb, flag and make target exists.

The first screen (the set-up block and the one after it) is followed literally,
command by command; in the rest
of the README every `memplug VERB`, `memplugd --flag` and `make TARGET` is
checked against the real programs' --help and the Makefile.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
BIN = Path(sys.executable).parent
SEPARATORS = {"&&", "&", "|", ";", "||"}
GLOBAL_OPTIONS = {"--socket", "--json", "--version", "-h", "--help"}


@functools.cache
def help_text(*argv: str) -> str:
    proc = subprocess.run(
        [str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{' '.join(argv)} --help: exit {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def verbs() -> set[str]:
    listed = help_text("memplug").split("Commands:", 1)[1]
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def shell_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README, re.DOTALL | re.MULTILINE)


def commands(block: str) -> list[list[str]]:
    """Each simple command of a shell block (split at &&, &, |, ;), comments and `sudo` dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        while words:
            cut = next((i for i, w in enumerate(words) if w in SEPARATORS), len(words))
            command, words = words[:cut], words[cut + 1 :]
            if command[:1] == ["sudo"]:
                command = command[1:]
            if command:
                out.append(command)
    return out


def check_memplug(argv: list[str]) -> None:
    """memplug [--socket PATH] VERB [ARGS]: the verb exists and takes each option named."""
    args = argv[1:]
    while args and args[0] in GLOBAL_OPTIONS:
        args = args[2:] if args[0] == "--socket" else args[1:]
    if not args:
        return
    verb = args[0]
    assert verb in verbs(), f"the README runs `memplug {verb}`, which is no verb: {argv}"
    if verb == "exec":
        args = args[: args.index("--")] if "--" in args else args
    shown = help_text("memplug", verb)
    for word in args[1:]:
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
            assert re.search(rf"(^|[\s,/]){re.escape(word)}\b", shown), (
                f"`memplug {verb}` has no option {word} (README: {' '.join(argv)})"
            )


def check_memplugd(flags: list[str]) -> None:
    shown = help_text("memplugd")
    for word in flags:
        if word.startswith("--"):
            assert word in shown, f"memplugd has no flag {word}"


def check_make(argv: list[str]) -> None:
    for word in argv[1:]:
        if "=" in word:
            name, _, value = word.partition("=")
            if name == "ARGS":  # passed on to memplugd by `make run`
                check_memplugd(shlex.split(value))
            continue
        assert re.search(rf"^{re.escape(word)}:", MAKEFILE, re.MULTILINE), (
            f"the README runs `make {word}`; the Makefile has no such target"
        )


def check(argv: list[str]) -> None:
    program = argv[0]
    if program == "memplug":
        check_memplug(argv)
    elif program == "memplugd":
        check_memplugd(argv[1:])
    elif program == "make":
        check_make(argv)


def test_first_screen_goes_from_clone_to_memplug_ls() -> None:
    """The first block is the two set-up commands, make run and make test; with the
    second, memplug goes on PATH before its first use, then `memplug ls`."""
    blocks = shell_blocks()
    assert commands(blocks[0]) == [["make", "run"], ["make", "test"]], blocks[0]
    first = commands(blocks[0]) + commands(blocks[1])
    programs = [argv[0] for argv in first]
    on_path = next(
        (
            i
            for i, argv in enumerate(first)
            if argv in ([".", ".venv/bin/activate"], ["make", "install"])
        ),
        None,
    )
    assert on_path is not None, f"the first block never puts memplug on PATH: {first}"
    assert programs.index("memplug") > on_path, first
    assert ["memplug", "ls"] in first, first
    venv = re.search(r"^VENV \?= (\S+)$", MAKEFILE, re.MULTILINE)
    assert venv is not None and f"{venv.group(1)}/bin/activate" == ".venv/bin/activate"
    assert (BIN / "activate").exists() and (BIN / "memplug").exists()
    for argv in first:
        check(argv)


def test_first_hugetlb_example_sizes_the_pool_first() -> None:
    """On most machines the pool is empty: the first hugetlb example must fill it first."""
    for block in shell_blocks():
        lines = block.splitlines()
        uses = [i for i, line in enumerate(lines) if "hugetlb" in line and "memplug create" in line]
        if uses:
            before = "\n".join(lines[: uses[0]])
            assert "nr_hugepages" in before or "--hugetlb-pool" in before, block
            return
    raise AssertionError("no hugetlb example in the README")


def test_every_command_the_readme_shows_exists() -> None:
    for block in shell_blocks():
        for argv in commands(block):
            check(argv)
    # Inline code too: `memplug VERB ...`, `make TARGET ...`.
    for span in re.findall(r"`([^`\n]+)`", README):
        words = span.split()
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:1] == ["memplug"] and len(words) > 1 and re.fullmatch(r"[a-z-]+", words[1]):
            plain = [w for w in words if re.fullmatch(r"[\w./:=-]+", w)]
            check_memplug(plain if plain[:2] == words[:2] else words[:2])
        elif words[:1] == ["make"] and len(words) > 1:
            check_make([w for w in words if not w.startswith(("$", '"'))][:2])
