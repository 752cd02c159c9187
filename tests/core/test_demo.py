"""The embedded demo the README's first command runs."""

from __future__ import annotations

import io

import pytest

from credkeeper.__main__ import main
from credkeeper._demo import run_demo


class TestDemo:
    def test_demo_reports_one_refresh_per_expiry_and_no_error(self) -> None:
        """A short demo run succeeds, and its summary says so without showing any token."""
        out = io.StringIO()

        status = run_demo(workers=8, seconds=2.5, out=out)

        text = out.getvalue()
        assert 0 == status
        assert "0 errors" in text
        assert "0 invalid_grant" in text
        assert "sk-ant-" not in text

    def test_unknown_command_is_refused(self) -> None:
        """An unknown command exits with status 2, argparse's usage error."""
        with pytest.raises(SystemExit) as exit_:
            main(["bogus"])

        assert 2 == exit_.value.code
