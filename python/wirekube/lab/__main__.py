"""``python -m wirekube.lab``: the ``wirekube-lab`` command (the lab is not part of the wheel, so a
checkout's ``make setup`` puts a ``wirekube-lab`` that runs this into .venv/bin)."""

import sys

from wirekube.lab.cli import main

sys.exit(main())
