"""What `--help` shows besides the options: examples (an epilog per command) and command aliases."""

from __future__ import annotations

import click


def examples(*lines: str) -> str:
    """An epilog of example command lines, kept as written (click rewraps a paragraph unless it starts with
    \\b). tests/test_cli_help.py parses every one against its command's options."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


class AliasGroup(click.Group):
    """A click group whose commands may have aliases: `ALIASES = {alias: command}` resolve to the command,
    which `--help` lists once, as `command (alias: ...)`."""

    aliases: dict[str, str] = {}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, cmd, rest = super().resolve_command(ctx, args)
        return (cmd.name if cmd is not None else name), cmd, rest

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        by_command: dict[str, list[str]] = {}
        for alias, name in self.aliases.items():
            by_command.setdefault(name, []).append(alias)
        commands = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            also = by_command.get(name)
            commands.append((f"{name} (alias: {', '.join(also)})" if also else name, cmd))
        if commands:
            limit = formatter.width - 6 - max(len(label) for label, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(label, cmd.get_short_help_str(limit)) for label, cmd in commands])
