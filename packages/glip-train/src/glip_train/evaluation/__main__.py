"""``python -m glip_train.evaluation ...``: the same as ``glip eval ...``."""
from ..cli.eval import main

raise SystemExit(main())
