"""The README documents every setting and the commands it promises."""

from __future__ import annotations

from pathlib import Path

from core.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_settings_table():
    missing = [name.upper() for name in Settings.model_fields if f"| `{name.upper()}` |" not in README]
    assert not missing, f"settings missing from README: {missing}"


def test_quick_start_commands_exist():
    root = Path(__file__).resolve().parent.parent
    for command in ("scripts/up.sh", "scripts/test.sh", "scripts/down.sh", ".ci/run"):
        assert (root / command).exists()
    assert "./scripts/test.sh" in (root / ".ci" / "run").read_text()
