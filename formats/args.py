"""The command line's contract: an `argparse.ArgumentParser` whose "unrecognized arguments" error names
the closest known option of the (sub)command that was given, so a typo such as `--dedup_treshold`
stops the launch with a suggestion instead of running with a default. Every flowcurate parser is one.
"""

from __future__ import annotations

import argparse
import difflib


def suggestion(arg: str, options: list[str]) -> str:
    """' (did you mean --x?)' for the known option closest to `arg`, or ''."""
    name = arg.split("=", 1)[0]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _chosen(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subparser that `namespace` says was used (or `parser` itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(namespace, action.dest, None)
            if name in action.choices:
                return _chosen(action.choices[name], namespace)
    return parser


class ArgumentParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            target = _chosen(self, namespace)
            options = _options(target)
            unknown = [f"{a}{suggestion(a, options)}" if a.startswith("-") else a for a in extras]
            target.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace
