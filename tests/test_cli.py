"""The `alp-trl` command line (`alp_trl.cli`): the command list, unknown commands, and a command run through it."""

import importlib
import json

import pytest

import alp_trl.cli
from alp_trl.callbacks import METRICS_FILE
from alp_trl.cli import COMMANDS
from alp_trl.cli import main as cli_main


def test_help_lists_every_command(capsys):
    assert list(COMMANDS) == ["train", "plot", "diagnose", "eval", "compare", "vllm-serve", "study"]
    assert "alp-trl train|plot|diagnose|eval|compare|vllm-serve|study ..." in alp_trl.cli.__doc__.replace("\n", " ")
    cli_main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: alp-trl {train,plot,diagnose,eval,compare,vllm-serve,study} ..."
    listed = lines[lines.index("commands:") + 1 :]
    assert [line.split()[0] for line in listed] == list(COMMANDS)
    assert listed[1] == "  plot     draw training curves of a run: alp-trl plot OUTPUT_DIR"
    cli_main([])
    assert capsys.readouterr().out.splitlines()[0] == lines[0], "no command: the same usage"


def test_an_unknown_command_exits_with_code_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["fly", "--fast"])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[:3] == [
        "alp-trl: unknown command 'fly'",
        "",
        "usage: alp-trl {train,plot,diagnose,eval,compare,vllm-serve,study} ...",
    ]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_reaches_its_own_parser(command, capsys):
    """`alp-trl COMMAND --help` is answered by the command's module (its usage names it under alp-trl), exit 0."""
    assert callable(importlib.import_module(COMMANDS[command][0]).main)
    with pytest.raises(SystemExit) as exited:
        cli_main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: alp-trl {command} [-h]")


def test_cli_plot_command(tmp_path, capsys):
    history = [{"step": s, "reward": 0.1 * s, "entropy": 2.0 - 0.1 * s} for s in range(1, 6)]
    (tmp_path / METRICS_FILE).write_text("\n".join(json.dumps(r) for r in history))
    cli_main(["plot", str(tmp_path)])
    assert (tmp_path / "plots" / "training_curves.png").exists()
    assert "training_curves.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["fly"])
