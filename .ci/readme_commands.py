"""Print the README's set-up commands: `install` or `test` (the first two commands of its first ```bash block).

.ci/run executes exactly these, so CI always runs what a new user copies from the README.
"""

import re
import sys
from pathlib import Path


def setup_commands(readme: Path) -> tuple[str, str]:
    text = readme.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise SystemExit(f"{readme}: no ```bash block with the set-up commands")
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(commands) < 2:
        raise SystemExit(f"{readme}: the first ```bash block must hold the install and the test command")
    return commands[0], commands[1]


if __name__ == "__main__":
    install, test = setup_commands(Path(__file__).resolve().parent.parent / "README.md")
    print({"install": install, "test": test}[sys.argv[1]])
