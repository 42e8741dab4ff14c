"""`flwr-hpc` itself: --version, and run ids that can be pasted into `flwr log`."""

from __future__ import annotations

import os
from importlib.metadata import version

from helpers import REPO_ROOT, cli


def test_version_names_flwr_hpc_and_flower():
    res = cli("flwr-hpc", "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(
        f"flwr-hpc {version('flwr-hpc')} (flwr {version('flwr')}, Python ")


def test_status_prints_whole_run_ids_on_a_narrow_terminal(flwr_home, quickstart_fab):
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run

    run_dir = prepare_run(quickstart_fab, {}, load_federation([]), home=flwr_home)
    res = cli("flwr-hpc", "status", env={**os.environ, "COLUMNS": "60"})
    assert res.returncode == 0, res.stderr
    assert run_dir.name in res.stdout, res.stdout


def test_every_command_and_argument_has_help():
    import click
    import typer

    from flwr_hpc.control.cli import app

    def walk(cmd: click.Command, path: str):
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")

    commands = dict(walk(typer.main.get_command(app), "flwr-hpc"))
    assert {"flwr-hpc up", "flwr-hpc run", "flwr-hpc resume", "flwr-hpc bench transport",
            "flwr-hpc bench schedulers", "flwr-hpc sites check"} <= set(commands)
    for path, cmd in commands.items():
        assert cmd.help, path
        for param in cmd.params:
            assert getattr(param, "help", None), f"{path}: {param.name} has no help"


def test_shell_completion_script_and_completions():
    # the shell named, not detected from the parent processes (Typer's own test switch):
    # detection failed when the suite ran with no shell above it ("Shell  not supported")
    res = cli("flwr-hpc", "--show-completion", "bash",
              env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert res.returncode == 0, res.stderr
    assert "_FLWR_HPC_COMPLETE=complete_bash" in res.stdout
    # what the script asks the CLI for, the way bash does
    env = {**os.environ, "_FLWR_HPC_COMPLETE": "complete_bash",
           "COMP_WORDS": "flwr-hpc bench ", "COMP_CWORD": "2"}
    res = cli("flwr-hpc", env=env)
    assert res.stdout.split() == ["transport", "schedulers"], res.stdout


def test_exit_codes_are_consistent(tmp_path):
    missing = cli("flwr-hpc", "run")  # a usage error
    assert missing.returncode == 2 and "Missing argument 'APP'" in missing.stderr
    wrong = cli("flwr-hpc", "run", ".", "dp=opacus", cwd=REPO_ROOT)  # a config error
    assert wrong.returncode == 2
    assert "'dp' is not a federation key" in wrong.stderr
    not_app = cli("flwr-hpc", "run", str(tmp_path))
    assert not_app.returncode == 2 and "is not a Flower app" in not_app.stderr
