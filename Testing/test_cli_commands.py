"""Commands other packages register with ``ultrasam`` (entry points), and every command's --help.

The registrations are read by the real ``importlib.metadata`` from a ``.dist-info`` folder written
here, the way an install writes it, so the tests do not depend on how (or whether) this checkout
was installed; pyproject.toml is the source of what the project registers."""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path

import pytest

from ultrasam import cli

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION_NAME = "ultrasam-slicer"


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def install_metadata(folder: Path, name: str, groups: dict[str, dict[str, str]], monkeypatch) -> None:
    """A distribution's metadata with these entry points, first on sys.path (as pip would leave it)."""
    info = folder / f"{name.replace('-', '_')}-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in entries.items()) + "\n"
        for group, entries in groups.items()))
    monkeypatch.syspath_prepend(str(folder))


@pytest.fixture
def project_commands(tmp_path, monkeypatch) -> dict[str, str]:
    """This project's ``ultrasam.commands``, registered from pyproject.toml."""
    commands = pyproject()["project"]["entry-points"][cli.COMMAND_GROUP]
    install_metadata(tmp_path / "site", DISTRIBUTION_NAME, {cli.COMMAND_GROUP: commands}, monkeypatch)
    return commands


def help_text(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0, f"{argv} --help failed"
    return capsys.readouterr().out


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


def test_another_package_adds_a_command_without_the_core_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hello_command.py").write_text(
        "def main(argv):\n    '''Greet (a stand-in command).'''\n    print('hello', *argv)\n    return 7\n")
    install_metadata(tmp_path / "site", "hello-plugin", {cli.COMMAND_GROUP: {
        "hello": "hello_command:main", "broken": "no_such_module:main"}, "other.group": {"stray": "x:y"}}, monkeypatch)
    assert cli.main(["hello", "a", "--b"]) == 7
    assert capsys.readouterr().out == "hello a --b\n"
    listing = help_text(cli.main, [], capsys)
    assert "  hello       Greet (a stand-in command)." in listing
    assert "  broken      cannot be loaded (no_such_module:main" in listing  # named, and help still works
    assert "stray" not in listing


def test_without_registered_commands_the_help_says_how_to_get_them(monkeypatch, capsys):
    monkeypatch.setattr(cli, "registered_commands", dict)
    assert "none found; installing this project (pip install -e .) registers" in help_text(cli.main, [], capsys)
    assert help_text(cli.main, ["segment"], capsys).startswith("usage: ultrasam segment")


def test_pyproject_registers_train_convert_and_check_data():
    from ultrasam_data import check, convert
    from ultrasam_training import cli as training_cli

    declared = pyproject()["project"]["entry-points"][cli.COMMAND_GROUP]
    loaded = {name: metadata.EntryPoint(name, value, cli.COMMAND_GROUP).load() for name, value in declared.items()}
    assert loaded == {"train": training_cli.main, "convert": convert.main, "check-data": check.main}


def test_registered_commands_run_with_their_own_arguments(project_commands, tmp_path, capsys):
    assert set(cli.registered_commands()) >= {"train", "convert", "check-data"}
    assert cli.main(["check-data", str(tmp_path / "absent.json")]) == 2  # check's own "nothing readable" status
    assert "absent.json" in capsys.readouterr().err


def test_every_command_answers_help(project_commands, capsys):
    from ultrasam_data.convert import build_parser as convert_parser
    from ultrasam_training import cli as training_cli

    listing = help_text(cli.main, [], capsys)
    built_in = subcommands(cli.build_parser({}))
    assert {"segment", "batch", "info", "download", "demo", "evaluate"} <= set(built_in)
    for name in [*built_in, *project_commands]:
        assert f"  {name} " in listing
        assert help_text(cli.main, [name], capsys).startswith("usage: ")
    for name in subcommands(training_cli._parser()):
        assert help_text(cli.main, ["train", name], capsys).startswith("usage: ultrasam-train " + name)
    for kind in subcommands(convert_parser()):
        assert help_text(cli.main, ["convert", kind], capsys).startswith("usage: ultrasam convert " + kind)


def test_console_scripts_answer_help(capsys):
    for name, value in pyproject()["project"]["scripts"].items():
        main = metadata.EntryPoint(name, value, "console_scripts").load()
        assert help_text(main, [], capsys).startswith("usage: "), name


def test_the_registration_first_on_sys_path_wins(tmp_path, monkeypatch):
    """As for imports: an older copy later on the path (a stale install) is not used. Python 3.9
    lists both copies, 3.10+ only the first of a distribution name; either way the first wins."""
    install_metadata(tmp_path / "later", DISTRIBUTION_NAME, {cli.COMMAND_GROUP: {"train": "old:main"}}, monkeypatch)
    install_metadata(tmp_path / "first", DISTRIBUTION_NAME, {cli.COMMAND_GROUP: {"train": "new:main"}}, monkeypatch)
    assert cli.registered_commands()["train"].value == "new:main"
