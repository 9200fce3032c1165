"""Options every command shares, handled once in patchrec.cli."""

import pytest
import torch

from patchrec.cli import COMMANDS, build_parser, main


def test_every_command_is_registered_and_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([name, "--help"])
        assert exc.value.code == 0
        assert name in capsys.readouterr().out


def test_threads_are_applied_and_checked(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        argv = ["baseline", "popularity", "--data", "synthetic", "--no-progress", "--out", str(tmp_path)]
        assert main(argv + ["--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(argv + ["--threads", "-1"]) == 2
        assert "--threads must be >= 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
