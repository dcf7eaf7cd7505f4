"""``python -m data_prep ...`` is ``medmae prep ...``."""

from data_prep.cli import main

raise SystemExit(main())
