"""``python -m diffusers_stages.demo``: the same as ``diffusers-stages demo``."""

from . import main

raise SystemExit(main())
